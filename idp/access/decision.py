"""Whether an account may use a portal app. Issue 5 grows this into the full,
explainable access decision (hours, networks, sessions); callers already use it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from idp.accounts.models import User
from idp.config import Settings
from idp.oidc.models import Client


def may_use_app(user: User, client: Client) -> bool:
    """An app with allowed roles admits only members of those roles (policy 2.4)."""
    if not client.allowed_roles:
        return True
    return bool(set(user.role_names) & set(client.allowed_roles))


@dataclass(frozen=True)
class SessionPolicy:
    """How long a new browser session may live and how many an account may hold."""

    idle_timeout: int
    absolute_timeout: int
    max_sessions: int | None = None
    at_session_limit: str = "refuse"


def session_policy(db: Session, user: User, *, ip: str | None, now: datetime, settings: Settings) -> SessionPolicy:
    """The session policy for a sign-in of ``user`` from ``ip`` at ``now``: the
    settings' defaults, narrowed by the restrictions that apply."""
    return SessionPolicy(idle_timeout=settings.session_idle_timeout, absolute_timeout=settings.session_absolute_timeout)
