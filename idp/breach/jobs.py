"""Escalation of breach cases to the security officer (issue 6, policy 5.2.3).

Tech support has one working day (the case's ``deadline_at``). The security officer is
told twice at most per case: when 75% of that time (counted in support hours, like the
deadline) has passed, and again when the deadline has passed. Each notice is claimed by
a conditional UPDATE of ``escalated_75_at`` / ``escalated_overdue_at`` (so two workers
never send the same one), journalled ``breach:case:escalate`` and queued in the outbox in
the same transaction. ``idp/worker.py`` queues :func:`escalate_breach_cases` once a
minute."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from idp.accounts.models import Role, User
from idp.audit.journal import Journal
from idp.breach.models import BreachCase, BreachCaseStep
from idp.config import Settings
from idp.notify.outbox import Outbox
from idp.workdays.calendar import SCHOOL_TZ, WorkingCalendar, as_aware, load_calendar

log = logging.getLogger("darbaza.breach")

ACTOR = "system:escalation"
OPEN_STATES = ("reported", "contained", "in_review")
# The share of the support time after which the security officer is told.
WARN_SHARE = 0.75
STAGE_75 = "75"
STAGE_OVERDUE = "overdue"
TEMPLATES = {STAGE_75: "breach_escalation_75", STAGE_OVERDUE: "breach_escalation_overdue"}


@dataclass(frozen=True)
class Recipient:
    address: str
    locale: str | None
    name: str


@dataclass(frozen=True)
class Escalation:
    case_id: int
    stage: str
    recipients: int


def _naive(moment: datetime) -> datetime:
    return as_aware(moment).astimezone(UTC).replace(tzinfo=None)


def share_elapsed(calendar: WorkingCalendar, case: BreachCase, now: datetime) -> float:
    """How much of the case's support time has passed at ``now`` (support-hours seconds
    from the report to now over those from the report to the deadline; 1.0 and more at
    or after the deadline)."""
    if as_aware(now) >= as_aware(case.deadline_at):
        return 1.0
    total = calendar.working_seconds_between(case.reported_at, case.deadline_at)
    if total <= 0:
        return 1.0
    return max(0.0, calendar.working_seconds_between(case.reported_at, now)) / total


def security_officers(db: Session, settings: Settings) -> list[Recipient]:
    """IDP_SECURITY_OFFICER_EMAIL, else every active account holding the security_officer
    role that has an e-mail address."""
    if settings.security_officer_email.strip():
        return [Recipient(address=settings.security_officer_email.strip(), locale=None, name="")]
    people = db.scalars(
        select(User).join(User.roles).where(Role.name == "security_officer", User.active.is_(True),
                                            User.email.is_not(None)).order_by(User.id)
    )
    return [Recipient(address=u.email, locale=u.locale, name=u.display_name) for u in people if u.email]


def _local(moment: datetime) -> str:
    return as_aware(moment).astimezone(SCHOOL_TZ).strftime("%Y-%m-%d %H:%M")


def _claim(db: Session, case: BreachCase, stage: str, now: datetime) -> bool:
    column = BreachCase.escalated_overdue_at if stage == STAGE_OVERDUE else BreachCase.escalated_75_at
    values: dict[str, Any] = {column.key: now}
    if stage == STAGE_OVERDUE:
        # An overdue case needs no 75% notice any more.
        values["escalated_75_at"] = case.escalated_75_at or now
    done = db.execute(
        update(BreachCase).where(BreachCase.id == case.id, column.is_(None), BreachCase.state.in_(OPEN_STATES))
        .values(**values).execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return bool(done == 1)


def escalate_due(
    db: Session, *, now: datetime, calendar: WorkingCalendar, settings: Settings, journal: Journal, outbox: Outbox
) -> list[Escalation]:
    """Send the notices that are due at ``now`` (aware; naive is UTC). The caller commits."""
    at = _naive(now)
    cases = list(db.scalars(
        select(BreachCase).where(BreachCase.state.in_(OPEN_STATES), BreachCase.escalated_overdue_at.is_(None))
        .order_by(BreachCase.deadline_at, BreachCase.id)
    ))
    sent: list[Escalation] = []
    recipients: list[Recipient] | None = None
    for case in cases:
        if at >= case.deadline_at:
            stage = STAGE_OVERDUE
        elif case.escalated_75_at is None and share_elapsed(calendar, case, now) >= WARN_SHARE:
            stage = STAGE_75
        else:
            continue
        if not _claim(db, case, stage, at):
            continue
        if recipients is None:
            recipients = security_officers(db, settings)
        left = max(0.0, calendar.working_seconds_between(now, case.deadline_at))
        context = {
            "case_number": case.number,
            "account": case.user.login if case.user is not None else (case.login_given or "—"),
            "reported_at": _local(case.reported_at),
            "deadline_at": _local(case.deadline_at),
            "case_url": f"{settings.issuer}/admin/cases/{case.id}",
        }
        if stage == STAGE_75:
            context["hours_left"] = f"{left / 3600:.1f}"
        for person in recipients:
            outbox.enqueue(db, template=TEMPLATES[stage], to=person.address, locale=person.locale, context=context)
        db.add(BreachCaseStep(case_id=case.id, at=at, actor=ACTOR, action="escalate", note="",
                              details={"stage": stage, "recipients": len(recipients)}))
        journal.record(db, actor=ACTOR, action="breach:case:escalate",
                       subject=f"user:{case.user_id}" if case.user_id else None,
                       details={"case": case.number, "stage": stage, "recipients": len(recipients),
                                "deadline_at": case.deadline_at.isoformat() + "Z"})
        if not recipients:
            log.warning("breach case %s is %s but no security officer has an e-mail address "
                        "(set IDP_SECURITY_OFFICER_EMAIL)", case.number, stage)
        sent.append(Escalation(case_id=case.id, stage=stage, recipients=len(recipients)))
    return sent


def escalate_breach_cases() -> int:
    """RQ job: escalate what is due now, with the settings of the environment (its own
    engine, like the other jobs in RQ's forked process)."""
    from idp.db import Database
    from idp.notify.jobs import build_outbox

    settings = Settings.from_env()
    database = Database(settings.database_url, pool_size=1)
    try:
        with database.factory() as db:
            sent = escalate_due(db, now=datetime.now(UTC), calendar=load_calendar(db, settings), settings=settings,
                                journal=Journal(), outbox=build_outbox(settings))
            db.commit()
    finally:
        database.dispose()
    for item in sent:
        log.info("breach case %d escalated (%s) to %d recipient(s)", item.case_id, item.stage, item.recipients)
    return len(sent)
