"""Applying a roster plan through ``AccountAdmin`` (its validation, permissions and
journal), in the caller's transaction: on any error the caller rolls everything back.

Accounts created here get ``source = "roster"``. Roster accounts missing from the file
are disabled (``active`` off, ``source_disabled_at`` set, every session and token ended,
journalled ``roster:account:disable``); a roster account the roster disabled that is in
the file again is re-enabled (``roster:account:enable``). See ``planner`` for which
accounts the roster manages and for the mass-disable guard."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from connectors.roster.parser import LineError, ParsedRoster
from connectors.roster.planner import MASS_DISABLE_MIN, ROSTER_SOURCE, RosterPlan, plan
from idp.accounts.admin import AccountAdmin, Actor, PermissionDenied
from idp.accounts.models import User
from idp.accounts.service import AccountError, ensure_roles

ROSTER_ACTOR = "cli:roster"
# Disabling and re-enabling roster accounts is part of managing accounts.
_WRITE = "admin:users:write"


class RosterRejected(Exception):
    """The roster has bad lines (or a change was refused); nothing was changed."""

    def __init__(self, errors: list[LineError]) -> None:
        super().__init__("; ".join(f"line {e.line}: {e.reason}" for e in errors))
        self.errors = errors


class MassDisableRefused(Exception):
    """The import would disable more than half of the roster accounts and the operator
    did not allow it explicitly; nothing was changed."""

    def __init__(self, planned: RosterPlan) -> None:
        super().__init__(
            f"the import would disable {len(planned.disable)} of {planned.roster_active} roster accounts "
            f"(more than half, and more than {MASS_DISABLE_MIN}); is the file complete?"
        )
        self.plan = planned


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
    disabled: int = 0
    enabled: int = 0  # re-enabled accounts, also counted in ``updated``
    disabled_logins: list[str] = field(default_factory=list)
    classes_created: list[str] = field(default_factory=list)
    codes: list[IssuedCode] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def apply(admin: AccountAdmin, actor: Actor, parsed: ParsedRoster, *, allow_mass_disable: bool = False) -> RosterResult:
    """Make the roster true in the database. Raises ``RosterRejected`` (the caller must
    roll back) when any line is bad or any change is refused, and ``MassDisableRefused``
    (before changing anything) when the plan is a mass disable not explicitly allowed."""
    db = admin.db
    ensure_roles(db)
    planned: RosterPlan = plan(db, parsed)
    if not planned.ok:
        raise RosterRejected(planned.errors)
    if planned.mass_disable and not allow_mass_disable:
        raise MassDisableRefused(planned)
    result = RosterResult(unchanged=planned.unchanged)
    line = 0

    def record(action: str, user: User, reason: str, **details: object) -> None:
        admin.journal.record(db, actor=actor.ref, action=action, subject=f"user:{user.id}", reason=reason,
                             ip=actor.ip, request_id=actor.request_id, details={"login": user.login, **details})

    try:
        if (planned.disable or planned.enable) and _WRITE not in actor.permissions:
            raise PermissionDenied(_WRITE)
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
            user.source = ROSTER_SOURCE
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
            if "active" in changes:
                # Disabled by the roster earlier (never by an administrator: the planner checked).
                user.active = True
                user.source_disabled_at = None
                record("roster:account:enable", user, "listed in the roster again")
                result.enabled += 1
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
        # Last, once nothing else can fail: ending sessions also reaches Redis, which a
        # rollback does not undo.
        line = 0
        now = _now()
        for planned_disable in planned.disable:
            gone = admin.get(planned_disable.user_id)
            if gone is None or gone.source != ROSTER_SOURCE or not gone.active:  # pragma: no cover - same transaction
                continue
            gone.active = False
            gone.source_disabled_at = now
            ended = admin.sessions.end_all(db, gone.id, reason="roster-disabled", actor=actor.ref)
            record("roster:account:disable", gone, "missing from the roster", sessions_ended=ended)
            result.disabled += 1
            result.disabled_logins.append(gone.login)
        admin.journal.record(db, actor=actor.ref, action="roster:import:apply", subject=None, ip=actor.ip,
                             request_id=actor.request_id,
                             details={"created": result.created, "updated": result.updated,
                                      "unchanged": result.unchanged, "disabled": result.disabled,
                                      "enabled": result.enabled, "classes_created": result.classes_created,
                                      "mass_disable_allowed": bool(planned.mass_disable and allow_mass_disable)})
    except PermissionDenied as exc:
        raise RosterRejected([LineError(line, f"not allowed: needs the permission {exc.permission}")]) from exc
    except AccountError as exc:
        raise RosterRejected([LineError(line, str(exc))]) from exc
    return result
