"""Guardian link codes (issue 7): the console and the class teacher issue one-time codes
for a child; a parent registers with one (or, signed in, links another child); a code
works once, even when two people race for it; bad codes get one message and are
throttled per client IP; the console shows the links and removes them."""

from __future__ import annotations

import re
import secrets
import threading
from datetime import UTC, datetime, timedelta

import pytest
import requests
from sqlalchemy import select

from idp.accounts import guardian_codes
from idp.accounts.admin import AccountAdmin, Actor
from idp.accounts.models import GuardianLinkCode, User
from idp.audit.models import AuditEvent
from idp.guardian.views import FREE_FAILURES, THROTTLE_PURPOSE, WINDOW_SECONDS
from idp.login.throttle import Throttle
from idp.notify.models import OutboxMessage
from tests.helpers import Browser, UserInfo, decode_verified

CODE = re.compile(r"\b([A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4}-[A-HJ-NP-Z2-9]{4})\b")
PASSWORD = "walnut orchard copper lantern"
BAD_CODE_TEXT = "This link code does not work"
SYSTEM = Actor(ref="cli:test", permissions={"admin:users:write"})


def _throttle(server) -> Throttle:
    return Throttle(redis=server.services.redis, purpose=THROTTLE_PURPOSE, free_failures=FREE_FAILURES,
                    window=WINDOW_SECONDS)


@pytest.fixture(autouse=True)
def _clean_code_throttle(server):
    _throttle(server).reset("127.0.0.1")
    yield
    _throttle(server).reset("127.0.0.1")


def english(server) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def signed_in(server, person) -> Browser:
    browser = english(server)
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303, response.text[:500]
    return browser


def issue(server, child_id: int) -> str:
    """A code issued the way the CLI or a script would (the console test covers the page)."""
    svc = server.services
    with svc.db.transaction() as session:
        code, _row = guardian_codes.issue_code(session, svc.journal, session.get(User, child_id),
                                               guardian_codes.Context(actor="cli:test"))
    return code


def events(server, action: str, subject: str | None = None) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        query = select(AuditEvent).where(AuditEvent.action == action)
        if subject is not None:
            query = query.where(AuditEvent.subject == subject)
        rows = list(session.scalars(query.order_by(AuditEvent.seq)))
        for row in rows:
            session.expunge(row)
        return rows


def children_of(server, user_id: int) -> list[int]:
    with server.services.db.transaction() as session:
        return sorted(c.id for c in session.get(User, user_id).children)


def guardians_of(server, user_id: int) -> list[int]:
    with server.services.db.transaction() as session:
        return sorted(g.id for g in session.get(User, user_id).guardians)


def account(server, login: str) -> User | None:
    with server.services.db.transaction() as session:
        user = session.scalar(select(User).where(User.login == login))
        if user is not None:
            session.expunge(user)
        return user


def register(server, code: str, login: str | None = None, **extra: str) -> tuple[requests.Response, str]:
    login = login or f"parent-{secrets.token_hex(4)}"
    browser = english(server)
    page = browser.get("/guardian")
    assert page.status_code == 200
    fields = {"code": code, "login": login, "display_name": "Gulnara Parent", "email": "",
              "password": PASSWORD, "confirm": PASSWORD} | extra
    return browser.submit(page, "/guardian/register", **fields), login


def link(browser: Browser, code: str) -> requests.Response:
    page = browser.get("/guardian")
    assert page.status_code == 200
    return browser.submit(page, "/guardian/link", code=code)


def csrf_of(page: requests.Response) -> str:
    found = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text) or re.search(
        r'value="([^"]+)"[^>]*name="csrf_token"', page.text)
    assert found, page.text[:1000]
    return found.group(1)


def alert(page: requests.Response) -> str:
    return " ".join(re.findall(r'role="alert">([^<]*)<', page.text))


def test_console_issue_register_claim_and_console_removes_the_link(server, make_user, make_client):
    child = make_user(roles=("student",), display_name="Айбек Уулу")
    admin = make_user(roles=("school_admin",))
    console = signed_in(server, admin)
    page = console.get(f"/admin/accounts/{child.id}/guardians")
    assert page.status_code == 200 and "guardian-code\"" not in page.text
    shown = console.submit(page, f"/admin/accounts/{child.id}/guardian-codes")
    assert shown.status_code == 200
    assert "no-store" in shown.headers["Cache-Control"]
    assert f"{server.url}/guardian" in shown.text and "<svg" in shown.text
    code = CODE.search(shown.text).group(1)
    issued = events(server, "account:guardian-code:issue", f"user:{child.id}")
    assert len(issued) == 1 and issued[0].actor == f"user:{admin.id}"
    # Listed with who issued it, never the code itself.
    listing = console.get(f"/admin/accounts/{child.id}/guardians")
    assert listing.text.count('class="guardian-code"') == 1
    assert admin.login in listing.text and code not in listing.text
    with server.services.db.transaction() as session:
        stored = session.scalars(select(GuardianLinkCode).where(GuardianLinkCode.child_id == child.id)).one()
        assert stored.code_hash == guardian_codes.code_hash(code) and code.replace("-", "") not in stored.code_hash

    # The parent registers with it (lower case and without dashes works too).
    done, login = register(server, code.lower().replace("-", ""), email="gulnara@example.org")
    assert done.status_code == 303, alert(done)
    assert done.headers["Location"].endswith("/login")
    parent = account(server, login)
    assert parent is not None and parent.role_names == ["parent"] and parent.email == "gulnara@example.org"
    assert parent.email_verified_at is None
    assert children_of(server, parent.id) == [child.id]
    assert events(server, "account:guardian-code:redeem", f"user:{child.id}")
    linked = events(server, "account:guardian:link", f"user:{child.id}")
    assert linked and linked[-1].details["guardian"] == f"user:{parent.id}"
    with server.services.db.transaction() as session:
        mails = session.scalars(select(OutboxMessage).where(OutboxMessage.to_address == "gulnara@example.org")).all()
        assert [m.template for m in mails] == ["email_verify"]
    # The code is spent: no longer listed, and a second registration with it fails.
    assert 'class="guardian-code"' not in console.get(f"/admin/accounts/{child.id}/guardians").text
    again, other_login = register(server, code)
    assert again.status_code == 400 and BAD_CODE_TEXT in alert(again)
    assert account(server, other_login) is None

    # Signed in, the parent sees the child; the console shows the link; so does the claim.
    info = UserInfo(id=parent.id, login=login, password=PASSWORD, subject=parent.subject)
    parent_browser = signed_in(server, info)
    assert "Айбек Уулу" in parent_browser.get("/guardian").text
    assert f"({login})" in console.get(f"/admin/accounts/{child.id}/guardians").text
    client = make_client(scopes=["openid", "profile"], trusted=True)
    params, verifier, _ = english(server).authorize(client, info, scope="openid profile")
    tokens = requests.post(
        server.url + "/token",
        data={"grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
              "code_verifier": verifier},
        auth=(client.client_id, client.client_secret), timeout=10,
    ).json()
    _, claims = decode_verified(tokens["id_token"], requests.get(server.url + "/jwks.json", timeout=10).json())
    child_subject = account(server, child.login).subject
    assert claims["children"] == [{"sub": child_subject, "name": "Айбек Уулу"}]

    # The console removes the link.
    child_page = console.get(f"/admin/accounts/{child.id}/guardians")
    assert console.submit(child_page, "/guardians/unlink").status_code == 303
    assert children_of(server, parent.id) == []


def test_expired_revoked_and_unknown_codes_get_one_message(server, make_user):
    child = make_user(roles=("student",))
    expired = issue(server, child.id)
    with server.services.db.transaction() as session:
        row = session.scalar(select(GuardianLinkCode).where(
            GuardianLinkCode.code_hash == guardian_codes.code_hash(expired)))
        row.expires_at = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=1)
    revoked = issue(server, child.id)
    kept = issue(server, child.id)
    # An admin revokes one of the two active codes from the console; the other stays.
    console = signed_in(server, make_user(roles=("school_admin",)))
    page = console.get(f"/admin/accounts/{child.id}/guardians")
    assert page.text.count('class="guardian-code"') == 2
    with server.services.db.transaction() as session:
        revoked_id = session.scalar(select(GuardianLinkCode.id).where(
            GuardianLinkCode.code_hash == guardian_codes.code_hash(revoked)))
    assert console.submit(page, f"/guardian-codes/{revoked_id}/revoke").status_code == 303
    assert console.get(f"/admin/accounts/{child.id}/guardians").text.count('class="guardian-code"') == 1
    assert events(server, "account:guardian-code:revoke", f"user:{child.id}")

    messages = set()
    for code in (expired, revoked, "ABCD-EFGH-JKMN", "not a code"):
        answer, login = register(server, code)
        assert answer.status_code == 400
        assert account(server, login) is None
        messages.add(alert(answer))
    assert len(messages) == 1 and BAD_CODE_TEXT in messages.pop()
    assert children_of(server, child.id) == [] and guardians_of(server, child.id) == []
    done, login = register(server, kept)
    assert done.status_code == 303
    assert guardians_of(server, child.id) == [account(server, login).id]


def test_taken_login_and_weak_password_are_form_messages_and_keep_the_code(server, make_user):
    child = make_user(roles=("student",))
    existing = make_user(roles=("student",))
    code = issue(server, child.id)
    taken, _login = register(server, code, login=existing.login)
    assert taken.status_code == 400 and "already taken" in alert(taken)
    weak, login = register(server, code, password="short", confirm="short")
    assert weak.status_code == 400 and account(server, login) is None
    # Neither spent the code.
    done, login = register(server, code)
    assert done.status_code == 303
    assert guardians_of(server, child.id) == [account(server, login).id]


def test_a_signed_in_parent_links_a_second_child(server, make_user):
    parent = make_user(roles=("parent",))
    first, second = make_user(roles=("student",), display_name="First Child"), make_user(
        roles=("student",), display_name="Second Child")
    browser = signed_in(server, parent)
    page = browser.get("/guardian")
    assert "/guardian/link" in page.text and "/guardian/register" not in page.text
    code_one, code_two = issue(server, first.id), issue(server, second.id)
    # A bad code: the same message, nothing linked, no child named.
    bad = link(browser, "ZZZZ-ZZZZ-ZZZZ")
    assert bad.status_code == 400 and BAD_CODE_TEXT in alert(bad) and "Child" not in alert(bad)
    assert link(browser, code_one).status_code == 303
    done = link(browser, code_two)
    assert done.status_code == 303
    assert "Second Child" in browser.get(done.headers["Location"]).text
    assert children_of(server, parent.id) == sorted([first.id, second.id])
    # A code for a child already linked is not spent.
    another = issue(server, first.id)
    already = link(browser, another)
    assert already.status_code == 400 and "already linked" in alert(already)
    with server.services.db.transaction() as session:
        assert guardian_codes.live_code(session, another) is not None


def test_accounts_that_are_not_parents_cannot_link(server, make_user):
    child = make_user(roles=("student",))
    code = issue(server, child.id)
    for roles in (("student",), ("teacher",)):
        person = make_user(roles=roles)
        browser = signed_in(server, person)
        page = browser.get("/guardian")
        assert "Only parent accounts can link children" in page.text
        token = csrf_of(page)
        answer = browser.post("/guardian/link", data={"csrf_token": token, "code": code})
        assert answer.status_code == 403 and "Only parent accounts" in answer.text
        assert children_of(server, person.id) == []
    assert guardians_of(server, child.id) == []
    with server.services.db.transaction() as session:
        assert guardian_codes.live_code(session, code) is not None


def test_forms_need_a_csrf_token(server, make_user):
    child = make_user(roles=("student",))
    code = issue(server, child.id)
    login = f"parent-{secrets.token_hex(4)}"
    answer = english(server).post("/guardian/register", data={
        "code": code, "login": login, "display_name": "X", "password": PASSWORD, "confirm": PASSWORD})
    assert answer.status_code == 400 and account(server, login) is None
    parent = make_user(roles=("parent",))
    browser = signed_in(server, parent)
    assert browser.post("/guardian/link", data={"code": code}).status_code == 400
    assert guardians_of(server, child.id) == []


def test_bad_codes_are_throttled_per_ip_and_journalled(server, make_user):
    child = make_user(roles=("student",))
    good = issue(server, child.id)
    before = len(events(server, "account:guardian-code:failure"))
    browser = english(server)
    page = browser.get("/guardian")
    for _ in range(FREE_FAILURES):
        answer = browser.submit(page, "/guardian/register", code="ABCD-EFGH-" + secrets.choice("JKMNPQ") * 4,
                                login=f"p-{secrets.token_hex(4)}", display_name="P", password=PASSWORD,
                                confirm=PASSWORD)
        assert answer.status_code == 400
    # One more failure starts the delay; then even a good code waits.
    assert browser.submit(page, "/guardian/register", code="ABCD-EFGH-WXYZ", login="p-x", display_name="P",
                          password=PASSWORD, confirm=PASSWORD).status_code == 400
    blocked, login = register(server, good)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    assert account(server, login) is None
    assert len(events(server, "account:guardian-code:failure")) - before == FREE_FAILURES + 1
    # The signed-in form shares the limit.
    parent_browser = signed_in(server, make_user(roles=("parent",)))
    assert link(parent_browser, good).status_code == 429
    _throttle(server).reset("127.0.0.1")
    done, _login = register(server, good)
    assert done.status_code == 303


def _race(calls) -> list[int]:
    barrier = threading.Barrier(len(calls))
    results: list[int] = [0] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]().status_code

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_parallel_redemptions_of_one_code_link_exactly_once(server, make_user):
    for _round in range(3):
        child = make_user(roles=("student",))
        code = issue(server, child.id)
        parents = [make_user(roles=("parent",)) for _ in range(2)]
        browsers = [signed_in(server, p) for p in parents]
        pages = [b.get("/guardian") for b in browsers]
        calls = [lambda b=b, p=p, c=code: b.submit(p, "/guardian/link", code=c)
                 for b, p in zip(browsers, pages, strict=True)]
        results = _race(calls)
        assert sorted(results) == [303, 400], results
        assert len(guardians_of(server, child.id)) == 1
        with server.services.db.transaction() as session:
            row = session.scalar(select(GuardianLinkCode).where(GuardianLinkCode.child_id == child.id))
            assert row.used_at is not None and row.used_by in {p.id for p in parents}


def test_parallel_registrations_with_one_code_create_one_account(server, make_user):
    child = make_user(roles=("student",))
    code = issue(server, child.id)
    logins = [f"race-{secrets.token_hex(4)}" for _ in range(3)]
    browsers = [english(server) for _ in logins]
    pages = [b.get("/guardian") for b in browsers]
    calls = [
        lambda b=b, p=p, login=login: b.submit(p, "/guardian/register", code=code, login=login, display_name="R",
                                               password=PASSWORD, confirm=PASSWORD)
        for b, p, login in zip(browsers, pages, logins, strict=True)
    ]
    results = _race(calls)
    assert sorted(results) == [303, 400, 400], results
    created = [login for login in logins if account(server, login) is not None]
    assert len(created) == 1
    assert guardians_of(server, child.id) == [account(server, created[0]).id]


def test_reading_codes_needs_read_and_issuing_needs_write(server, make_user):
    child = make_user(roles=("student",))
    issue(server, child.id)
    support = signed_in(server, make_user(roles=("tech_support",)))
    page = support.get(f"/admin/accounts/{child.id}/guardians")
    assert page.status_code == 200 and page.text.count('class="guardian-code"') == 1
    assert "/guardian-codes" not in page.text and "/guardians/unlink" not in page.text
    data = {"csrf_token": csrf_of(page)}
    assert support.post(f"/admin/accounts/{child.id}/guardian-codes", data=data).status_code == 403
    with server.services.db.transaction() as session:
        code_id = session.scalar(select(GuardianLinkCode.id).where(GuardianLinkCode.child_id == child.id))
    assert support.post(f"/admin/accounts/{child.id}/guardian-codes/{code_id}/revoke", data=data).status_code == 403
    assert support.post(f"/admin/accounts/{child.id}/guardians", data=data | {"child_login": "x"}).status_code == 403
    assert len(events(server, "account:guardian-code:issue", f"user:{child.id}")) == 1


# --- the teacher area -------------------------------------------------------------------------
def _admin(server, session) -> AccountAdmin:
    svc = server.services
    return AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)


def _class_with(server, *user_ids: int) -> tuple[str, int]:
    name = "G" + secrets.token_hex(3).upper()
    with server.services.db.transaction() as session:
        admin = _admin(server, session)
        school_class = admin.create_class(SYSTEM, name)
        for user_id in user_ids:
            admin.set_classes(SYSTEM, session.get(User, user_id), [name])
        return name, school_class.id


def test_teacher_prints_guardian_slips_for_own_class_only(server, make_user):
    teacher = make_user(roles=("teacher",))
    mine = [make_user(roles=("student",), display_name=f"Pupil {i}") for i in range(2)]
    other = make_user(roles=("student",), display_name="Not Mine")
    _name_a, class_a = _class_with(server, teacher.id, *(s.id for s in mine))
    _name_b, class_b = _class_with(server, other.id)
    browser = signed_in(server, teacher)
    page = browser.get(f"/teacher/classes/{class_a}")
    slips = browser.submit(page, f"/teacher/classes/{class_a}/guardian-codes")
    assert slips.status_code == 200 and "no-store" in slips.headers["Cache-Control"]
    assert slips.text.count('class="card guardian-slip"') == 2 and slips.text.count("<svg") == 2
    assert f"{server.url}/guardian" in slips.text and "Not Mine" not in slips.text
    found = re.findall(r'Parent link code for ([^<]+)</h2>\s*<p>[^<]*<strong class="slip-code">([^<]+)<', slips.text)
    assert sorted(n for n, _ in found) == ["Pupil 0", "Pupil 1"]
    for student in mine:
        issued = events(server, "teacher:guardian-code:issue", f"user:{student.id}")
        assert len(issued) == 1 and issued[0].actor == f"user:{teacher.id}"
    # A slip's code works for the child named on it.
    code = dict(found)["Pupil 1"]
    done, login = register(server, code)
    assert done.status_code == 303
    assert guardians_of(server, mine[1].id) == [account(server, login).id]

    # Another class: 404, nothing issued; a student or a parent: 403.
    token = csrf_of(page)
    assert browser.post(f"/teacher/classes/{class_b}/guardian-codes", data={"csrf_token": token}).status_code == 404
    assert events(server, "account:guardian-code:issue", f"user:{other.id}") == []
    assert browser.post(f"/teacher/classes/{class_a}/guardian-codes").status_code == 400
    for roles in (("student",), ("parent",)):
        outsider = signed_in(server, make_user(roles=roles))
        token = csrf_of(outsider.get("/"))
        answer = outsider.post(f"/teacher/classes/{class_a}/guardian-codes", data={"csrf_token": token})
        assert answer.status_code == 403
    assert len(events(server, "teacher:guardian-code:issue", f"user:{mine[0].id}")) == 1


def test_teacher_code_service_refuses_a_student_of_another_class(server, make_user):
    from idp.teacher.service import NotYourStudent, issue_guardian_code_as_teacher

    teacher = make_user(roles=("teacher",))
    other = make_user(roles=("student",))
    _class_with(server, teacher.id)
    _class_with(server, other.id)
    svc = server.services
    with svc.db.transaction() as session, pytest.raises(NotYourStudent):
        issue_guardian_code_as_teacher(session, svc.journal, session.get(User, teacher.id),
                                       session.get(User, other.id), ip=None, request_id=None, purpose="test")
    assert events(server, "account:guardian-code:issue", f"user:{other.id}") == []
