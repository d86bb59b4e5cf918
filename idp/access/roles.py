"""Custom roles and the permissions of every role; the who-has-access report."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.access.permissions import PERMISSIONS
from idp.accounts.models import Role, RolePermission, User, user_roles
from idp.oidc.models import Client

ROLE_NAME = re.compile(r"^[a-z][a-z0-9_]{1,63}$")


class RoleError(ValueError):
    """A role change is not valid; the message says why."""


def create_role(session: Session, *, name: str, description: str, permissions: set[str]) -> Role:
    name = name.strip().lower()
    if not ROLE_NAME.match(name):
        raise RoleError("role name must be 2-64 characters: latin letters, digits and '_', starting with a letter")
    if session.scalar(select(Role.id).where(Role.name == name)) is not None:
        raise RoleError(f"role {name} already exists")
    unknown = permissions - set(PERMISSIONS)
    if unknown:
        raise RoleError("unknown permission(s): " + ", ".join(sorted(unknown)))
    role = Role(name=name, description=description.strip()[:255], builtin=False)
    role.grants = [RolePermission(permission=p) for p in sorted(permissions)]
    session.add(role)
    session.flush()
    return role


def set_permissions(role: Role, permissions: set[str]) -> tuple[list[str], list[str]]:
    unknown = permissions - set(PERMISSIONS)
    if unknown:
        raise RoleError("unknown permission(s): " + ", ".join(sorted(unknown)))
    before = role.permissions
    keep = [g for g in role.grants if g.permission in permissions]
    role.grants = keep + [RolePermission(permission=p) for p in sorted(permissions - before)]
    return sorted(permissions - before), sorted(before - permissions)


def delete_role(session: Session, role: Role) -> None:
    if role.builtin:
        raise RoleError("a seeded role cannot be deleted")
    if session.scalar(select(user_roles.c.user_id).where(user_roles.c.role_id == role.id).limit(1)) is not None:
        raise RoleError("the role still has members; remove them first")
    session.delete(role)


@dataclass
class AccessRow:
    client: Client
    roles: list[str]  # empty list: every role
    accounts: list[User]
    claims: list[str]


def who_has_access(session: Session) -> list[AccessRow]:
    """For each portal app: which roles and accounts may use it, and what it receives
    (policy 3: records of who holds confidential information)."""
    from idp.oidc.claims import claims_for_scopes

    rows: list[AccessRow] = []
    users = list(session.scalars(select(User).where(User.active.is_(True)).order_by(User.login)))
    for client in session.scalars(select(Client).where(Client.active.is_(True)).order_by(Client.name)):
        if client.allowed_roles:
            allowed = set(client.allowed_roles)
            accounts = [u for u in users if allowed & set(u.role_names)]
        else:
            accounts = users
        rows.append(
            AccessRow(client=client, roles=list(client.allowed_roles), accounts=accounts,
                      claims=claims_for_scopes(client.scopes))
        )
    return rows
