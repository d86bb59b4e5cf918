"""Comparing a parsed roster with the database: what an import would create, update,
re-enable and disable. Nothing is written here.

The roster manages the accounts it created (``User.source == "roster"``): such an
account that is active and missing from the file is disabled; one the roster disabled
(``source_disabled_at`` set) that is in the file again is re-enabled. An account
disabled by an administrator (``source_disabled_at`` empty) is never re-enabled here.
Accounts created by hand (``"local"``) that are in the file are updated but stay
local and are never disabled by the roster; directory accounts (``"directory"``) are
managed by the school directory and a line naming one is a bad line.

An import that would disable more than half of the active roster accounts (and more
than ``MASS_DISABLE_MIN``) is a ``mass_disable``: the applier refuses it unless asked
explicitly, so an incomplete file cannot lock a school out (see README, "Roster import")."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from connectors.roster.parser import LineError, ParsedRoster, RosterRow
from idp.accounts.models import SEEDED_ROLES, Role, SchoolClass, User

ROSTER_SOURCE = "roster"
DIRECTORY_SOURCE = "directory"
# More than this many accounts, and more than half of the active roster accounts: refused
# unless the operator asks for it (``--allow-mass-disable`` / the console's checkbox).
MASS_DISABLE_MIN = 10


@dataclass
class PlannedUpdate:
    row: RosterRow
    changes: dict[str, list[object]]  # field -> [before, after]


@dataclass(frozen=True)
class PlannedDisable:
    user_id: int
    login: str
    display_name: str


@dataclass
class RosterPlan:
    create: list[RosterRow] = field(default_factory=list)
    update: list[PlannedUpdate] = field(default_factory=list)  # re-enabled accounts too ("active" change)
    disable: list[PlannedDisable] = field(default_factory=list)
    unchanged: int = 0
    new_classes: list[str] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    roster_active: int = 0  # active roster accounts before the import

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def enable(self) -> list[RosterRow]:
        """The roster accounts the roster had disabled that the file lists again."""
        return [item.row for item in self.update if "active" in item.changes]

    @property
    def mass_disable(self) -> bool:
        """Disabling more than half of the active roster accounts (and more than
        ``MASS_DISABLE_MIN``): the applier refuses unless explicitly allowed."""
        count = len(self.disable)
        return count > MASS_DISABLE_MIN and 2 * count > self.roster_active


def row_changes(user: User, row: RosterRow) -> dict[str, list[object]]:
    """The differences between an account and its roster line (empty: nothing to do)."""
    changes: dict[str, list[object]] = {}
    if user.source == ROSTER_SOURCE and not user.active and user.source_disabled_at is not None:
        changes["active"] = [False, True]
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
        user = existing.get(row.login)
        if user is not None and user.source == DIRECTORY_SOURCE:
            result.errors.append(LineError(row.line, "the account is managed by the school directory", row.login))
            continue
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
        if user is None:
            result.create.append(row)
            continue
        changes = row_changes(user, row)
        if changes:
            result.update.append(PlannedUpdate(row=row, changes=changes))
        else:
            result.unchanged += 1
    result.new_classes = sorted(new_classes)
    # Active roster accounts missing from the file (a bad line still names its account).
    # Filtered in Python: the file may hold thousands of logins, too many for a NOT IN.
    mentioned = in_file | {error.login for error in parsed.errors if error.login}
    for user_id, login, display_name in db.execute(
        select(User.id, User.login, User.display_name)
        .where(User.source == ROSTER_SOURCE, User.active.is_(True))
        .order_by(User.login)
    ):
        result.roster_active += 1
        if login not in mentioned:
            result.disable.append(PlannedDisable(user_id=user_id, login=login, display_name=display_name))
    result.errors.sort(key=lambda e: e.line)
    return result
