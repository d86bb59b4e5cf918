"""Deleting rows nobody can use any more (docs/capacity.md, "Gaps found" 1 and 5).

What goes, and when (``now`` is the database time of the run, in seconds):

- ``access_tokens`` expired more than ``TOKEN_GRACE`` (1 h) ago. An expired access token
  is refused everywhere already; the grace keeps its row for a while so that
  introspection of a just-expired token still finds it (and answers ``active: false``
  for the right reason) and a server whose clock lags a little never misses a row.
- ``refresh_tokens`` of a family whose absolute lifetime (``expires_at``, the same on
  every token of a family: rotation copies it) ended more than ``TOKEN_GRACE`` ago —
  used, revoked and unused ones alike. A token of a family that is still alive is never
  deleted, used or not: presenting a used token again must still find it and revoke the
  family (rotation with reuse detection, idp/oidc/server.py). After the family's expiry
  a replay is refused as expired anyway, before reuse detection is asked.
- ``authorization_codes`` expired more than ``CODE_GRACE`` (1 day) ago. Codes are kept
  marked used after their exchange so that a replay revokes the tokens issued from them;
  a code lives 60 s, a replay a day later is refused (unknown code) without that.
- ``outbox_messages`` sent, and ``backchannel_logout_deliveries`` delivered, more than
  ``IDP_DELIVERED_RETENTION_DAYS`` ago, and those given up (``failed``) whose last try
  was that long ago. Pending (and in-flight) rows are never deleted.

Personal-data retention (:func:`apply_retention`, Kyrgyz law on personal information):

- sign-in events in the audit journal (actions ``account:login:*``, ``account:reauth:*``,
  ``account:session:*``) older than ``IDP_SIGNIN_EVENT_RETENTION_DAYS`` are *redacted*,
  not deleted: a deleted row would break the hash chain. Redaction blanks the row's
  personal content (actor, subject, reason, IP, request id, details) and keeps what the
  chain hashes (sequence, time, action, previous hash and the hash of the content): see
  idp/audit/journal.py. Only rows written since migration 0013 ("v2") can be redacted;
  older rows stay as they are (their hash covers the content itself, and hashes are
  never rewritten).
- breach cases resolved more than ``IDP_CLOSED_CASE_RETENTION_DAYS`` ago are deleted with
  their steps (nothing else references them), and their journal events
  (``breach:case:*`` with ``details.case`` = the case number) redacted. Open cases are
  never touched, whatever their age.

A retention run that did anything journals one ``data:retention:redact`` event with the
counts (the worker's runs too: it happens rarely, once a day's events come of age, and
is itself an action on personal data); a run with nothing to do journals nothing.

Each batch (``BATCH_SIZE`` rows) is one short DELETE in its own transaction, so no run
holds locks for long; the tables take turns, one batch each, until nothing is left or the
time bound is reached (the next run goes on). ``DELETE ... WHERE id IN (SELECT id ...
LIMIT n)`` works on SQLite and PostgreSQL.

The worker runs :func:`prune_job` every 10 minutes (idp/worker.py) and only logs the
deletion counts: a journal event every ten minutes would say nothing about security and
bury the events that do. ``darbaza prune`` (an operator's action) journals
``data:retention:prune``. Both then run :func:`apply_retention` in the time that is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from idp.audit.journal import SIGN_IN_PREFIXES, Journal, redactable_condition
from idp.audit.models import AuditEvent
from idp.breach.models import BreachCase, BreachCaseStep
from idp.config import Settings
from idp.db import Database
from idp.delivery_queue import naive_utc
from idp.notify.models import OutboxMessage
from idp.oidc.models import AccessToken, AuthorizationCode, BackchannelLogoutDelivery, RefreshToken

log = logging.getLogger("darbaza.prune")

# Rows per DELETE statement (one transaction each).
BATCH_SIZE = 5000
# How long one run may go on deleting before it leaves the rest to the next one (seconds).
TIME_LIMIT = 300.0
# An access token's row stays this long after it expired (introspection, clock skew), and
# a refresh token's after its family's absolute expiry.
TOKEN_GRACE = 3600
# A used or expired authorization code stays this long after its expiry (replays revoke).
CODE_GRACE = 86400

TABLES = (
    "access_tokens",
    "refresh_tokens",
    "authorization_codes",
    "outbox_messages",
    "backchannel_logout_deliveries",
)


@dataclass
class PruneReport:
    """Rows deleted (or, with ``dry_run``, that would be) per table; ``complete`` is false
    when the time bound stopped the run with rows left."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    dry_run: bool = False
    complete: bool = True

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{table} {count}" for table, count in self.counts.items())


@dataclass(frozen=True)
class _Target:
    table: str
    model: Any
    key: Any
    condition: ColumnElement[bool]


def _targets(now: int, retention_days: int) -> list[_Target]:
    token_cutoff = now - TOKEN_GRACE
    code_cutoff = now - CODE_GRACE
    kept_since = naive_utc(datetime.fromtimestamp(now, UTC)) - timedelta(days=max(0, retention_days))
    # Every token of a family shares its expiry; the NOT EXISTS keeps a whole family should
    # one of its rows say otherwise (reuse detection needs its used tokens while it lives).
    sibling = aliased(RefreshToken)
    family_alive = exists().where(sibling.family_id == RefreshToken.family_id, sibling.expires_at >= token_cutoff)
    return [
        _Target("access_tokens", AccessToken, AccessToken.jti, AccessToken.expires_at < token_cutoff),
        _Target("refresh_tokens", RefreshToken, RefreshToken.id, and_(RefreshToken.expires_at < token_cutoff, ~family_alive)),
        _Target("authorization_codes", AuthorizationCode, AuthorizationCode.id, AuthorizationCode.expires_at < code_cutoff),
        _Target(
            "outbox_messages",
            OutboxMessage,
            OutboxMessage.id,
            or_(
                and_(OutboxMessage.status == "sent", OutboxMessage.sent_at < kept_since),
                # A failed message keeps the lease end of its last try in next_attempt_at.
                and_(OutboxMessage.status == "failed", OutboxMessage.next_attempt_at < kept_since),
            ),
        ),
        _Target(
            "backchannel_logout_deliveries",
            BackchannelLogoutDelivery,
            BackchannelLogoutDelivery.id,
            or_(
                and_(BackchannelLogoutDelivery.status == "delivered", BackchannelLogoutDelivery.delivered_at < kept_since),
                and_(BackchannelLogoutDelivery.status == "failed", BackchannelLogoutDelivery.next_attempt_at < kept_since),
            ),
        ),
    ]


def _delete_batch(factory: Callable[[], Session], target: _Target, batch_size: int) -> int:
    # Not correlated to the DELETE: the subquery reads the table on its own.
    chosen = select(target.key).where(target.condition).limit(batch_size).correlate(None).scalar_subquery()
    with factory() as session:
        result = session.execute(delete(target.model).where(target.key.in_(chosen)))
        deleted = int(result.rowcount)  # type: ignore[attr-defined]
        session.commit()
    return deleted


def _count(factory: Callable[[], Session], target: _Target) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(target.model).where(target.condition)) or 0)


def prune(
    factory: Callable[[], Session],
    *,
    retention_days: int,
    dry_run: bool = False,
    now: int | None = None,
    batch_size: int = BATCH_SIZE,
    time_limit: float = TIME_LIMIT,
) -> PruneReport:
    """Delete what can no longer be used (see the module's docstring), a batch per table in
    turn; with ``dry_run`` only count it."""
    now = int(time.time()) if now is None else now
    targets = _targets(now, retention_days)
    report = PruneReport(dry_run=dry_run)
    if dry_run:
        for target in targets:
            report.counts[target.table] = _count(factory, target)
        return report
    deadline = time.monotonic() + time_limit
    pending = list(targets)
    while pending:
        for target in list(pending):
            if time.monotonic() >= deadline:
                report.complete = False
                return report
            deleted = _delete_batch(factory, target, batch_size)
            report.counts[target.table] += deleted
            if deleted < batch_size:
                pending.remove(target)
    return report


# Cases per transaction: each takes a query of its journal events.
CASE_BATCH_SIZE = 200
RETENTION_ACTOR = "system:retention"


@dataclass
class RetentionReport:
    """What personal-data retention did (or, with ``dry_run``, would do)."""

    sign_in_events: int = 0
    cases_deleted: int = 0
    case_events: int = 0
    dry_run: bool = False
    complete: bool = True

    @property
    def total(self) -> int:
        return self.sign_in_events + self.cases_deleted + self.case_events

    def counts(self) -> dict[str, int]:
        return {"sign_in_events_redacted": self.sign_in_events, "closed_cases_deleted": self.cases_deleted,
                "case_events_redacted": self.case_events}


def _cutoff(now: datetime, days: int) -> datetime | None:
    return None if days <= 0 else now - timedelta(days=days)


def _sign_in_condition(cutoff: datetime) -> ColumnElement[bool]:
    return and_(redactable_condition(SIGN_IN_PREFIXES), AuditEvent.occurred_at < cutoff)


def _case_condition(cutoff: datetime) -> ColumnElement[bool]:
    return and_(BreachCase.state == "resolved", BreachCase.resolved_at.is_not(None), BreachCase.resolved_at < cutoff)


def case_event_ids(session: Session, case: BreachCase) -> list[int]:
    """The journal rows of ``case`` that can still be redacted: ``breach:case:*`` rows
    about its account (or about nobody) whose details name the case, since it was reported."""
    subject = f"user:{case.user_id}" if case.user_id is not None else None
    rows = session.execute(
        select(AuditEvent.id, AuditEvent.details).where(
            redactable_condition(("breach:case:",)),
            AuditEvent.subject == subject if subject else AuditEvent.subject.is_(None),
            AuditEvent.occurred_at >= case.reported_at - timedelta(days=1),
        )
    )
    return [row_id for row_id, details in rows if isinstance(details, dict) and details.get("case") == case.number]


def apply_retention(
    factory: Callable[[], Session],
    journal: Journal,
    *,
    signin_days: int,
    case_days: int,
    actor: str = RETENTION_ACTOR,
    dry_run: bool = False,
    now: datetime | None = None,
    batch_size: int = BATCH_SIZE,
    time_limit: float = TIME_LIMIT,
) -> RetentionReport:
    """Redact old sign-in events and delete old closed cases (see the module's
    docstring), a batch per transaction until done or ``time_limit``; journal the counts
    once when anything was done."""
    moment = naive_utc(now or datetime.now(UTC))
    signin_cutoff, case_cutoff = _cutoff(moment, signin_days), _cutoff(moment, case_days)
    report = RetentionReport(dry_run=dry_run)
    if dry_run:
        with factory() as session:
            if signin_cutoff is not None:
                report.sign_in_events = int(session.scalar(
                    select(func.count()).select_from(AuditEvent).where(_sign_in_condition(signin_cutoff))) or 0)
            if case_cutoff is not None:
                cases = list(session.scalars(select(BreachCase).where(_case_condition(case_cutoff))))
                report.cases_deleted = len(cases)
                report.case_events = sum(len(case_event_ids(session, case)) for case in cases)
        return report
    deadline = time.monotonic() + time_limit
    while signin_cutoff is not None:
        if time.monotonic() >= deadline:
            report.complete = False
            break
        with factory() as session:
            ids = list(session.scalars(
                select(AuditEvent.id).where(_sign_in_condition(signin_cutoff)).order_by(AuditEvent.id).limit(batch_size)))
            report.sign_in_events += journal.redact(session, ids, now=moment)
            session.commit()
        if len(ids) < batch_size:
            break
    while case_cutoff is not None and report.complete:
        if time.monotonic() >= deadline:
            report.complete = False
            break
        with factory() as session:
            cases = list(session.scalars(
                select(BreachCase).where(_case_condition(case_cutoff)).order_by(BreachCase.id).limit(CASE_BATCH_SIZE)))
            for case in cases:
                report.case_events += journal.redact(session, case_event_ids(session, case), now=moment)
            ids = [case.id for case in cases]
            if ids:
                # Explicitly: SQLite enforces ON DELETE CASCADE only with foreign keys on.
                session.execute(delete(BreachCaseStep).where(BreachCaseStep.case_id.in_(ids)))
                session.execute(delete(BreachCase).where(BreachCase.id.in_(ids)))
            report.cases_deleted += len(ids)
            session.commit()
        if len(cases) < CASE_BATCH_SIZE:
            break
    if report.total:
        with factory() as session:
            journal.record(session, actor=actor, action="data:retention:redact", details={
                **report.counts(), "complete": report.complete,
                "signin_event_retention_days": signin_days, "closed_case_retention_days": case_days,
            })
            session.commit()
    return report


def prune_job() -> dict[str, int]:
    """RQ job (idp/worker.py, every 10 minutes): one pruning run with the settings of the
    environment, then personal-data retention in the time left. Like the other jobs it
    builds its own database engine in RQ's forked process. Deletions are logged, not
    journalled; retention journals its counts when it did something (see the module's
    docstring)."""
    settings = Settings.from_env()
    database = Database(settings.database_url, pool_size=1)
    started = time.monotonic()
    try:
        report = prune(database.factory, retention_days=settings.delivered_retention_days)
        retained = apply_retention(
            database.factory, Journal(), signin_days=settings.signin_event_retention_days,
            case_days=settings.closed_case_retention_days,
            time_limit=max(1.0, TIME_LIMIT - (time.monotonic() - started)),
        )
    finally:
        database.dispose()
    if report.total:
        log.info("pruned %s%s", report.summary(), "" if report.complete else " (time bound reached, more left)")
    if retained.total:
        log.info("retention: %s%s", retained.counts(), "" if retained.complete else " (time bound reached, more left)")
    return {**report.counts, **retained.counts()}
