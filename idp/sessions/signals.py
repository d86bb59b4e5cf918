"""Account-sharing signals (policy 5.2.1: nobody lets another person use their account).

Right after a sign-in creates a session, ``after_sign_in`` looks at the account's live
sessions and recent devices and flags what suggests that several people use one
account, for the security officer (console "Sharing signals" and the journal):

- ``too-many-sessions``: more live sessions at once than allowed (a restriction's
  maximum of concurrent sessions, else ``settings.sharing_max_sessions``);
- ``distant-networks``: two live sessions, both seen within
  ``settings.sharing_concurrent_window_seconds``, from places far apart;
- ``many-devices``: more than ``settings.sharing_max_devices`` distinct devices signing
  in within ``settings.sharing_device_window_seconds`` (a Redis sorted set per account).

There is no geo-IP here, so "far apart" is what addresses alone can honestly say: two
different named networks of the school (unless one lies inside the other, such as a lab
inside the school network), a named network and the outside, or two outside addresses
in different IPv4 /16 or IPv6 /32 prefixes (different providers or regions as a rule;
one home's addresses stay within one prefix). An IPv4 and an IPv6 address are not
compared: one dual-stack household has both.

A kind is not raised again for an account while an earlier flag of that kind awaits
review, so one shared account is one entry to look at, not one per sign-in."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import combinations
from typing import Any

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.access.decision import SessionPolicy, session_policy
from idp.access.models import SharingFlag
from idp.access.networks import OUTSIDE, IPNetwork, NetworkError, parse_cidr, parse_ip
from idp.accounts.models import User
from idp.audit.journal import Journal
from idp.config import Settings
from idp.sessions.registry import SessionInfo

TOO_MANY_SESSIONS = "too-many-sessions"
DISTANT_NETWORKS = "distant-networks"
MANY_DEVICES = "many-devices"
KINDS = (TOO_MANY_SESSIONS, DISTANT_NETWORKS, MANY_DEVICES)
# Parallel sign-ins of one account all see "no open flag" in the database before any
# of them commits; the first one claims the kind in Redis and the others stand back.
# The claim outlives any request; after it the database row is what dedupes. Marking
# the flag reviewed removes the claim at once.
CLAIM_SECONDS = 60
# Keep the device list small even for an account that many devices sign in to.
MAX_DEVICES_KEPT = 100


def devices_key(user_id: int) -> str:
    return f"sharing:devices:{user_id}"


def claim_key(user_id: int, kind: str) -> str:
    return f"sharing:claim:{user_id}:{kind}"


# --- pure rules ------------------------------------------------------------------------------
def _blocks(entries: Sequence[str]) -> list[IPNetwork]:
    found = []
    for entry in entries:
        try:
            found.append(parse_cidr(entry))
        except NetworkError:
            continue  # the settings check refuses these at start; never match them here
    return found


def _nested(inner: Sequence[str], outer: Sequence[str]) -> bool:
    """Every block of ``inner`` lies inside some block of ``outer``."""
    inner_blocks, outer_blocks = _blocks(inner), _blocks(outer)
    if not inner_blocks:
        return False
    return all(
        any(block.version == other.version and block.subnet_of(other) for other in outer_blocks)  # type: ignore[arg-type]
        for block in inner_blocks
    )


def _prefix(ip: str) -> IPNetwork | None:
    address = parse_ip(ip)
    if address is None:
        return None
    length = 16 if address.version == 4 else 32
    return ipaddress.ip_network(f"{address}/{length}", strict=False)


def far_apart(
    a_ip: str | None, a_network: str | None, b_ip: str | None, b_network: str | None,
    networks: Mapping[str, Sequence[str]],
) -> str | None:
    """Why two sessions' places are far apart ("different-networks",
    "inside-and-outside", "different-prefixes"), or None when they may be one place."""
    a_net, b_net = a_network or OUTSIDE, b_network or OUTSIDE
    if a_net != OUTSIDE and b_net != OUTSIDE:
        if a_net == b_net:
            return None
        a_blocks, b_blocks = networks.get(a_net, ()), networks.get(b_net, ())
        if _nested(a_blocks, b_blocks) or _nested(b_blocks, a_blocks):
            return None  # e.g. the computer lab inside the school network
        return "different-networks"
    if a_net != b_net:
        return "inside-and-outside"
    if not a_ip or not b_ip:
        return None
    a_prefix, b_prefix = _prefix(a_ip), _prefix(b_ip)
    if a_prefix is None or b_prefix is None or a_prefix.version != b_prefix.version:
        return None
    return "different-prefixes" if a_prefix != b_prefix else None


def _place(info: SessionInfo) -> dict[str, Any]:
    return {"ip": info.ip, "network": info.network or OUTSIDE, "device": info.device}


def distant_sessions(
    sessions: Sequence[SessionInfo], *, now: float, window: int, networks: Mapping[str, Sequence[str]]
) -> dict[str, Any] | None:
    """The details of the first pair of live sessions, both seen within ``window``
    seconds, whose places are far apart; None when there is no such pair."""
    recent = [s for s in sessions if now - (s.last_seen or s.auth_time or 0) <= window]
    # Newest first, so the pair shown includes the sign-in that raised the flag.
    recent.sort(key=lambda s: s.auth_time or 0, reverse=True)
    for a, b in combinations(recent, 2):
        reason = far_apart(a.ip, a.network, b.ip, b.network, networks)
        if reason is not None:
            return {"reason": reason, "window_seconds": window, "sessions": [_place(a), _place(b)]}
    return None


# --- the service -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SharingCheck:
    """What one sign-in is checked against."""

    max_sessions: int
    max_sessions_source: str  # "restriction" or "settings"
    concurrent_window: int
    max_devices: int
    device_window: int
    networks: Mapping[str, Sequence[str]]


def _newest(sessions: Sequence[SessionInfo], new_sid: str | None) -> SessionInfo | None:
    if new_sid is not None:
        for info in sessions:
            if info.sid == new_sid:
                return info
    return max(sessions, key=lambda s: (s.auth_time or 0, s.last_seen or 0), default=None)


def _remember_device(redis: Redis, user_id: int, device: str, *, now: float, window: int) -> list[str]:
    """Record that ``device`` signed in now; the distinct devices seen within the window."""
    key = devices_key(user_id)
    pipe = redis.pipeline()
    pipe.zadd(key, {device: now})
    pipe.zremrangebyscore(key, "-inf", now - window)
    # Forget the oldest beyond the cap (ranks from the lowest score).
    pipe.zremrangebyrank(key, 0, -MAX_DEVICES_KEPT - 1)
    pipe.expire(key, window)
    pipe.zrange(key, 0, -1)
    members = pipe.execute()[-1]
    return [m.decode() if isinstance(m, bytes) else str(m) for m in members]


def _open_flag_exists(db: Session, user_id: int, kind: str) -> bool:
    return (
        db.scalar(
            select(SharingFlag.id).where(
                SharingFlag.user_id == user_id, SharingFlag.kind == kind, SharingFlag.reviewed_at.is_(None)
            ).limit(1)
        )
        is not None
    )


def release_claim(redis: Redis, user_id: int, kind: str) -> None:
    """A flag of ``kind`` was reviewed: the next signal of that kind is raised again."""
    redis.delete(claim_key(user_id, kind))


def after_sign_in(
    db: Session,
    redis: Redis,
    settings: Settings,
    user: User,
    sessions: list[SessionInfo],
    *,
    new_sid: str | None = None,
    now: float | None = None,
    journal: Journal | None = None,
    request_id: str | None = None,
    policy: SessionPolicy | None = None,
) -> list[SharingFlag]:
    """Check the account after a sign-in and flag what suggests sharing (policy 5.2.1).

    ``sessions`` are the account's live sessions, the new one included (``new_sid``
    names it; else the newest is taken); ``policy`` is the session policy the sign-in
    was given (looked up again when not passed). Each flag is added to ``db`` with its journal
    event ``account:sharing:flag`` (actor ``system``) in the caller's transaction; the
    caller commits. Returns the flags raised now."""
    moment = time.time() if now is None else now
    journal = journal or Journal()
    newest = _newest(sessions, new_sid)
    if policy is None:
        policy = session_policy(
            db, user, ip=newest.ip if newest else None, now=datetime.fromtimestamp(moment, UTC), settings=settings
        )
    check = SharingCheck(
        max_sessions=policy.max_sessions if policy.max_sessions is not None else settings.sharing_max_sessions,
        max_sessions_source="restriction" if policy.max_sessions is not None else "settings",
        concurrent_window=settings.sharing_concurrent_window_seconds,
        max_devices=settings.sharing_max_devices,
        device_window=settings.sharing_device_window_seconds,
        networks=settings.networks,
    )
    signals: list[tuple[str, dict[str, Any]]] = []
    if len(sessions) > check.max_sessions:
        signals.append((TOO_MANY_SESSIONS, {
            "sessions": len(sessions),
            "limit": check.max_sessions,
            "limit_from": check.max_sessions_source,
            "places": [_place(s) for s in sorted(sessions, key=lambda s: s.auth_time or 0)],
        }))
    distant = distant_sessions(sessions, now=moment, window=check.concurrent_window, networks=check.networks)
    if distant is not None:
        signals.append((DISTANT_NETWORKS, distant))
    if newest is not None and newest.device:
        devices = _remember_device(redis, user.id, newest.device, now=moment, window=check.device_window)
        if len(devices) > check.max_devices:
            signals.append((MANY_DEVICES, {
                "devices": devices,
                "count": len(devices),
                "limit": check.max_devices,
                "window_seconds": check.device_window,
            }))
    raised: list[SharingFlag] = []
    for kind, details in signals:
        if _open_flag_exists(db, user.id, kind):
            continue
        if not redis.set(claim_key(user.id, kind), "1", nx=True, ex=CLAIM_SECONDS):
            continue
        flag = SharingFlag(user_id=user.id, kind=kind, details=details)
        db.add(flag)
        db.flush()
        journal.record(
            db,
            actor="system",
            action="account:sharing:flag",
            subject=f"user:{user.id}",
            reason=kind,
            ip=newest.ip if newest else None,
            request_id=request_id,
            details={"flag": flag.id, "kind": kind, **details},
        )
        raised.append(flag)
    return raised
