"""Where a signed-in session lives in Redis and when it ends: key names and the one
deadline rule that the session store, the registry, the refresh grant and the sweep
all use (no Flask here).

Keys:

- ``sess:{sha256(cookie)}`` -> the session's JSON (``idp/sessions/store.py``);
- ``usess:{uid}`` -> set of the account's session keys;
- ``sid:{sid}`` -> the session key of the session with that ``sid`` (``sid`` is what
  tokens, codes and logout tokens carry);
- ``sid-apps:{sid}`` -> set of the client_ids of portal apps used from the session;
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
import math
from typing import Any

DEADLINES = "sess-deadlines"
IDLE = "idle"
ABSOLUTE = "absolute"


def session_key(token: str) -> str:
    """Redis holds a session under the SHA-256 of its cookie: a dump reveals no cookie."""
    return "sess:" + hashlib.sha256(token.encode()).hexdigest()


def index_key(user_id: int | str) -> str:
    return f"usess:{user_id}"


def sid_key(sid: str) -> str:
    return f"sid:{sid}"


def apps_key(sid: str) -> str:
    return f"sid-apps:{sid}"


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
