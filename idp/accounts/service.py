"""Creating accounts and the seeded roles."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.access.permissions import LATER_SEEDED_PERMISSIONS, SEEDED_ROLE_PERMISSIONS
from idp.accounts.models import SEEDED_ROLES, SEEDED_ROLES_REQUIRING_2FA, Role, RolePermission, User
from idp.accounts.obligations import ensure_default_obligations
from idp.accounts.passwords import PasswordHashing

LOGIN_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")


class AccountError(ValueError):
    """An account cannot be created or changed as asked; the message says why."""


def normalise_login(login: str) -> str:
    return login.strip().casefold()


def ensure_roles(session: Session) -> dict[str, Role]:
    """Create the seeded roles that are missing, with their seeded permissions."""
    existing = {r.name: r for r in session.scalars(select(Role))}
    for name, description in SEEDED_ROLES.items():
        if name not in existing:
            role = Role(name=name, description=description, builtin=True,
                        requires_2fa=name in SEEDED_ROLES_REQUIRING_2FA)
            role.grants = [RolePermission(permission=p) for p in sorted(SEEDED_ROLE_PERMISSIONS[name])]
            session.add(role)
            existing[name] = role
    session.flush()
    grant_later_permissions(session, existing)
    # Policy 2.5: the employee roles start with version 1 of the confidentiality obligation.
    ensure_default_obligations(session)
    return existing


def grant_later_permissions(session: Session, roles: dict[str, Role]) -> list[tuple[str, str]]:
    """Give the seeded roles a permission introduced after they were seeded
    (``LATER_SEEDED_PERMISSIONS``), once: only while no role holds it yet, so a grant the
    security officer later took away is not given back. Returns the (role, permission)
    pairs granted."""
    granted: list[tuple[str, str]] = []
    for permission, role_names in sorted(LATER_SEEDED_PERMISSIONS.items()):
        if session.scalar(select(RolePermission.role_id).where(RolePermission.permission == permission)
                          .limit(1)) is not None:
            continue
        for name in sorted(role_names):
            role = roles.get(name)
            if role is not None and role.builtin:
                role.grants.append(RolePermission(permission=permission))
                granted.append((name, permission))
    if granted:
        session.flush()
    return granted


def create_user(
    session: Session,
    passwords: PasswordHashing,
    *,
    login: str,
    display_name: str,
    password: str | None,
    roles: list[str],
    email: str | None = None,
    locale: str | None = None,
) -> User:
    login = normalise_login(login)
    if not LOGIN_PATTERN.match(login):
        raise AccountError(
            "login must be 2-64 characters: latin letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if session.scalar(select(User.id).where(User.login == login)) is not None:
        raise AccountError(f"login {login!r} is already taken")
    if not display_name.strip():
        raise AccountError("display name must not be empty")
    if email is not None and (len(email) > 320 or "@" not in email or any(c in email for c in "\r\n")):
        raise AccountError("e-mail address is not valid")
    if locale is not None and locale not in {"ky", "ru", "en"}:
        raise AccountError("locale must be ky, ru or en")
    if password is not None and not (1 <= len(password) <= 128):
        raise AccountError("password must be 1-128 characters")
    known = ensure_roles(session)
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise AccountError("unknown role(s): " + ", ".join(unknown))
    user = User(
        login=login,
        display_name=display_name.strip(),
        email=email,
        locale=locale,
        password_hash=passwords.hash(password) if password else None,
        password_changed_at=datetime.now(UTC).replace(tzinfo=None) if password else None,
        roles=[known[r] for r in roles],
    )
    session.add(user)
    session.flush()
    return user
