"""Applying a roster plan through ``AccountAdmin`` (its validation, permissions and
journal), in the caller's transaction: on any error the caller rolls everything back."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from connectors.roster.parser import LineError, ParsedRoster
from connectors.roster.planner import RosterPlan, plan
from idp.accounts.admin import AccountAdmin, Actor, PermissionDenied
from idp.accounts.models import User
from idp.accounts.service import AccountError, ensure_roles

ROSTER_ACTOR = "cli:roster"


class RosterRejected(Exception):
    """The roster has bad lines (or a change was refused); nothing was changed."""

    def __init__(self, errors: list[LineError]) -> None:
        super().__init__("; ".join(f"line {e.line}: {e.reason}" for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class IssuedCode:
    login: str
    display_name: str
    code: str
    expires_at: datetime


@dataclass
class RosterResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    classes_created: list[str] = field(default_factory=list)
    codes: list[IssuedCode] = field(default_factory=list)


def apply(admin: AccountAdmin, actor: Actor, parsed: ParsedRoster) -> RosterResult:
    """Make the roster true in the database. Raises ``RosterRejected`` (the caller must
    roll back) when any line is bad or any change is refused."""
    db = admin.db
    ensure_roles(db)
    planned: RosterPlan = plan(db, parsed)
    if not planned.ok:
        raise RosterRejected(planned.errors)
    result = RosterResult(unchanged=planned.unchanged)
    line = 0
    try:
        missing_classes = set(planned.new_classes)

        def create_classes(names: list[str] | None) -> None:
            # Created at the first line naming them, so a refused name is reported there.
            for name in sorted(set(names or []) & missing_classes):
                admin.create_class(actor, name)
                missing_classes.discard(name)
                result.classes_created.append(name)

        users: dict[str, User] = {}
        for row in planned.create:
            line = row.line
            create_classes(row.classes)
            user = admin.create(actor, login=row.login, display_name=row.display_name, email=row.email,
                                locale=row.locale, roles=row.roles, classes=row.classes)
            code, expires = admin.issue_activation_code(actor, user, reason="roster import")
            users[row.login] = user
            result.codes.append(IssuedCode(user.login, user.display_name, code, expires))
            result.created += 1
        for item in planned.update:
            row, changes = item.row, item.changes
            line = row.line
            found = admin.find_by_login(row.login)
            if found is None:  # pragma: no cover - planned from the same transaction
                raise AccountError("the account disappeared")
            user = found
            users[row.login] = user
            create_classes(row.classes)
            if {"display_name", "email", "locale"} & changes.keys():
                admin.update_profile(actor, user, display_name=row.display_name,
                                     email=row.email if row.has_email else user.email,
                                     locale=row.locale if row.has_locale else user.locale)
            if "roles" in changes:
                admin.set_roles(actor, user, row.roles)
            if "classes" in changes and row.classes is not None:
                admin.set_classes(actor, user, row.classes)
            result.updated += 1
        db.flush()
        for row in planned.create + [u.row for u in planned.update]:
            line = row.line
            for child_login in row.guardian_of or []:
                child = users.get(child_login) or admin.find_by_login(child_login)
                if child is None:  # pragma: no cover - checked by the planner
                    raise AccountError(f"unknown guardian_of login: {child_login}")
                admin.link_guardian(actor, users[row.login], child)
        admin.journal.record(db, actor=actor.ref, action="roster:import:apply", subject=None, ip=actor.ip,
                             request_id=actor.request_id,
                             details={"created": result.created, "updated": result.updated,
                                      "unchanged": result.unchanged, "classes_created": result.classes_created})
    except PermissionDenied as exc:
        raise RosterRejected([LineError(line, f"not allowed: needs the permission {exc.permission}")]) from exc
    except AccountError as exc:
        raise RosterRejected([LineError(line, str(exc))]) from exc
    return result
