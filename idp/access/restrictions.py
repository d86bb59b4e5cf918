"""Stored restrictions (policy 5.1): their values as plain data for the journal's diff,
what they are attached to, and "why can't this person sign in?" for the console and the
command line. No Flask here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.access.decision import AUTHORIZE, SCHOOL_TZ, SIGN_IN, Decision, context_for, decide_for
from idp.access.models import Restriction
from idp.accounts.models import Role, User
from idp.config import Settings
from idp.oidc.models import Client

# The fields a console change may touch, in the order the journal lists them.
FIELDS = (
    "role_id", "user_id", "description", "allowed_clients", "allowed_weekdays", "hours_start", "hours_end",
    "allowed_networks", "max_sessions", "at_session_limit", "require_2fa", "valid_from", "valid_until",
    "school_only_scopes", "idle_timeout_seconds", "absolute_timeout_seconds",
)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat(timespec="seconds")
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value) if not isinstance(value, list) else list(value)
    return value


def snapshot(restriction: Restriction) -> dict[str, Any]:
    """The restriction's values as JSON-ready data (datetimes as naive-UTC ISO text)."""
    return {name: _plain(getattr(restriction, name)) for name in FIELDS}


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{field: {"from": old, "to": new}}`` for every field that changed."""
    return {name: {"from": before.get(name), "to": after.get(name)} for name in FIELDS
            if before.get(name) != after.get(name)}


def target_of(db: Session, restriction: Restriction) -> str:
    """``role:NAME`` or ``user:ID`` (the journal's subject for the change)."""
    if restriction.role_id is not None:
        role = db.get(Role, restriction.role_id)
        return f"role:{role.name if role else restriction.role_id}"
    return f"user:{restriction.user_id}"


@dataclass
class Explanation:
    """The answer to "why can't this person sign in (to this app, then, from there)?"."""

    user: User
    client: Client | None
    at: datetime
    ip: str | None
    scopes: list[str]
    amr: list[str]
    decision: Decision


def explain(
    db: Session,
    settings: Settings,
    user: User,
    *,
    client: Client | None,
    at: datetime,
    ip: str | None,
    scopes: list[str],
) -> Explanation:
    """The same decision a sign-in (no app) or an authorization for ``client`` would get.
    The person is assumed to give every factor they have: a second factor when the
    account has one (the sign-in asks for it), the password alone otherwise."""
    amr = ["pwd", "otp", "mfa"] if user.has_second_factor else ["pwd"]
    phase = AUTHORIZE if client is not None else SIGN_IN
    if client is not None and not scopes:
        scopes = list(client.scopes or [])
    context = context_for(settings, phase=phase, now=at, client=client, ip=ip, scopes=scopes, amr=amr)
    return Explanation(user=user, client=client, at=at, ip=ip, scopes=scopes, amr=amr,
                       decision=decide_for(db, user, context))


def parse_moment(text: str | None, now: datetime) -> datetime:
    """An ISO time for ``explain``: without an offset it is Asia/Bishkek time; empty is
    ``now``. ValueError when it is not a time."""
    if not text or not text.strip():
        return now
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=SCHOOL_TZ)
    return moment.astimezone(UTC)


def find_account(db: Session, login: str) -> User | None:
    name = (login or "").strip().casefold()
    if not name or "\x00" in name or len(name) > 128:
        return None
    return db.scalar(select(User).where(User.login == name))


def find_client(db: Session, client_id: str) -> Client | None:
    if not client_id or "\x00" in client_id or len(client_id) > 64:
        return None
    return db.scalar(select(Client).where(Client.client_id == client_id))
