"""Whether an account may use a portal app. Issue 5 grows this into the full,
explainable access decision (hours, networks, sessions); callers already use it."""

from __future__ import annotations

from idp.accounts.models import User
from idp.oidc.models import Client


def may_use_app(user: User, client: Client) -> bool:
    """An app with allowed roles admits only members of those roles (policy 2.4)."""
    if not client.allowed_roles:
        return True
    return bool(set(user.role_names) & set(client.allowed_roles))
