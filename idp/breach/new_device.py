""""This wasn't me": a notice at every sign-in from a device not seen before on the
account (issue 6, the third door).

The devices an account was signed in from are kept in the Redis sorted set
``seen-devices:{uid}``, device -> its last sign-in (a sorted set of a few short members is
a compact listpack in Redis; a plain set of strings is a hash table before Redis 7.2).
A device not used for ``SEEN_TTL`` (400 days) is forgotten, and the key expires
``SEEN_TTL`` after the account's last sign-in (each sign-in sets the expiry again), so the
key of an account that stops signing in (a pupil who left, a deleted account) does not
stay in Redis for ever. Within a year and a month — a summer break included — a device
stays known; after that it is new again, and when the account has no device left the
next sign-in counts as the first (no notice). A set written before this format (a plain
Redis set, no times) is read and converted at the account's next sign-in, its devices
dated then. A device is what a person recognises — browser, operating system and model
as ``describe_device`` names them — without version numbers, so a browser update is not
a new device. The first sign-in of an account ever sends nothing (every device is new
then); each later sign-in from a device not in the set queues ``new_device_notice`` in
the outbox with the device, IP, network and time, and a single-use link valid ``LINK_TTL`` (7 days) that opens the
"This wasn't me" confirmation page (``idp/breach/views.py``). The link is 256 random
bits kept hashed in Redis (``idp/accounts/links.py``, purpose ``not-me``).

No Flask here: the sign-in (idp/login/flow.py) passes in what it knows."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime

from redis import Redis
from sqlalchemy.orm import Session

from idp.accounts.links import OneTimeLinks
from idp.accounts.models import User
from idp.notify.notices import local_time, notify
from idp.notify.outbox import Outbox

LINK_PURPOSE = "not-me"
LINK_TTL = 7 * 86400
# The account's known devices are forgotten this long after its last sign-in.
SEEN_TTL = 400 * 86400
_VERSION = re.compile(r"\s*\d+(?:\.\d+)*")


# KEYS: 1 the account's devices. ARGV: 1 the device, 2 now, 3 forget devices used
# before this, 4 the key's lifetime. A plain set (the format before the sorted set) is
# converted first. Returns {devices known before, 1 when the device is new}.
REMEMBER = """
if redis.call('TYPE', KEYS[1]).ok == 'set' then
  local old = redis.call('SMEMBERS', KEYS[1])
  redis.call('DEL', KEYS[1])
  for _, device in ipairs(old) do redis.call('ZADD', KEYS[1], ARGV[2], device) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local before = redis.call('ZCARD', KEYS[1])
local added = redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {before, added}
"""


def seen_key(user_id: int) -> str:
    return f"seen-devices:{user_id}"


def device_key(device_label: str | None) -> str:
    """The device as remembered: its label without version numbers ("Chrome, Windows")."""
    label = _VERSION.sub("", device_label or "").strip(" ,")
    return (label or "unknown")[:128]


def not_me_links(redis: Redis) -> OneTimeLinks:
    return OneTimeLinks(redis=redis, purpose=LINK_PURPOSE)


def remember_device(
    redis: Redis, user_id: int, device_label: str | None, *, now: float | None = None
) -> tuple[bool, bool]:
    """Note the device's sign-in at ``now`` in the account's set, atomically, forget the
    devices unused for ``SEEN_TTL`` and keep the set ``SEEN_TTL`` from now; (new device,
    first sign-in: no device known before)."""
    moment = time.time() if now is None else now
    known_before, added = redis.eval(  # type: ignore[misc]
        REMEMBER, 1, seen_key(user_id), device_key(device_label), moment, moment - SEEN_TTL, SEEN_TTL
    )
    return bool(added), int(known_before) == 0


def check_new_device(
    db: Session,
    redis: Redis,
    outbox: Outbox,
    user: User,
    *,
    device: str | None,
    ip: str | None,
    network: str | None,
    sid: str,
    signed_in_at: datetime,
    report_url: Callable[[str], str],
) -> bool:
    """Remember the device of a sign-in that just completed; when the account had signed
    in before but never from this device, queue the notice (in ``db``'s transaction; the
    caller commits). True when a notice was queued. An account without an e-mail address
    gets no notice (the device is remembered all the same)."""
    new, first = remember_device(redis, user.id, device)
    if not new or first or not user.email:
        return False
    token = not_me_links(redis).issue(
        {"uid": user.id, "sid": sid, "device": device or "", "ip": ip or "", "network": network or "",
         "at": signed_in_at.timestamp()},
        ttl=LINK_TTL,
    )
    return notify(
        db, outbox, user, "new_device_notice",
        device=device or "?", ip=ip or "?", place=network or "", signed_in_at=local_time(signed_in_at),
        report_url=report_url(token),
    )
