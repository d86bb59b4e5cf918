"""The teacher's sign-in cards as a PDF (issue 7): one card per student of the teacher's
class with the name (Cyrillic and Kyrgyz letters too), login and a live activation code;
issued exactly like the printable page; refused outside the teacher's classes; a missing
font is a clear error page that issues nothing."""

from __future__ import annotations

import io
import re
import secrets

import pytest
from pypdf import PdfReader
from sqlalchemy import select

from idp.accounts.admin import AccountAdmin, Actor
from idp.accounts.models import ActivationCode, User
from idp.audit.models import AuditEvent
from tests.helpers import Browser

SYSTEM = Actor(ref="cli:test", permissions={"admin:users:write"})
CODE = re.compile(r"([A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4})")
NEW_PASSWORD = "river mountain apricot lamp"
NAMES = ("Үмүт Өмүрбекова", "Аңгемир Ысмайылов", "Nurlan Latin")


@pytest.fixture(autouse=True)
def _clean_activation_throttle(server):
    server.services.redis.delete("throttle:activate:127.0.0.1")
    yield
    server.services.redis.delete("throttle:activate:127.0.0.1")


def _admin(server, session) -> AccountAdmin:
    svc = server.services
    return AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)


def _class_with(server, *user_ids: int) -> int:
    name = "P" + secrets.token_hex(3).upper()
    with server.services.db.transaction() as session:
        admin = _admin(server, session)
        school_class = admin.create_class(SYSTEM, name)
        for user_id in user_ids:
            admin.set_classes(SYSTEM, session.get(User, user_id), [name])
        return school_class.id


def signed_in(server, person) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    assert browser.sign_in(person.login, person.password).status_code == 303
    return browser


def csrf_of(page) -> str:
    found = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text) or re.search(
        r'value="([^"]+)"[^>]*name="csrf_token"', page.text)
    assert found, page.text[:1000]
    return found.group(1)


def events(server, user_id: int, action: str) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(select(AuditEvent).where(
            AuditEvent.subject == f"user:{user_id}", AuditEvent.action == action)))
        for row in rows:
            session.expunge(row)
        return rows


def activate(server, login: str, code: str):
    browser = Browser(server.url)
    page = browser.get("/activate")
    return browser.submit(page, "/activate", login=login, code=code, password=NEW_PASSWORD, confirm=NEW_PASSWORD)


@pytest.fixture
def school(server, make_user):
    teacher = make_user(roles=("teacher",))
    students = [make_user(roles=("student",), display_name=name) for name in NAMES]
    other = make_user(roles=("student",), display_name="Other Class")
    class_a = _class_with(server, teacher.id, *(s.id for s in students))
    class_b = _class_with(server, other.id)
    with server.services.db.transaction() as session:
        for s in students:
            session.get(User, s.id).password_hash = None
    return {"teacher": teacher, "students": students, "other": other, "a": class_a, "b": class_b}


def test_pdf_cards_carry_names_logins_and_live_codes(server, school):
    browser = signed_in(server, school["teacher"])
    page = browser.get(f"/teacher/classes/{school['a']}")
    assert f"/teacher/classes/{school['a']}/cards.pdf" in page.text
    answer = browser.submit(page, f"/teacher/classes/{school['a']}/cards.pdf")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/pdf"
    assert "no-store" in answer.headers["Cache-Control"]
    assert "attachment" in answer.headers["Content-Disposition"]
    reader = PdfReader(io.BytesIO(answer.content))
    text = "\n".join(p.extract_text() for p in reader.pages)
    assert len(reader.pages) == 1
    # One QR image per card.
    assert sum(len(p.images) for p in reader.pages) == len(NAMES)
    assert school["other"].login not in text and "Other Class" not in text
    codes = CODE.findall(text)
    assert len(set(codes)) == len(NAMES)
    for student, name in zip(school["students"], NAMES, strict=True):
        assert student.login in text and name in text
        issued = events(server, student.id, "teacher:activation-code:issue")
        assert len(issued) == 1 and issued[0].details["purpose"].startswith("cards-pdf:")
    # Each card's code (the one after its login) activates that student's account.
    for student in school["students"]:
        after = text[text.index(student.login):]
        code = CODE.search(after).group(1)
        done = activate(server, student.login, code)
        assert done.status_code == 303, re.findall(r'role="alert">(.*?)<', done.text)


def test_pdf_cards_refused_outside_the_teachers_classes(server, make_user, school):
    browser = signed_in(server, school["teacher"])
    token = csrf_of(browser.get(f"/teacher/classes/{school['a']}"))
    assert browser.post(f"/teacher/classes/{school['b']}/cards.pdf", data={"csrf_token": token}).status_code == 404
    assert browser.post("/teacher/classes/999999999/cards.pdf", data={"csrf_token": token}).status_code == 404
    assert browser.post(f"/teacher/classes/{school['a']}/cards.pdf").status_code == 400
    assert events(server, school["other"].id, "account:activation-code:issue") == []
    # A teacher of another class only, and a student of the class: no cards.
    stranger = make_user(roles=("teacher",))
    _class_with(server, stranger.id)
    other_teacher = signed_in(server, stranger)
    token = csrf_of(other_teacher.get("/teacher"))
    assert other_teacher.post(f"/teacher/classes/{school['a']}/cards.pdf",
                              data={"csrf_token": token}).status_code == 404
    pupil = make_user(roles=("student",))
    pupil_browser = signed_in(server, pupil)
    token = csrf_of(pupil_browser.get("/"))
    assert pupil_browser.post(f"/teacher/classes/{school['a']}/cards.pdf",
                              data={"csrf_token": token}).status_code == 403
    for student in school["students"]:
        assert events(server, student.id, "account:activation-code:issue") == []


def test_a_missing_font_is_an_error_page_and_issues_nothing(server, school):
    settings = server.services.settings
    saved = settings.card_font_file
    settings.card_font_file = "/nonexistent/" + secrets.token_hex(4) + ".ttf"
    try:
        browser = signed_in(server, school["teacher"])
        page = browser.get(f"/teacher/classes/{school['a']}")
        answer = browser.submit(page, f"/teacher/classes/{school['a']}/cards.pdf")
    finally:
        settings.card_font_file = saved
    assert answer.status_code == 503
    assert "text/html" in answer.headers["Content-Type"]
    assert "font" in answer.text and "Traceback" not in answer.text
    with server.services.db.transaction() as session:
        ids = [s.id for s in school["students"]]
        assert session.scalars(select(ActivationCode).where(ActivationCode.user_id.in_(ids))).all() == []
