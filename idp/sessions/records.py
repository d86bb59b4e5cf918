"""Where a signed-in session lives in Redis and when it ends: key names and the one
deadline rule that the session store, the registry, the refresh grant and the sweep
all use (no Flask here).

Keys:

- ``sess:{sha256(cookie)}`` -> the session's JSON (``idp/sessions/store.py``);
- ``usess:{uid}`` -> sorted set of the account's sids, scored by sign-in time
  (``auth_time``); the session key is found through ``sid:{sid}``. (Until issue 8 it
  was a plain set of session keys, 69 characters each and a hash table in Redis; such a
  set is converted by ``INDEX_AS_ZSET`` wherever the index is written or listed.)
- ``sid:{sid}`` -> the session key of the session with that ``sid`` (``sid`` is what
  tokens, codes and logout tokens carry);
- ``sid-apps:{sid}`` -> sorted set of the client_ids of portal apps used from the
  session, scored by first use (a compact listpack in Redis; until issue 8 a plain set,
  a hash table before Redis 7.2 — ``app_ids`` reads both, ``REMEMBER_APP`` adds to both)
  (deleted when the session ends, once its back-channel logouts are queued;
  ``SessionRegistry.finish``);
- ``sess-deadlines`` -> sorted set, member ``"{uid}:{sid}"``, score the moment the session
  times out (idle or absolute), read by the sweep that ends timed-out sessions.

The deadline: the session ends at the earlier of ``last_seen + idle_timeout`` and
``authenticated_at + absolute_timeout`` (N24: activity restarts the idle clock; a
successful re-authentication, which sets ``authenticated_at``, restarts both). The
timeouts are the session's own (set at sign-in from the session policy), else the
defaults from settings.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

DEADLINES = "sess-deadlines"
IDLE = "idle"
ABSOLUTE = "absolute"


def dumps(data: dict[str, Any]) -> str:
    """A session's JSON as stored: without the spaces of ``json.dumps``'s default
    separators (every byte is paid per session, docs/capacity.md)."""
    return json.dumps(data, separators=(",", ":"))


# A Lua function for the scripts that touch an account's index: an index written before
# issue 8 (a Redis set of session keys) becomes the sorted set of sids by sign-in time,
# keeping its expiry; sessions that are gone are left out.
INDEX_AS_ZSET = """
local function index_as_zset(index)
  if redis.call('TYPE', index).ok ~= 'set' then return end
  local old = redis.call('SMEMBERS', index)
  local ttl = redis.call('TTL', index)
  redis.call('DEL', index)
  for _, k in ipairs(old) do
    local raw = redis.call('GET', k)
    if raw then
      local ok, d = pcall(cjson.decode, raw)
      if ok and type(d) == 'table' and type(d['sid']) == 'string' then
        redis.call('ZADD', index, tonumber(d['auth_time']) or 0, d['sid'])
      end
    end
  end
  if ttl > 0 and redis.call('EXISTS', index) == 1 then redis.call('EXPIRE', index, ttl) end
end
"""
# Convert an account's index if it is in the old format. KEYS: 1 the index.
CONVERT_INDEX = INDEX_AS_ZSET + """
index_as_zset(KEYS[1])
return 1
"""


def session_key(token: str) -> str:
    """Redis holds a session under the SHA-256 of its cookie: a dump reveals no cookie."""
    return "sess:" + hashlib.sha256(token.encode()).hexdigest()


def index_key(user_id: int | str) -> str:
    return f"usess:{user_id}"


def sid_key(sid: str) -> str:
    return f"sid:{sid}"


def apps_key(sid: str) -> str:
    return f"sid-apps:{sid}"


# Note a portal app used from a session. KEYS: 1 the session's apps. ARGV: 1 the
# client_id, 2 now, 3 the key's lifetime. A set of the format before issue 8 stays one.
REMEMBER_APP = """
if redis.call('TYPE', KEYS[1]).ok == 'set' then
  redis.call('SADD', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


def app_ids(redis: Redis, sid: str) -> set[str]:
    """The client_ids of the portal apps used from the session ``sid`` (either format)."""
    try:
        members: list[bytes | str] = redis.zrange(apps_key(sid), 0, -1)  # type: ignore[assignment]
    except ResponseError:  # a plain set, written before issue 8
        members = list(redis.smembers(apps_key(sid)))  # type: ignore[arg-type]
    return {m.decode() if isinstance(m, bytes) else str(m) for m in members}


def deadline_member(user_id: int | str, sid: str) -> str:
    return f"{user_id}:{sid}"


def parse_deadline_member(member: bytes | str) -> tuple[int, str] | None:
    text = member.decode() if isinstance(member, bytes) else str(member)
    uid, sep, sid = text.partition(":")
    if not sep or not uid.isdigit() or not sid:
        return None
    return int(uid), sid


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def timeouts(data: dict[str, Any], *, idle_default: int, absolute_default: int) -> tuple[int, int]:
    """The session's own idle and absolute timeouts (seconds), else the defaults."""
    idle = _number(data.get("idle_timeout"))
    absolute = _number(data.get("absolute_timeout"))
    return (
        int(idle) if idle and idle > 0 else idle_default,
        int(absolute) if absolute and absolute > 0 else absolute_default,
    )


def deadline(data: dict[str, Any], *, idle_default: int, absolute_default: int, now: float) -> tuple[float, str]:
    """When the signed-in session ``data`` times out, and which limit ends it."""
    idle, absolute = timeouts(data, idle_default=idle_default, absolute_default=absolute_default)
    started = _number(data.get("authenticated_at")) or _number(data.get("auth_time")) or now
    last_seen = _number(data.get("last_seen")) or started
    idle_end = last_seen + idle
    absolute_end = started + absolute
    return (idle_end, IDLE) if idle_end < absolute_end else (absolute_end, ABSOLUTE)


def ttl_until(moment: float, now: float) -> int:
    """Whole seconds (at least one) for a Redis expiry at ``moment``."""
    return max(1, math.ceil(moment - now))
