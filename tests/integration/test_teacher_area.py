"""The teacher area (/teacher, issue 7): a teacher sees the students of the classes they
are a member of, issues one-time activation codes and prints sign-in cards, and can
never act on an account outside their classes."""

from __future__ import annotations

import hashlib
import json
import re
import secrets

import pytest
from sqlalchemy import select

from idp.accounts.admin import AccountAdmin, Actor
from idp.accounts.models import ActivationCode, User
from idp.audit.models import AuditEvent
from tests.helpers import Browser

SYSTEM = Actor(ref="cli:test", permissions={"admin:users:write"})
CODE = re.compile(r"\b([A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4})\b")
NEW_PASSWORD = "river mountain apricot lamp"


@pytest.fixture(autouse=True)
def _clean_activation_throttle(server):
    server.services.redis.delete("throttle:activate:127.0.0.1")
    yield
    server.services.redis.delete("throttle:activate:127.0.0.1")


def _admin(server, session) -> AccountAdmin:
    svc = server.services
    return AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)


def make_class(server) -> tuple[str, int]:
    name = "T" + secrets.token_hex(3).upper()
    with server.services.db.transaction() as session:
        school_class = _admin(server, session).create_class(SYSTEM, name)
        return name, school_class.id


def put_in_classes(server, user_id: int, names: list[str]) -> None:
    with server.services.db.transaction() as session:
        _admin(server, session).set_classes(SYSTEM, session.get(User, user_id), names)


def signed_in(server, person) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303, response.text[:500]
    return browser


def events(server, user_id: int, action: str) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(
            select(AuditEvent).where(AuditEvent.subject == f"user:{user_id}", AuditEvent.action == action)
            .order_by(AuditEvent.seq)
        ))
        for row in rows:
            session.expunge(row)
        return rows


def is_signed_in(browser: Browser) -> bool:
    response = browser.get("/")
    if response.status_code == 200:
        return True
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    return False


def activate(server, login: str, code: str):
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    page = browser.get("/activate")
    return browser.submit(page, "/activate", login=login, code=code, password=NEW_PASSWORD, confirm=NEW_PASSWORD)


def csrf_of(page) -> str:
    found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text) or re.search(
        r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, page.text[:1000]
    return found.group(1)


@pytest.fixture
def school(server, make_user):
    """Class A taught by ``teacher`` with two students (one not activated, one with 2FA),
    a staff member in class A, and class B with a student the teacher does not teach."""
    class_a, class_a_id = make_class(server)
    class_b, class_b_id = make_class(server)
    teacher = make_user(roles=("teacher",))
    fresh = make_user(roles=("student",), display_name="Aibek Fresh")
    active = make_user(roles=("student",), display_name="Bermet Active", two_factor=True)
    staff = make_user(roles=("staff",))
    other = make_user(roles=("student",), display_name="Other Pupil")
    put_in_classes(server, teacher.id, [class_a])
    for person in (fresh, active, staff):
        put_in_classes(server, person.id, [class_a])
    put_in_classes(server, other.id, [class_b])
    with server.services.db.transaction() as session:
        session.get(User, fresh.id).password_hash = None
    return {"teacher": teacher, "fresh": fresh, "active": active, "staff": staff, "other": other,
            "a": class_a_id, "b": class_b_id, "a_name": class_a, "b_name": class_b}


def test_account_page_links_teachers_to_their_classes(server, make_user, school):
    teacher = signed_in(server, school["teacher"])
    assert 'href="/teacher"' in teacher.get("/").text
    student = signed_in(server, school["active"])
    assert 'href="/teacher"' not in student.get("/").text


def test_list_shows_classes_students_and_their_state(server, school):
    browser = signed_in(server, school["teacher"])
    home = browser.get("/teacher")
    assert home.status_code == 200
    assert school["a_name"] in home.text
    assert f"/teacher/classes/{school['b']}" not in home.text
    page = browser.get(f"/teacher/classes/{school['a']}")
    assert page.status_code == 200
    rows = {m.group(1): m.group(2) for m in re.finditer(r'<tr class="student" data-login="([^"]+)">(.*?)</tr>',
                                                         page.text, re.S)}
    assert set(rows) == {school["fresh"].login, school["active"].login}
    assert re.search(r'class="activated">no<', rows[school["fresh"].login])
    assert re.search(r'class="two-factor">off<', rows[school["fresh"].login])
    assert re.search(r'class="activated">yes<', rows[school["active"].login])
    assert re.search(r'class="two-factor">on<', rows[school["active"].login])
    assert school["other"].login not in page.text and school["staff"].login not in page.text


def test_issue_code_ends_sessions_works_at_activate_and_is_journaled(server, school):
    student = school["active"]
    student_browser = signed_in(server, student)
    assert is_signed_in(student_browser)
    browser = signed_in(server, school["teacher"])
    page = browser.get(f"/teacher/classes/{school['a']}")
    shown = browser.submit(page, f"/teacher/students/{student.id}/activation-code")
    assert shown.status_code == 200
    assert "no-store" in shown.headers["Cache-Control"]
    assert "<svg" in shown.text
    code = CODE.search(shown.text).group(1)
    assert not is_signed_in(student_browser)
    issued = events(server, student.id, "teacher:activation-code:issue")
    assert len(issued) == 1 and issued[0].actor == f"user:{school['teacher'].id}"
    assert issued[0].details["sessions_ended"] >= 1
    done = activate(server, student.login, code)
    assert done.status_code == 303, re.findall(r"role=\"alert\">(.*?)<", done.text)


def test_cards_for_a_class(server, school):
    browser = signed_in(server, school["teacher"])
    page = browser.get(f"/teacher/classes/{school['a']}")
    cards = browser.submit(page, f"/teacher/classes/{school['a']}/cards")
    assert cards.status_code == 200
    assert "no-store" in cards.headers["Cache-Control"]
    assert cards.text.count('<section class="card">') == 2
    codes = CODE.findall(cards.text)
    assert len(set(codes)) == 2
    assert cards.text.count("<svg") == 2
    assert "<script" not in cards.text
    for person in (school["fresh"], school["active"]):
        assert person.login in cards.text
        assert f"{server.url}/activate?login={person.login}" in cards.text
        assert len(events(server, person.id, "teacher:activation-code:issue")) == 1
    assert school["other"].login not in cards.text and school["staff"].login not in cards.text
    # A card's code is a live one: the fresh student activates with it.
    login = school["fresh"].login
    card = re.search(r'class="card-login">' + re.escape(login) + r'</strong>.*?class="card-code">([^<]+)<',
                     cards.text, re.S)
    assert card is not None
    assert activate(server, login, card.group(1)).status_code == 303


def test_cards_and_codes_need_a_csrf_token(server, school):
    browser = signed_in(server, school["teacher"])
    assert browser.post(f"/teacher/classes/{school['a']}/cards").status_code == 400
    assert browser.post(f"/teacher/students/{school['fresh'].id}/activation-code").status_code == 400
    with server.services.db.transaction() as session:
        live = session.scalars(select(ActivationCode).where(ActivationCode.user_id == school["fresh"].id)).all()
    assert live == []


def test_every_route_refused_outside_the_teachers_classes(server, school):
    browser = signed_in(server, school["teacher"])
    token = csrf_of(browser.get(f"/teacher/classes/{school['a']}"))
    # A student of another class, a non-student in the class, the teacher themself, nobody.
    for target in (school["other"].id, school["staff"].id, school["teacher"].id, 10**9):
        answer = browser.post(f"/teacher/students/{target}/activation-code", data={"csrf_token": token})
        assert answer.status_code == 404, target
    assert browser.get(f"/teacher/classes/{school['b']}").status_code == 404
    assert browser.post(f"/teacher/classes/{school['b']}/cards", data={"csrf_token": token}).status_code == 404
    assert browser.get("/teacher/classes/999999999").status_code == 404
    for person in (school["other"], school["staff"]):
        assert events(server, person.id, "teacher:activation-code:issue") == []
        assert events(server, person.id, "account:activation-code:issue") == []


def test_non_teachers_are_refused(server, make_user, school):
    # A student of the class and a staff member of the class: 403 on every route.
    for person in (school["active"], school["staff"]):
        browser = signed_in(server, person)
        token = csrf_of(browser.get("/"))
        assert browser.get("/teacher").status_code == 403
        assert browser.get(f"/teacher/classes/{school['a']}").status_code == 403
        assert browser.post(f"/teacher/classes/{school['a']}/cards", data={"csrf_token": token}).status_code == 403
        answer = browser.post(f"/teacher/students/{school['fresh'].id}/activation-code", data={"csrf_token": token})
        assert answer.status_code == 403
    assert events(server, school["fresh"].id, "teacher:activation-code:issue") == []
    anonymous = Browser(server.url)
    answer = anonymous.get("/teacher")
    assert answer.status_code == 302 and "/login" in answer.headers["Location"]
    assert anonymous.post(f"/teacher/classes/{school['a']}/cards").status_code in (302, 400)


def test_a_teacher_without_a_two_factor_session_is_refused(server, school):
    """A teacher's session opened without a second factor (no "mfa" in amr) is refused."""
    browser = signed_in(server, school["teacher"])
    assert browser.get("/teacher").status_code == 200
    key = "sess:" + hashlib.sha256(browser.http.cookies.get("darbaza").encode()).hexdigest()
    redis = server.services.redis
    data = json.loads(redis.get(key))
    assert "mfa" in data["amr"]
    data["amr"] = ["pwd"]
    redis.set(key, json.dumps(data), keepttl=True)
    assert browser.get("/").status_code == 200
    assert browser.get("/teacher").status_code == 403
    assert browser.get(f"/teacher/classes/{school['a']}").status_code == 403


# --- every route, generically: a new /teacher route is checked without being listed here ---
def _teacher_rules(server) -> list:  # type: ignore[type-arg]
    return [rule for rule in server.app.url_map.iter_rules()
            if rule.rule == "/teacher" or rule.rule.startswith("/teacher/")]


def _try_every_route(server, browser: Browser, *, class_ids: list[int], user_ids: list[int]) -> set[str]:
    """Call every /teacher route naming a class or a student with each of the given ids
    (none of them the teacher's): each must answer 403 or 404. Returns the routes tried."""
    token = csrf_of(browser.get("/"))
    tried: set[str] = set()
    for rule in _teacher_rules(server):
        arguments = set(rule.arguments)
        if not arguments:
            continue
        unknown = arguments - {"class_id", "user_id"}
        if unknown:
            pytest.fail(f"{rule.rule}: no negative test knows the argument(s) {sorted(unknown)}; add one")
        values = class_ids if "class_id" in arguments else user_ids
        name = "class_id" if "class_id" in arguments else "user_id"
        for value in values:
            url = rule.rule.replace(f"<int:{name}>", str(value))
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                if method == "GET":
                    answer = browser.get(url)
                else:
                    answer = browser.post(url, data={"csrf_token": token})
                assert answer.status_code in (403, 404), (method, url, answer.status_code, answer.text[:300])
                assert not CODE.search(answer.text), (method, url)
                tried.add(f"{method} {rule.rule}")
    return tried


def _nothing_issued_for(server, user_ids: list[int]) -> None:
    from idp.accounts.models import GuardianLinkCode

    with server.services.db.transaction() as session:
        assert session.scalars(select(ActivationCode).where(ActivationCode.user_id.in_(user_ids))).all() == []
        assert session.scalars(select(GuardianLinkCode).where(GuardianLinkCode.child_id.in_(user_ids))).all() == []
        journalled = session.scalars(select(AuditEvent.action).where(
            AuditEvent.subject.in_([f"user:{i}" for i in user_ids]),
            AuditEvent.action.like("teacher:%") | AuditEvent.action.like("%code:issue"),
        )).all()
    assert journalled == []


def test_every_route_refuses_a_teacher_of_another_class(server, make_user, school):
    """The teacher of class B, and an id of a student in no class at all, on every route."""
    other_teacher = make_user(roles=("teacher",))
    put_in_classes(server, other_teacher.id, [school["b_name"]])
    unrelated = make_user(roles=("student",), display_name="Nobody's Student")
    browser = signed_in(server, other_teacher)
    home = browser.get("/teacher")
    assert home.status_code == 200 and f"/teacher/classes/{school['b']}" in home.text
    assert f"/teacher/classes/{school['a']}" not in home.text and school["a_name"] not in home.text
    targets = [school["fresh"].id, school["active"].id, unrelated.id]
    tried = _try_every_route(server, browser, class_ids=[school["a"], 10**9], user_ids=targets + [10**9])
    expected = {f"{method} {rule.rule}" for rule in _teacher_rules(server) if rule.arguments
                for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert tried == expected and len(tried) >= 3
    # The class teacher of A is refused the unrelated student the same way.
    own = signed_in(server, school["teacher"])
    _try_every_route(server, own, class_ids=[school["b"]], user_ids=[unrelated.id, school["other"].id])
    _nothing_issued_for(server, targets + [school["other"].id])
