"""The registry of signed-in browser sessions (Redis): create them within the account's
concurrent-session limit, list them with what a person recognises them by, and end them.

Sessions are written by ``RedisSessionInterface`` (``idp/sessions/store.py``); the keys
are described in ``idp/sessions/records.py``. Services never touch Flask.

Ending a session — by its owner, by support, by sign-out, by a lock or a password
change, at the limit of sessions, or by timeout — is always the same steps:

1. it is removed from Redis (its cookie stops working in every server process at once);
2. its refresh and access tokens are revoked in the database (a refresh fails, and
   introspection and userinfo refuse its access tokens, in every process at once: each
   access token has a row that they check);
3. every portal app used from it is sent a back-channel logout token (queued in the
   caller's transaction, delivered by the worker).

Refresh tokens live and die with the browser session they were issued in, whatever
their scope (``offline_access`` included): DESIGN "Sessions" says ending a session ends
its refresh tokens, and issue 5 says timeouts are enforced at every refresh. A portal app
that wants access after the session sends the person through sign-in again.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis import Redis
from redis.exceptions import ResponseError, WatchError
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from idp.audit.journal import Journal
from idp.oidc.models import AccessToken, RefreshToken
from idp.oidc.tokens import TokenService
from idp.sessions.records import (
    ABSOLUTE,
    CONVERT_INDEX,
    DEADLINES,
    IDLE,
    INDEX_AS_ZSET,
    app_ids,
    apps_key,
    deadline,
    deadline_member,
    dumps,
    index_key,
    parse_deadline_member,
    session_key,
    sid_key,
    timeouts,
    ttl_until,
)

log = logging.getLogger("darbaza.sessions")

END_OLDEST = "end_oldest"
REFUSE = "refuse"
LIVE = "live"
ENDED = "ended"
# A refresh is activity through a portal app (as in Keycloak); like a page view it is
# written at most once a minute.
TOUCH_INTERVAL = 60
SWEEP_BATCH = 500

# Create a signed-in session within the account's limit, atomically: of N parallel
# sign-ins never more than the limit succeed. KEYS: 1 the account's index, 2 the new
# session key, 3 sid -> key, 4 the key this browser had (the new key when none), 5 the
# deadlines. ARGV: 1 data, 2 ttl, 3 the limit (-1: none), 4 what to do at the limit,
# 5 deadline member, 6 deadline, 7 the index's lifetime, 8 the account id, 9 the new
# sid, 10 its sign-in time.
# Returns {1, live sessions before, replaced session or '', ended sessions...} or
# {0, live sessions} when the sign-in is refused (nothing is changed then).
# The session record behind a sid, in one round trip (sid -> record key -> record).
READ_BY_SID = """
local key = redis.call('GET', KEYS[1])
if not key then return false end
return redis.call('GET', key)
"""

CREATE = INDEX_AS_ZSET + """
index_as_zset(KEYS[1])
local live = {}
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local k = redis.call('GET', 'sid:' .. sid)
  local raw = k and redis.call('GET', k)
  local keep = false
  if raw and k ~= KEYS[4] then
    local ok, d = pcall(cjson.decode, raw)
    if ok and type(d) == 'table' and tostring(d['uid']) == ARGV[8] and d['sid'] == sid then
      table.insert(live, {k, tonumber(d['auth_time']) or 0, sid, raw})
      keep = true
    end
  end
  if not keep and k ~= KEYS[4] then redis.call('ZREM', KEYS[1], sid) end
end
local limit = tonumber(ARGV[3])
local result = {1, #live, ''}
if limit >= 0 and #live >= limit then
  if ARGV[4] ~= 'end_oldest' or limit == 0 then return {0, #live} end
  table.sort(live, function(a, b) if a[2] == b[2] then return a[1] < b[1] end return a[2] < b[2] end)
  for i = 1, #live - limit + 1 do
    local s = live[i]
    redis.call('DEL', s[1])
    redis.call('ZREM', KEYS[1], s[3])
    redis.call('DEL', 'sid:' .. s[3])
    redis.call('ZREM', KEYS[5], ARGV[8] .. ':' .. s[3])
    table.insert(result, s[4])
  end
end
if KEYS[4] ~= KEYS[2] then
  local old = redis.call('GET', KEYS[4])
  if old then
    redis.call('DEL', KEYS[4])
    local ok, d = pcall(cjson.decode, old)
    if ok and type(d) == 'table' and type(d['sid']) == 'string' then redis.call('ZREM', KEYS[1], d['sid']) end
    result[3] = old
  end
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[10], ARGV[9])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[7]) then redis.call('EXPIRE', KEYS[1], ARGV[7]) end
redis.call('SET', KEYS[3], KEYS[2], 'EX', ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
return result
"""

# Remove one session if it is still there; only the caller that removed it goes on to
# revoke and notify (so two parallel "end" clicks send one logout). KEYS: 1 session
# key, 2 sid -> key, 3 index, 4 deadlines. ARGV: 1 deadline member, 2 the sid. Returns
# the data.
REMOVE = INDEX_AS_ZSET + """
index_as_zset(KEYS[3])
local raw = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[1])
return raw
"""


class Backchannel(Protocol):
    def queue_for_session(self, db: Session, *, user_id: int, sid: str | None, client_ids: Iterable[str]) -> int: ...


class SessionLimitReached(Exception):
    """A new sign-in would exceed the account's concurrent-session limit ("refuse")."""

    def __init__(self, limit: int, sessions: int) -> None:
        super().__init__(f"the account already has {sessions} sessions (limit {limit})")
        self.limit = limit
        self.sessions = sessions
        # Set by the sign-in that was refused, for its journal event.
        self.user_id: int | None = None


@dataclass
class SessionInfo:
    """One signed-in browser session, as the person and support see it."""

    key: str
    sid: str | None
    auth_time: int | None
    last_seen: float | None
    amr: list[str]
    ip: str | None = None
    device: str | None = None
    network: str | None = None
    apps: list[str] = field(default_factory=list)
    idle_timeout: int | None = None
    absolute_timeout: int | None = None
    # When it times out unless used again, and by which limit ("idle" or "absolute").
    expires_at: float | None = None
    ends_by: str | None = None


@dataclass
class EndedSession:
    """A session removed from Redis whose tokens and apps are yet to be dealt with."""

    user_id: int
    sid: str | None
    data: dict[str, Any] = field(default_factory=dict)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SessionRegistry:
    """Creates, lists and ends an account's sessions."""

    def __init__(
        self,
        *,
        redis: Redis,
        tokens: TokenService,
        backchannel: Backchannel | None = None,
        idle_timeout: int | None = None,
        absolute_timeout: int | None = None,
    ) -> None:
        self.redis = redis
        self.tokens = tokens
        self.backchannel = backchannel
        settings = tokens.settings
        self.idle_timeout = idle_timeout or settings.session_idle_timeout
        self.absolute_timeout = absolute_timeout or settings.session_absolute_timeout
        self._create = redis.register_script(CREATE)
        self._remove = redis.register_script(REMOVE)
        self._convert_index = redis.register_script(CONVERT_INDEX)
        self._read_by_sid = redis.register_script(READ_BY_SID)

    # --- reading ------------------------------------------------------------------------
    def _deadline(self, data: dict[str, Any], now: float) -> tuple[float, str]:
        return deadline(data, idle_default=self.idle_timeout, absolute_default=self.absolute_timeout, now=now)

    def _info(self, key: str, data: dict[str, Any], now: float) -> SessionInfo:
        sid = data.get("sid")
        apps = sorted(app_ids(self.redis, sid)) if sid else []
        idle, absolute = timeouts(data, idle_default=self.idle_timeout, absolute_default=self.absolute_timeout)
        ends, kind = self._deadline(data, now)
        # ``last_seen`` is stored in whole seconds (rounded down); the sign-in itself, to
        # the millisecond, is the better figure until the session is used again (the
        # sharing check compares sessions seen within a window of seconds).
        seen = [t for t in (data.get("last_seen"), data.get("authenticated_at"))
                if isinstance(t, int | float) and not isinstance(t, bool)]
        return SessionInfo(
            key=key,
            sid=sid,
            auth_time=data.get("auth_time"),
            last_seen=max(seen) if seen else None,
            amr=[str(m) for m in data.get("amr", [])],
            ip=data.get("ip"),
            device=data.get("device"),
            network=data.get("network"),
            apps=apps,
            idle_timeout=idle,
            absolute_timeout=absolute,
            expires_at=ends,
            ends_by=kind,
        )

    def _sids(self, index: str) -> builtins.list[str]:
        """The sids in an account's index, oldest sign-in first; an index written before
        issue 8 (a plain set of session keys) is converted first."""
        try:
            members: builtins.list[bytes] = self.redis.zrange(index, 0, -1)  # type: ignore[assignment]
        except ResponseError:
            self._convert_index(keys=[index])
            members = self.redis.zrange(index, 0, -1)  # type: ignore[assignment]
        return [_text(m) for m in members]

    def list(self, user_id: int) -> list[SessionInfo]:
        """The account's live sessions, newest sign-in first."""
        found: list[SessionInfo] = []
        now = time.time()
        index = index_key(user_id)
        sids = self._sids(index)
        keys = [_text(k) if k else None for k in self.redis.mget([sid_key(s) for s in sids])] if sids else []
        raws = self.redis.mget([k for k in keys if k]) if any(keys) else []
        by_key = dict(zip([k for k in keys if k], raws, strict=True))
        for sid, key in zip(sids, keys, strict=True):
            raw = by_key.get(key) if key else None
            if key is None or raw is None:
                self.redis.zrem(index, sid)
                continue
            data: dict[str, Any] = json.loads(raw)
            if data.get("uid") != user_id or data.get("sid") != sid:
                continue
            if self._deadline(data, now)[0] <= now:
                continue  # timed out; the sweep ends it
            found.append(self._info(key, data, now))
        return sorted(found, key=lambda s: (s.auth_time or 0, s.last_seen or 0), reverse=True)

    def get(self, user_id: int, sid: str) -> SessionInfo | None:
        return next((s for s in self.list(user_id) if s.sid == sid), None)

    def state(self, sid: str, *, now: float | None = None) -> str:
        """Whether the session ``sid`` is ``live``, ``ended`` (gone) or timed out
        (``idle`` / ``absolute``); checked at every refresh."""
        return self.check(sid, now=now)[0]

    def check(self, sid: str, *, now: float | None = None) -> tuple[str, dict[str, Any] | None]:
        """``state`` and the session's record when it is live (for ``touch``)."""
        moment = time.time() if now is None else now
        raw = self._read_by_sid(keys=[sid_key(sid)])
        if raw is None:
            return ENDED, None
        data = json.loads(raw)
        if data.get("sid") != sid or data.get("uid") is None:
            return ENDED, None
        ends, kind = self._deadline(data, moment)
        return (LIVE, data) if moment < ends else (kind, None)

    def touch(self, sid: str, *, now: float | None = None, seen: dict[str, Any] | None = None) -> None:
        """A portal app used the session (a refresh): restart its idle clock. Written
        only when the session is still there (never brings an ended one back). ``seen``:
        the record ``check`` just read; written no more than once a ``TOUCH_INTERVAL``,
        so a record touched less than that ago costs no round trip."""
        moment = time.time() if now is None else now
        if seen is not None and seen.get("sid") == sid and moment - float(seen.get("last_seen") or 0) < TOUCH_INTERVAL:
            return
        key_raw = self.redis.get(sid_key(sid))
        if not key_raw:
            return
        key = _text(key_raw)
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is None:
                    return
                data = json.loads(raw)
                if data.get("sid") != sid or moment - float(data.get("last_seen") or 0) < TOUCH_INTERVAL:
                    return
                data["last_seen"] = int(moment)
                ends, _kind = self._deadline(data, moment)
                if ends <= moment:
                    return
                ttl = ttl_until(ends, moment)
                pipe.multi()
                pipe.set(key, dumps(data), ex=ttl)
                pipe.set(sid_key(sid), key, ex=ttl)
                pipe.zadd(DEADLINES, {deadline_member(data["uid"], sid): ends})
                pipe.execute()
            except WatchError:
                return  # the browser wrote it at the same moment, or it ended: either is fine

    # --- creating -------------------------------------------------------------------------
    def create(
        self,
        user_id: int,
        token: str,
        data: dict[str, Any],
        *,
        max_sessions: int | None,
        at_limit: str = REFUSE,
        replaces_token: str | None = None,
    ) -> tuple[builtins.list[EndedSession], EndedSession | None]:
        """Store the new signed-in session ``data`` under the cookie value ``token``,
        within the limit of ``max_sessions`` live sessions (None: no limit). At the
        limit, ``refuse`` raises ``SessionLimitReached``; ``end_oldest`` removes the oldest
        sessions. ``replaces_token`` is this browser's previous cookie, whose session is
        removed in the same step.

        Returns the sessions removed at the limit and the replaced session (if it was
        signed in); the caller finishes them with ``finish`` in its transaction."""
        now = time.time()
        key = session_key(token)
        ends, _kind = self._deadline(data, now)
        _idle, absolute = timeouts(data, idle_default=self.idle_timeout, absolute_default=self.absolute_timeout)
        result = self._create(
            keys=[
                index_key(user_id),
                key,
                sid_key(data["sid"]),
                session_key(replaces_token) if replaces_token else key,
                DEADLINES,
            ],
            args=[
                dumps(data),
                ttl_until(ends, now),
                -1 if max_sessions is None else max(0, int(max_sessions)),
                at_limit,
                deadline_member(user_id, data["sid"]),
                ends,
                absolute,
                str(user_id),
                data["sid"],
                int(data.get("auth_time") or now),
            ],
        )
        if int(result[0]) == 0:
            raise SessionLimitReached(int(max_sessions or 0), int(result[1]))
        replaced: EndedSession | None = None
        if result[2]:
            old = json.loads(result[2])
            if old.get("uid") is not None and old.get("sid"):
                replaced = EndedSession(user_id=int(old["uid"]), sid=old["sid"], data=old)
                self.redis.zrem(DEADLINES, deadline_member(old["uid"], old["sid"]))
                self.redis.delete(sid_key(old["sid"]))
        evicted: builtins.list[EndedSession] = []
        for raw in result[3:]:
            old = json.loads(raw)
            evicted.append(EndedSession(user_id=user_id, sid=old.get("sid"), data=old))
        return evicted, replaced

    # --- ending -----------------------------------------------------------------------------
    def _client_ids(self, db: Session, sid: str) -> set[str]:
        """The apps used from the session: those noted in Redis, and any that hold a
        token of it (should the Redis note be gone)."""
        apps = app_ids(self.redis, sid)
        for model in (RefreshToken, AccessToken):
            apps.update(db.scalars(select(model.client_id).where(model.sid == sid).distinct()))
        return apps

    def finish(self, db: Session, ended: EndedSession) -> None:
        """Revoke the tokens of a session already removed from Redis and queue the
        back-channel logout of its apps, in the caller's transaction."""
        if not ended.sid:
            return
        self.tokens.revoke_session(db, ended.sid)
        if self.backchannel is not None:
            self.backchannel.queue_for_session(
                db, user_id=ended.user_id, sid=ended.sid, client_ids=sorted(self._client_ids(db, ended.sid))
            )
        # The deliveries are built from it (above): the note of the apps used goes with
        # the session instead of living on for up to the absolute timeout. (The session
        # is already gone from Redis, so nothing would build them again anyway.)
        self.redis.delete(apps_key(ended.sid))

    def _take(self, user_id: int, sid: str, key: str | None) -> EndedSession | None:
        """Remove the session from Redis; the removed session, or None when another
        caller (or a timeout) removed it first."""
        if key is None:
            key_raw = self.redis.get(sid_key(sid))
            key = _text(key_raw) if key_raw else None
        if key is None:
            self.redis.zrem(DEADLINES, deadline_member(user_id, sid))
            return None
        raw = self._remove(keys=[key, sid_key(sid), index_key(user_id), DEADLINES],
                           args=[deadline_member(user_id, sid), sid])
        if raw is None:
            return None
        data = json.loads(raw)
        if data.get("uid") != user_id or data.get("sid") != sid:
            return None
        return EndedSession(user_id=user_id, sid=sid, data=data)

    def end(self, db: Session, user_id: int, sid: str, *, reason: str = "", actor: str = "") -> bool:
        """End one session of the account: signed out everywhere, its tokens revoked,
        its apps told. False when the account has no such live session (nothing is
        done; a session of another account is never touched). The caller journals and
        commits."""
        info = self.get(user_id, sid)
        if info is None:
            return False
        ended = self._take(user_id, sid, info.key)
        if ended is None:
            return False
        self.finish(db, ended)
        log.info("session ended: user %s, reason %s, by %s", user_id, reason or "-", actor or "-")
        return True

    def end_all(
        self, db: Session, user_id: int, *, except_sid: str | None = None, reason: str = "", actor: str = ""
    ) -> int:
        """End every session of the account (but ``except_sid``): each is signed out,
        its tokens revoked and its apps told. With no exception every token of the
        account is revoked, also those of sessions that already timed out. Returns the
        number of live sessions ended; the caller journals and commits."""
        ended = 0
        for info in self.list(user_id):
            if info.sid is None or (except_sid is not None and info.sid == except_sid):
                continue
            taken = self._take(user_id, info.sid, info.key)
            if taken is None:
                continue
            self.finish(db, taken)
            ended += 1
        now = int(time.time())
        for model in (RefreshToken, AccessToken):
            query = update(model).where(model.user_id == user_id, model.revoked_at.is_(None))
            if except_sid is not None:
                query = query.where(or_(model.sid.is_(None), model.sid != except_sid))
            db.execute(query.values(revoked_at=now))
        if ended:
            log.info("sessions ended: user %s, %d, reason %s, by %s", user_id, ended, reason or "-", actor or "-")
        return ended

    def sweep_expired(self, db: Session, *, now: float | None = None, journal: Journal | None = None) -> int:
        """End the sessions that timed out (idle or absolute) the same way as any other
        end: tokens revoked, apps told, ``account:session:expire`` journalled. The worker
        runs this every minute; each timed-out session is handled by one sweeper only.
        Commits after each session. Returns how many were ended."""
        moment = time.time() if now is None else now
        journal = journal or Journal()
        members: builtins.list[bytes] = self.redis.zrangebyscore(  # type: ignore[assignment]
            DEADLINES, "-inf", moment, start=0, num=SWEEP_BATCH
        )
        ended = 0
        for member in members:
            parsed = parse_deadline_member(member)
            if parsed is None:
                self.redis.zrem(DEADLINES, member)
                continue
            user_id, sid = parsed
            key_raw = self.redis.get(sid_key(sid))
            raw = self.redis.get(_text(key_raw)) if key_raw else None
            data = json.loads(raw) if raw else None
            kind = "expired"
            if data is not None and data.get("uid") == user_id:
                ends, kind = self._deadline(data, moment)
                if ends > moment:
                    # Used since the deadline was written: move it.
                    self.redis.zadd(DEADLINES, {member: ends})
                    continue
            if not self.redis.zrem(DEADLINES, member):
                continue  # another sweeper has it
            if key_raw:
                self._remove(keys=[_text(key_raw), sid_key(sid), index_key(user_id), DEADLINES],
                             args=[deadline_member(user_id, sid), sid])
            self.finish(db, EndedSession(user_id=user_id, sid=sid, data=data or {}))
            journal.record(
                db,
                actor="system",
                action="account:session:expire",
                subject=f"user:{user_id}",
                reason={IDLE: "idle-timeout", ABSOLUTE: "absolute-timeout"}.get(kind, "timed-out"),
                ip=(data or {}).get("ip"),
                details={"sid": sid, "device": (data or {}).get("device")},
            )
            db.commit()
            ended += 1
        return ended

    @staticmethod
    def now() -> float:
        return time.time()
