"""The console's working calendar (policy 5.2.3): overrides and coming Kyrgyz holidays,
adding and removing a day with a note (journalled; open breach cases get new deadlines),
and who may see or change it. Overrides here are in 2032 and removed again."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, datetime

import pytest
import requests
from sqlalchemy import delete, select

from idp.audit.models import AuditEvent
from idp.breach.models import BreachCase, BreachCaseStep
from idp.workdays.models import CalendarDay
from tests.helpers import Browser

MONDAY = date(2032, 3, 1)


def csrf_of(page: requests.Response) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
    assert match, page.text[:2000]
    return match.group(1)


def console(server, make_user, *roles: str) -> Browser:  # type: ignore[no-untyped-def]
    user = make_user(roles=roles)
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    assert browser.sign_in(user.login, user.password).status_code in (302, 303)
    return browser


def post(browser: Browser, path: str, **data: object) -> requests.Response:
    page = browser.get("/admin/calendar")
    assert page.status_code == 200
    return browser.post(path, data={"csrf_token": csrf_of(page), **data})


def journal(server, subject: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with server.services.db.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.subject == subject).order_by(AuditEvent.seq)))


@pytest.fixture
def clean_2032(server) -> Iterator[None]:  # type: ignore[no-untyped-def]
    def clean() -> None:
        with server.services.db.transaction() as session:
            session.execute(delete(CalendarDay).where(CalendarDay.day >= date(2032, 1, 1),
                                                      CalendarDay.day <= date(2032, 12, 31)))
    clean()
    yield
    clean()


def test_admin_adds_and_removes_a_day_off_and_open_deadlines_follow(server, make_user, clean_2032) -> None:
    admin = console(server, make_user, "school_admin")
    page = admin.get("/admin/calendar")
    assert page.status_code == 200
    assert "Working calendar" in page.text and "09:00–18:00" in page.text
    # The coming Kyrgyz public holidays are listed (there is always one within a year).
    assert re.search(r'<tr id="holiday-\d{4}-\d{2}-\d{2}">', page.text)

    reported = datetime(2032, 2, 27, 11, 30)  # Friday 17:30 in Bishkek (naive UTC, as stored)
    with server.services.db.transaction() as session:
        case = BreachCase(door="account", category="other", reported_at=reported,
                          deadline_at=datetime(2032, 3, 1, 11, 30), state="contained")
        session.add(case)
        session.flush()
        case_id = case.id
    try:
        added = post(admin, "/admin/calendar/days", day="2032-03-01", kind="off", note="Teachers' training day")
        assert added.status_code == 303
        page = admin.get("/admin/calendar")
        row = re.search(r'<tr id="day-2032-03-01" class="override off">(.*?)</tr>', page.text, re.S)
        assert row and "Teachers&#39; training day" in row.group(1) and "Day off" in row.group(1)
        assert "recomputed: 1" in page.text
        with server.services.db.transaction() as session:
            assert session.get(BreachCase, case_id).deadline_at == datetime(2032, 3, 2, 11, 30)  # type: ignore[union-attr]
        events = journal(server, "day:2032-03-01")
        assert [(e.action, e.reason, e.details["kind"]) for e in events] == [
            ("calendar:day:add", "Teachers' training day", "off")]
        assert events[0].actor.startswith("user:")

        removed = post(admin, "/admin/calendar/days/remove", day="2032-03-01", note="moved to April")
        assert removed.status_code == 303
        assert 'id="day-2032-03-01"' not in admin.get("/admin/calendar").text
        with server.services.db.transaction() as session:
            assert session.get(BreachCase, case_id).deadline_at == datetime(2032, 3, 1, 11, 30)  # type: ignore[union-attr]
        assert [(e.action, e.reason) for e in journal(server, "day:2032-03-01")][-1] == (
            "calendar:day:remove", "moved to April")
    finally:
        with server.services.db.transaction() as session:
            session.execute(delete(BreachCaseStep).where(BreachCaseStep.case_id == case_id))
            session.execute(delete(BreachCase).where(BreachCase.id == case_id))


def test_a_declared_working_saturday(server, make_user, clean_2032) -> None:
    admin = console(server, make_user, "school_admin")
    assert post(admin, "/admin/calendar/days", day="2032-03-06", kind="working",
                note="Worked for 8 March").status_code == 303
    row = re.search(r'<tr id="day-2032-03-06" class="override working">(.*?)</tr>',
                    admin.get("/admin/calendar").text, re.S)
    assert row and "Working day" in row.group(1)


@pytest.mark.parametrize(("fields", "message"), [
    ({"day": "2032-02-30", "kind": "off", "note": "x"}, "Enter a date such as 2026-05-11."),
    ({"day": "1st of March", "kind": "off", "note": "x"}, "Enter a date such as 2026-05-11."),
    ({"day": "", "kind": "off", "note": "x"}, "Enter a date such as 2026-05-11."),
    ({"day": "2032-03-02", "kind": "off", "note": ""}, "Write why"),
    ({"day": "2032-03-02", "kind": "holiday", "note": "x"}, "Not a valid choice"),
    ({"day": "2032-03-02", "kind": "off", "note": "x" * 256}, "At most 255 characters."),
])
def test_bad_input_is_a_form_error(server, make_user, clean_2032, fields: dict[str, str], message: str) -> None:
    admin = console(server, make_user, "school_admin")
    response = post(admin, "/admin/calendar/days", **fields)
    assert response.status_code == 400
    assert 'class="error"' in response.text and message in response.text
    with server.services.db.transaction() as session:
        assert session.scalar(select(CalendarDay).where(CalendarDay.day == date(2032, 3, 2))) is None


def test_removing_a_day_without_override_says_so(server, make_user, clean_2032) -> None:
    admin = console(server, make_user, "school_admin")
    response = post(admin, "/admin/calendar/days/remove", day="2032-03-02")
    assert response.status_code == 404
    assert "2032-03-02 has no override." in response.text


def test_support_sees_but_cannot_change_and_others_are_refused(server, make_user, clean_2032) -> None:
    support = console(server, make_user, "tech_support")
    page = support.get("/admin/calendar")
    assert page.status_code == 200
    assert 'action="/admin/calendar/days"' not in page.text
    refused = support.post("/admin/calendar/days", data={"csrf_token": csrf_of(page), "day": "2032-03-02",
                                                         "kind": "off", "note": "x"})
    assert refused.status_code == 403
    teacher = console(server, make_user, "teacher")
    assert teacher.get("/admin/calendar").status_code == 403
    with server.services.db.transaction() as session:
        assert session.scalar(select(CalendarDay).where(CalendarDay.day == date(2032, 3, 2))) is None


def test_without_csrf_nothing_changes(server, make_user, clean_2032) -> None:
    admin = console(server, make_user, "school_admin")
    response = admin.post("/admin/calendar/days", data={"day": "2032-03-02", "kind": "off", "note": "x"})
    assert response.status_code == 400
    with server.services.db.transaction() as session:
        assert session.scalar(select(CalendarDay).where(CalendarDay.day == date(2032, 3, 2))) is None
