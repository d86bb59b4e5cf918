"""Comparing a parsed roster with the database: what an import would create and update.

Nothing is written here. Accounts are never disabled by the import: the database does
not record which accounts came from a roster (see README, "Roster import")."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from connectors.roster.parser import LineError, ParsedRoster, RosterRow
from idp.accounts.models import SEEDED_ROLES, Role, SchoolClass, User


@dataclass
class PlannedUpdate:
    row: RosterRow
    changes: dict[str, list[object]]  # field -> [before, after]


@dataclass
class RosterPlan:
    create: list[RosterRow] = field(default_factory=list)
    update: list[PlannedUpdate] = field(default_factory=list)
    unchanged: int = 0
    new_classes: list[str] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def row_changes(user: User, row: RosterRow) -> dict[str, list[object]]:
    """The differences between an account and its roster line (empty: nothing to do)."""
    changes: dict[str, list[object]] = {}
    if user.display_name != row.display_name:
        changes["display_name"] = [user.display_name, row.display_name]
    if row.has_email and (user.email or None) != row.email:
        changes["email"] = [user.email, row.email]
    if row.has_locale and (user.locale or None) != row.locale:
        changes["locale"] = [user.locale, row.locale]
    if set(user.role_names) != set(row.roles):
        changes["roles"] = [sorted(user.role_names), row.roles]
    if row.classes is not None and set(user.class_names) != set(row.classes):
        changes["classes"] = [sorted(user.class_names), row.classes]
    if row.guardian_of:
        linked = {child.login for child in user.children}
        if not set(row.guardian_of) <= linked:
            changes["guardian_of"] = [sorted(linked), sorted(linked | set(row.guardian_of))]
    return changes


def plan(db: Session, parsed: ParsedRoster) -> RosterPlan:
    result = RosterPlan(errors=list(parsed.errors))
    # The seeded roles count even before the first account created them (ensure_roles).
    roles = set(db.scalars(select(Role.name))) | set(SEEDED_ROLES)
    classes = set(db.scalars(select(SchoolClass.name)))
    in_file = {row.login for row in parsed.rows}
    logins = [row.login for row in parsed.rows]
    existing: dict[str, User] = {}
    for start in range(0, len(logins), 500):
        chunk = logins[start : start + 500]
        existing.update({u.login: u for u in db.scalars(select(User).where(User.login.in_(chunk)))})
    referenced = sorted({g for row in parsed.rows for g in (row.guardian_of or []) if g not in in_file})
    known_elsewhere = set(db.scalars(select(User.login).where(User.login.in_(referenced)))) if referenced else set()
    new_classes: set[str] = set()
    for row in parsed.rows:
        unknown_roles = [r for r in row.roles if r not in roles]
        if unknown_roles:
            result.errors.append(LineError(row.line, "unknown role: " + ", ".join(unknown_roles), row.login))
            continue
        unknown_children = [g for g in row.guardian_of or [] if g not in in_file and g not in known_elsewhere]
        if unknown_children:
            result.errors.append(LineError(row.line, "unknown guardian_of login: " + ", ".join(unknown_children),
                                           row.login))
            continue
        if row.login in (row.guardian_of or []):
            result.errors.append(LineError(row.line, "an account cannot be its own guardian", row.login))
            continue
        new_classes.update(c for c in row.classes or [] if c not in classes)
        user = existing.get(row.login)
        if user is None:
            result.create.append(row)
            continue
        changes = row_changes(user, row)
        if changes:
            result.update.append(PlannedUpdate(row=row, changes=changes))
        else:
            result.unchanged += 1
    result.new_classes = sorted(new_classes)
    result.errors.sort(key=lambda e: e.line)
    return result
