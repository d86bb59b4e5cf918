"""Personal-data retention (issue 9): sign-in events older than
IDP_SIGNIN_EVENT_RETENTION_DAYS are redacted in the audit journal and the chain still
verifies; breach cases closed longer than IDP_CLOSED_CASE_RETENTION_DAYS go, with
their journal events redacted; an edit of a redacted or an unredacted row is still
found. Tests share the database with others: every assertion is about this test's rows."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from idp.accounts.models import User
from idp.audit.journal import REDACTED_ACTOR, row_hash
from idp.audit.models import AuditEvent
from idp.breach import service as breach_service
from idp.breach.models import BreachCase, BreachCaseStep
from idp.prune import apply_retention
from tests.integration.test_cli import run

DAYS = 365


def now_utc() -> datetime:
    return datetime.now(UTC)


def write(server, action: str, *, days_ago: float, subject: str, **extra: Any) -> int:  # type: ignore[no-untyped-def]
    """One journal event at a time in the past (``Journal.record(occurred_at=...)``)."""
    with server.services.db.transaction() as session:
        event = server.services.journal.record(
            session, actor=extra.pop("actor", subject), action=action, subject=subject, ip="10.1.2.3",
            request_id=secrets.token_hex(8), occurred_at=now_utc() - timedelta(days=days_ago),
            reason=extra.pop("reason", None), details=extra or {"device": "Firefox on Linux"},
        )
        session.flush()
        return event.id


def row(server, event_id: int) -> AuditEvent:  # type: ignore[no-untyped-def]
    with server.services.db.transaction() as session:
        event = session.get(AuditEvent, event_id)
        assert event is not None
        session.expunge(event)
        return event


def verify(server) -> Any:  # type: ignore[no-untyped-def]
    return run(server, "audit", "verify")


def tampered(server, event_id: int, **values: Any) -> str:  # type: ignore[no-untyped-def]
    """Change one row, run `darbaza audit verify`, put the row back; the verify output."""
    table = AuditEvent.__table__
    with server.services.db.transaction() as session:
        before = dict(session.execute(select(*[table.c[c] for c in values]).where(table.c.id == event_id)).one()._mapping)
    try:
        with server.services.db.transaction() as session:
            session.execute(table.update().where(table.c.id == event_id).values(**values))
        result = verify(server)
        assert result.exit_code == 1, result.output
        return str(result.output)
    finally:
        with server.services.db.transaction() as session:
            session.execute(table.update().where(table.c.id == event_id).values(**before))


def test_old_sign_in_events_are_redacted_and_the_chain_still_verifies(server, make_user):
    subject = f"user:{make_user().id}"
    old_success = write(server, "account:login:success", days_ago=DAYS + 5, subject=subject)
    old_failure = write(server, "account:login:failure", days_ago=DAYS + 1, subject=subject, actor="anonymous",
                        reason="wrong-password")
    recent = write(server, "account:login:success", days_ago=DAYS - 1, subject=subject)
    old_other = write(server, "account:password:change", days_ago=DAYS + 5, subject=subject)
    before = {i: row(server, i) for i in (old_success, old_failure, recent, old_other)}

    result = run(server, "prune")
    assert result.exit_code == 0, result.output
    assert "redacted" in result.output and "sign-in events" in result.output

    for event_id in (old_success, old_failure):
        after, was = row(server, event_id), before[event_id]
        assert after.actor == REDACTED_ACTOR and after.subject is None and after.ip is None
        assert after.reason is None and after.request_id is None and after.details == {}
        assert after.redacted_at is not None
        # What the chain hashes is kept: the row still proves the event happened then.
        assert (after.seq, after.action, after.occurred_at, after.hash, after.prev_hash, after.content_hash) == (
            was.seq, was.action, was.occurred_at, was.hash, was.prev_hash, was.content_hash)
    for event_id in (recent, old_other):
        after, was = row(server, event_id), before[event_id]
        assert after.redacted_at is None and after.actor == was.actor and after.ip == "10.1.2.3"
        assert after.details == was.details
    checked = verify(server)
    assert checked.exit_code == 0 and "intact" in checked.output, checked.output
    with server.services.db.transaction() as session:
        runs = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "data:retention:redact",
                                                             AuditEvent.id > old_other)))
    assert runs and any(r.details["sign_in_events_redacted"] >= 2 for r in runs)


def test_edits_of_redacted_and_unredacted_rows_are_still_found(server, make_user):
    subject = f"user:{make_user().id}"
    old = write(server, "account:login:success", days_ago=DAYS + 3, subject=subject)
    kept = write(server, "account:login:failure", days_ago=1, subject=subject, actor="anonymous")
    assert run(server, "prune").exit_code == 0
    redacted = row(server, old)
    assert redacted.redacted_at is not None
    seq_old, seq_kept = redacted.seq, row(server, kept).seq

    # A redacted row: its kept fields, and its blanked content, are covered.
    assert f"row {seq_old} was edited" in tampered(server, old, action="account:login:failure")
    assert f"row {seq_old} was edited" in tampered(server, old,
                                                   occurred_at=redacted.occurred_at + timedelta(seconds=1))
    assert f"row {seq_old} was edited" in tampered(server, old, actor="user:1")
    assert f"row {seq_old} was edited" in tampered(server, old, ip="10.9.9.9")
    # A row that is not redacted: its personal content is covered by its content hash.
    assert f"row {seq_kept} was edited" in tampered(server, kept, ip="10.9.9.9")
    assert f"row {seq_kept} was edited" in tampered(server, kept, actor="user:1")
    # Blanking a row that retention may not redact (it is not a sign-in) is found too.
    other = write(server, "account:password:change", days_ago=DAYS + 3, subject=subject)
    seq_other = row(server, other).seq
    assert f"row {seq_other} was edited" in tampered(
        server, other, actor=REDACTED_ACTOR, subject=None, reason=None, ip=None, request_id=None, details={},
        redacted_at=datetime(2026, 1, 1))
    assert verify(server).exit_code == 0


def test_v2_row_hash_covers_the_content_through_its_hash(server, make_user):
    subject = f"user:{make_user().id}"
    event = row(server, write(server, "account:login:success", days_ago=0, subject=subject))
    assert event.content_hash and len(event.content_hash) == 64
    assert row_hash(event) == event.hash
    event.ip = "10.0.0.99"
    assert row_hash(event) == event.hash  # the row hash holds the content hash, not the content


def _case(server, user_id: int, *, resolved_days_ago: float | None) -> tuple[int, str, list[int]]:  # type: ignore[no-untyped-def]
    """A case through the reports service (journalled), resolved that long ago, or open."""
    svc = server.services
    with svc.db.transaction() as session:
        user = session.get(User, user_id)
        case = breach_service.open_case(session, user=user, door="account", category="other",
                                        description="someone used my account " + secrets.token_hex(3),
                                        noticed_at=None, contact=None, login_given=None, ip="127.0.0.1",
                                        actor=f"user:{user_id}", svc=svc)
        if resolved_days_ago is not None:
            breach_service.step(session, case, actor="user:1", action="resolve", note="false alarm", svc=svc,
                                state="resolved", outcome="false_alarm")
        session.flush()
        case_id, number = case.id, case.number
    with svc.db.transaction() as session:
        if resolved_days_ago is not None:
            session.execute(BreachCase.__table__.update().where(BreachCase.id == case_id).values(
                resolved_at=(now_utc() - timedelta(days=resolved_days_ago)).replace(tzinfo=None)))
        ids = [e.id for e in session.scalars(select(AuditEvent).where(AuditEvent.action.like("breach:case:%"),
                                                                     AuditEvent.subject == f"user:{user_id}"))
               if e.details.get("case") == number]
    assert ids
    return case_id, number, ids


def test_closed_cases_older_than_the_window_go_open_and_recent_ones_stay(server, make_user):
    window = server.services.settings.closed_case_retention_days
    old_id, _old_number, old_events = _case(server, make_user().id, resolved_days_ago=window + 10)
    recent_id, _n, recent_events = _case(server, make_user().id, resolved_days_ago=window - 10)
    open_id, _n, open_events = _case(server, make_user().id, resolved_days_ago=None)
    with server.services.db.transaction() as session:  # an open case reported long ago stays anyway
        session.execute(BreachCase.__table__.update().where(BreachCase.id == open_id).values(
            reported_at=(now_utc() - timedelta(days=window + 400)).replace(tzinfo=None)))

    dry = run(server, "prune", "--dry-run")
    assert dry.exit_code == 0 and "would delete" in dry.output, dry.output
    with server.services.db.transaction() as session:
        assert session.get(BreachCase, old_id) is not None  # a dry run changes nothing

    result = run(server, "prune")
    assert result.exit_code == 0, result.output
    with server.services.db.transaction() as session:
        assert session.get(BreachCase, old_id) is None
        assert not list(session.scalars(select(BreachCaseStep).where(BreachCaseStep.case_id == old_id)))
        assert session.get(BreachCase, recent_id) is not None and session.get(BreachCase, open_id) is not None
        assert list(session.scalars(select(BreachCaseStep).where(BreachCaseStep.case_id == recent_id)))
    for event_id in old_events:
        event = row(server, event_id)
        assert event.redacted_at is not None and event.actor == REDACTED_ACTOR and event.details == {}
        assert event.action.startswith("breach:case:")
    for event_id in recent_events + open_events:
        event = row(server, event_id)
        assert event.redacted_at is None and event.details.get("case")
    assert verify(server).exit_code == 0


def test_a_run_with_nothing_to_do_journals_nothing(server):
    marker_days = 100_000 + secrets.randbelow(1000)  # nothing is that old; identifies this run's event
    report = apply_retention(server.services.db.factory, server.services.journal, signin_days=marker_days,
                             case_days=0)
    assert report.total == 0 and report.complete
    with server.services.db.transaction() as session:
        runs = [e for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "data:retention:redact"))
                if e.details.get("signin_event_retention_days") == marker_days]
    assert runs == []


def test_the_worker_job_applies_the_retention_settings(server, make_user, database_url, redis_url, monkeypatch):
    from idp.prune import prune_job
    from tests.conftest import TEST_SECRET_KEY

    for name, value in (("DATABASE_URL", database_url), ("REDIS_URL", redis_url), ("SECRET_KEY", TEST_SECRET_KEY),
                        ("SIGNIN_EVENT_RETENTION_DAYS", "30")):
        monkeypatch.setenv(f"IDP_{name}", value)
    subject = f"user:{make_user().id}"
    month_old = write(server, "account:login:success", days_ago=31, subject=subject)
    fresh = write(server, "account:reauth:success", days_ago=29, subject=subject)
    result = prune_job()
    assert result["sign_in_events_redacted"] >= 1, result
    assert row(server, month_old).redacted_at is not None
    assert row(server, fresh).redacted_at is None
    assert verify(server).exit_code == 0
