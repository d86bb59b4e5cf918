""""This wasn't me": a notice at every sign-in from a device not seen before on the
account (issue 6, the third door).

The devices an account was signed in from are kept in the Redis set
``seen-devices:{uid}`` (no expiry: a device stays known). A device is what a person
recognises — browser, operating system and model as ``describe_device`` names them —
without version numbers, so a browser update is not a new device. The first sign-in of
an account ever sends nothing (every device is new then); each later sign-in from a
device not in the set queues ``new_device_notice`` in the outbox with the device, IP,
network and time, and a single-use link valid ``LINK_TTL`` (7 days) that opens the
"This wasn't me" confirmation page (``idp/breach/views.py``). The link is 256 random
bits kept hashed in Redis (``idp/accounts/links.py``, purpose ``not-me``).

No Flask here: the sign-in (idp/login/flow.py) passes in what it knows."""

from __future__ import annotations

import re
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
_VERSION = re.compile(r"\s*\d+(?:\.\d+)*")


def seen_key(user_id: int) -> str:
    return f"seen-devices:{user_id}"


def device_key(device_label: str | None) -> str:
    """The device as remembered: its label without version numbers ("Chrome, Windows")."""
    label = _VERSION.sub("", device_label or "").strip(" ,")
    return (label or "unknown")[:128]


def not_me_links(redis: Redis) -> OneTimeLinks:
    return OneTimeLinks(redis=redis, purpose=LINK_PURPOSE)


def remember_device(redis: Redis, user_id: int, device_label: str | None) -> tuple[bool, bool]:
    """Add the device to the account's set, atomically; (new device, first ever sign-in)."""
    pipe = redis.pipeline(transaction=True)
    pipe.scard(seen_key(user_id))
    pipe.sadd(seen_key(user_id), device_key(device_label))
    known_before, added = pipe.execute()
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
