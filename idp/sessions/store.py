"""Server-side browser sessions in Redis behind an opaque cookie.

The cookie holds 256 random bits; Redis holds the data under the SHA-256 of that
value, so a Redis dump does not reveal live cookies. The id is rotated at every
sign-in (ASVS 7.2.4); idle and absolute timeouts are enforced here on every request,
never by cookie expiry (NIST 800-63B-4 §5.1): each session's own timeouts (set at
sign-in from the session policy, ``idp/access/decision.py``), else the defaults.

A signed-in session that was ended elsewhere (by the person on another device, by
support, by a lock, in another server process) must stay ended even when a request of
that very browser is still running: its write-back is conditional on the session still
existing in Redis (one Lua script), so an ended session is never brought back.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.datastructures import CallbackDict

from idp.sessions.records import (
    DEADLINES,
    INDEX_AS_ZSET,
    deadline,
    deadline_member,
    dumps,
    index_key,
    session_key,
    sid_key,
    timeouts,
    ttl_until,
)

ANONYMOUS_TTL = 3600
# Writing last-seen on every request would make every page a Redis write; a minute is
# precise enough for idle timeouts measured in tens of minutes.
TOUCH_INTERVAL = 60

# Write a signed-in session. KEYS: 1 the key to write, 2 the key it was read from (the
# same unless the id was rotated), 3 the account's index, 4 sid -> key, 5 the deadlines.
# ARGV: 1 data, 2 ttl, 3 "1" when the session must still exist (it was read from Redis
# or created by the sign-in), 4 deadline member, 5 deadline, 6 the index's lifetime,
# 7 the sid, 8 its sign-in time (the index's score).
# Returns 0 when the session had been ended meanwhile (nothing is written).
WRITE_SIGNED_IN = INDEX_AS_ZSET + """
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
index_as_zset(KEYS[3])
if KEYS[2] ~= KEYS[1] then
  redis.call('DEL', KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[7])
if redis.call('TTL', KEYS[3]) < tonumber(ARGV[6]) then redis.call('EXPIRE', KEYS[3], ARGV[6]) end
redis.call('SET', KEYS[4], KEYS[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4])
return 1
"""

# Take a session out of its account's index (either format). KEYS: 1 the index, 2 the
# session key. ARGV: 1 the sid.
DROP_FROM_INDEX = """
if redis.call('TYPE', KEYS[1]).ok == 'set' then return redis.call('SREM', KEYS[1], KEYS[2]) end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def _key(token: str) -> str:
    return session_key(token)


class RedisSession(CallbackDict, SessionMixin):  # type: ignore[type-arg]
    """The dict behind ``flask.session``, with rotation and destruction flags."""

    def __init__(self, initial: dict[str, Any] | None = None, token: str | None = None) -> None:
        def on_update(_self: Any) -> None:
            self.modified = True

        super().__init__(initial or {}, on_update)
        self.token = token
        self.new = token is None
        self.modified = False
        self.rotate_requested = False
        self.destroyed = False
        # The signed-in session (sid) this object was read as, or that the sign-in
        # created in Redis (``adopt``): its write-back requires it to still exist.
        self.persisted_sid: str | None = (initial or {}).get("sid") if (initial or {}).get("uid") else None
        # Redis could not be read when the request began (down, or failing over): the
        # request is answered 503 by the app (``raise_if_unavailable``) and nothing is
        # written back.
        self.unavailable: RedisError | None = None
        self.send_cookie = False

    def regenerate(self) -> None:
        """Give this session a new id at the next save; the old id stops working."""
        self.rotate_requested = True
        self.modified = True

    def destroy(self) -> None:
        self.clear()
        self.destroyed = True
        self.modified = True

    def adopt(self, token: str, data: dict[str, Any]) -> None:
        """The sign-in already created this session in Redis under ``token`` (atomically
        with the concurrent-session limit, ``SessionRegistry.create``); from now on this
        browser uses it. The previous id was deleted by that same step."""
        self.clear()
        self.update(data)
        self.token = token
        self.rotate_requested = False
        self.persisted_sid = data.get("sid")
        self.send_cookie = True
        self.modified = True


class RedisSessionInterface(SessionInterface):
    """Flask session interface storing sessions in Redis."""

    def __init__(self, redis: Redis, *, idle_timeout: int, absolute_timeout: int, secure: bool) -> None:
        self.redis = redis
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.secure = secure
        # The __Host- prefix needs Secure; plain-http localhost gets an unprefixed name.
        self.cookie_name = "__Host-darbaza" if secure else "darbaza"
        self._write = redis.register_script(WRITE_SIGNED_IN)
        self._drop_from_index = redis.register_script(DROP_FROM_INDEX)

    def _deadline(self, data: dict[str, Any], now: float) -> tuple[float, str]:
        return deadline(data, idle_default=self.idle_timeout, absolute_default=self.absolute_timeout, now=now)

    def open_session(self, app: Flask, request: Request) -> RedisSession:
        # Flask opens the session before any error handler can act: a Redis failure here
        # would be werkzeug's bare 500. It is kept on the session and raised again inside
        # the request, where the app answers a clear 503.
        try:
            return self._open(request)
        except RedisError as exc:
            session = RedisSession()
            session.unavailable = exc
            return session

    def _open(self, request: Request) -> RedisSession:
        token = request.cookies.get(self.cookie_name)
        if not token or len(token) > 100:
            return RedisSession()
        raw = self.redis.get(_key(token))
        if raw is None:
            return RedisSession()
        data = json.loads(raw)
        now = time.time()
        if data.get("uid") is not None:
            ends, _kind = self._deadline(data, now)
            if now >= ends:
                # Timed out: gone for this browser at once. Its tokens and back-channel
                # logout are the sweep's (``SessionRegistry.sweep_expired``), which finds it
                # in the deadlines set.
                self.redis.delete(_key(token))
                self._unindex(data, _key(token))
                return RedisSession()
        session = RedisSession(data, token)
        if data.get("uid") is not None and now - data.get("last_seen", 0) > TOUCH_INTERVAL:
            session["last_seen"] = int(now)
        return session

    def _unindex(self, data: dict[str, Any], key: str) -> None:
        if data.get("uid") is not None and data.get("sid"):
            self._drop_from_index(keys=[index_key(data["uid"]), key], args=[str(data["sid"])])
        if data.get("sid"):
            self.redis.delete(sid_key(data["sid"]))

    def _ttl(self, session: RedisSession) -> int:
        if session.get("uid") is None:
            return ANONYMOUS_TTL
        now = time.time()
        ends, _kind = self._deadline(dict(session), now)
        return ttl_until(ends, now)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, RedisSession)
        if session.unavailable is not None:
            return
        try:
            self._save(session, response)
        except RedisError as exc:
            # Redis failed after the view had answered (a newcomer's first session write,
            # e.g. the sign-in form's token): Flask would answer a bare 500 from here. The
            # answer becomes the app's own for a RedisError (a 503 page or JSON), keeping
            # the security headers already set on it; no cookie is sent.
            failed = app.make_response(app.handle_user_exception(exc))
            response.status_code = failed.status_code
            response.set_data(failed.get_data())
            for name in ("Set-Cookie", "Location"):
                del response.headers[name]
            for name in ("Content-Type", "Cache-Control", "Retry-After"):
                if name in failed.headers:
                    response.headers[name] = failed.headers[name]

    def _save(self, session: RedisSession, response: Response) -> None:
        cookie_kwargs: dict[str, Any] = {
            "path": "/",
            "secure": self.secure,
            "httponly": True,
            "samesite": "Lax",
        }
        if session.destroyed:
            if session.token:
                old = _key(session.token)
                raw = self.redis.get(old)
                self.redis.delete(old)
                if raw:
                    self._unindex(json.loads(raw), old)
            response.delete_cookie(self.cookie_name, **cookie_kwargs)
            return
        if not session.modified:
            return
        if not dict(session) and session.new:
            return
        old_token = session.token
        if session.rotate_requested or session.token is None:
            session.token = secrets.token_urlsafe(32)
            session.send_cookie = True
        key = _key(session.token)
        old_key = _key(old_token) if old_token else key
        if session.get("uid") is not None and session.get("sid"):
            self._save_signed_in(session, key, old_key)
        else:
            pipe = self.redis.pipeline()
            if old_key != key:
                pipe.delete(old_key)
            pipe.set(key, dumps(dict(session)), ex=ANONYMOUS_TTL if session.get("uid") is None else self._ttl(session))
            pipe.execute()
        if session.send_cookie:
            response.set_cookie(self.cookie_name, session.token, **cookie_kwargs)

    def _save_signed_in(self, session: RedisSession, key: str, old_key: str) -> None:
        data = dict(session)
        now = time.time()
        ends, _kind = self._deadline(data, now)
        _idle, absolute = timeouts(data, idle_default=self.idle_timeout, absolute_default=self.absolute_timeout)
        # A session read from Redis (or made by the sign-in) must still be there: if it
        # was ended meanwhile, this write does nothing and the browser is signed out.
        must_exist = session.persisted_sid is not None and session.persisted_sid == data["sid"]
        self._write(
            keys=[key, old_key, index_key(data["uid"]), sid_key(data["sid"]), DEADLINES],
            args=[dumps(data), ttl_until(ends, now), "1" if must_exist else "0",
                  deadline_member(data["uid"], data["sid"]), ends, absolute, data["sid"],
                  int(data.get("auth_time") or now)],
        )
