"""`darbaza workdays`: the support deadline from the calendar in the database (policy 5.2.3),
and changing the school's days off and working days, run the way an operator runs it.

The overrides here are in 2031, far from the dates other tests use, and removed again."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest
from click.testing import CliRunner
from sqlalchemy import delete, select

from idp.audit.models import AuditEvent
from idp.breach.models import BreachCase, BreachCaseStep
from idp.cli import main
from idp.workdays.models import CalendarDay

DAYS = ("2031-02-28", "2031-03-01", "2031-03-03", "2031-03-04")


def run(server, *args: str, **extra_env: str):  # type: ignore[no-untyped-def]
    settings = server.services.settings
    env = {**extra_env,
        "IDP_DATABASE_URL": settings.database_url,
        "IDP_REDIS_URL": settings.redis_url,
        "IDP_SECRET_KEY": settings.secret_key,
        "IDP_ISSUER": settings.issuer,
    }
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def last_line(result) -> str:  # type: ignore[no-untyped-def]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def clean_2031(server) -> Iterator[None]:  # type: ignore[no-untyped-def]
    def clean() -> None:
        with server.services.db.transaction() as session:
            session.execute(delete(CalendarDay).where(CalendarDay.day.in_(
                [datetime.fromisoformat(d).date() for d in DAYS])))
    clean()
    yield
    clean()


@pytest.mark.parametrize(("reported", "deadline"), [
    ("2026-11-20T17:30:00+06:00", "2026-11-23T17:30:00+06:00"),  # Friday evening -> Monday
    ("2026-11-21T11:00+06:00", "2026-11-23T18:00:00+06:00"),  # Saturday -> Monday's closing
    ("2026-11-20T11:30:00Z", "2026-11-23T17:30:00+06:00"),  # the same Friday moment in UTC
    ("2026-11-20T06:30:00-05:00", "2026-11-23T17:30:00+06:00"),  # ... and in New York
    ("2026-11-20T17:30", "2026-11-23T17:30:00+06:00"),  # no offset: Asia/Bishkek
    ("2026-04-30T17:00+06:00", "2026-05-11T17:00:00+06:00"),  # the 1-9 May holidays
    ("2026-12-31T17:00+06:00", "2027-01-08T17:00:00+06:00"),  # New Year and Christmas
])
def test_deadline_prints_iso_in_bishkek_as_last_line(server, reported: str, deadline: str) -> None:
    result = run(server, "workdays", "deadline", reported)
    assert result.exit_code == 0, result.output
    assert last_line(result) == deadline


def test_deadline_follows_the_support_hours_settings(server) -> None:
    result = run(server, "workdays", "deadline", "2026-11-20T12:30+06:00",
                 IDP_SUPPORT_OPENS="08:30", IDP_SUPPORT_CLOSES="13:00")
    assert result.exit_code == 0, result.output
    assert "08:30-13:00" in result.output
    assert last_line(result) == "2026-11-23T12:30:00+06:00"
    assert last_line(run(server, "workdays", "deadline", "2026-11-20T13:30+06:00",
                         IDP_SUPPORT_OPENS="08:30", IDP_SUPPORT_CLOSES="13:00")) == "2026-11-23T13:00:00+06:00"


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01T10:00", "2026-11-20T25:00+06:00", ""])
def test_deadline_refuses_bad_input_with_exit_2(server, bad: str) -> None:
    result = run(server, "workdays", "deadline", bad)
    assert result.exit_code == 2
    assert "is not an ISO 8601 time" in result.stderr
    assert "Traceback" not in result.output


def test_deadline_uses_the_calendar_in_the_database_and_changes_are_journalled(server, clean_2031) -> None:
    friday = "2031-02-28T17:30+06:00"
    assert last_line(run(server, "workdays", "deadline", friday)) == "2031-03-03T17:30:00+06:00"

    off = run(server, "workdays", "add-day-off", "2031-03-03", "--note", "school anniversary")
    assert off.exit_code == 0, off.output
    assert last_line(run(server, "workdays", "deadline", friday)) == "2031-03-04T17:30:00+06:00"

    working = run(server, "workdays", "add-working-day", "2031-03-01", "--note", "worked for 3 March")
    assert working.exit_code == 0, working.output
    assert last_line(run(server, "workdays", "deadline", friday)) == "2031-03-01T17:30:00+06:00"

    listing = run(server, "workdays", "list")
    assert "2031-03-03 off      school anniversary" in listing.output
    assert "2031-03-01 working  worked for 3 March" in listing.output

    assert run(server, "workdays", "remove", "2031-03-01").exit_code == 0
    assert run(server, "workdays", "remove", "2031-03-03", "--note", "cancelled").exit_code == 0
    assert last_line(run(server, "workdays", "deadline", friday)) == "2031-03-03T17:30:00+06:00"

    with server.services.db.transaction() as session:
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.subject.in_(
            ["day:2031-03-03", "day:2031-03-01"])).order_by(AuditEvent.seq)))
        seen = [(e.action, e.subject, e.details.get("kind"), e.reason) for e in events[-4:]]
    assert seen == [
        ("calendar:day:add", "day:2031-03-03", "off", "school anniversary"),
        ("calendar:day:add", "day:2031-03-01", "working", "worked for 3 March"),
        ("calendar:day:remove", "day:2031-03-01", "working", None),
        ("calendar:day:remove", "day:2031-03-03", "off", "cancelled"),
    ]
    assert all(e.actor.startswith("cli") for e in events)


def test_calendar_changes_recompute_deadlines_of_open_cases_only(server, clean_2031) -> None:
    reported = datetime(2031, 2, 28, 11, 30)  # Friday 17:30 in Bishkek, naive UTC as stored
    monday, tuesday = datetime(2031, 3, 3, 11, 30), datetime(2031, 3, 4, 11, 30)
    with server.services.db.transaction() as session:
        cases = [BreachCase(door="account", category="other", reported_at=reported, deadline_at=monday, state=state)
                 for state in ("reported", "in_review", "resolved")]
        session.add_all(cases)
        session.flush()
        ids = [c.id for c in cases]
    try:
        assert run(server, "workdays", "add-day-off", "2031-03-03", "--note", "x").exit_code == 0
        with server.services.db.transaction() as session:
            deadlines = [session.get(BreachCase, i).deadline_at for i in ids]  # type: ignore[union-attr]
            steps = list(session.scalars(select(BreachCaseStep).where(BreachCaseStep.case_id == ids[0])))
        assert deadlines == [tuesday, tuesday, monday]
        assert [(s.action, s.details["to"]) for s in steps] == [("deadline:recompute", "2031-03-04T11:30:00Z")]

        assert run(server, "workdays", "remove", "2031-03-03").exit_code == 0
        with server.services.db.transaction() as session:
            deadlines = [session.get(BreachCase, i).deadline_at for i in ids]  # type: ignore[union-attr]
        assert deadlines == [monday, monday, monday]
    finally:
        with server.services.db.transaction() as session:
            session.execute(delete(BreachCaseStep).where(BreachCaseStep.case_id.in_(ids)))
            session.execute(delete(BreachCase).where(BreachCase.id.in_(ids)))


@pytest.mark.parametrize("args", [
    ("add-day-off", "2031-02-30"),
    ("add-working-day", "next monday"),
    ("remove", "2031-03-04"),  # has no override
    ("add-day-off", "2031-03-04", "--note", "x" * 300),
])
def test_changes_refuse_bad_input_with_exit_2(server, clean_2031, args: tuple[str, ...]) -> None:
    result = run(server, "workdays", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    with server.services.db.transaction() as session:
        assert session.scalar(select(CalendarDay).where(CalendarDay.day == datetime(2031, 3, 4).date())) is None
