"""The console's Accounts area, driven over HTTP the way an admin or tech support
person uses it: who may open which page, finding and exporting accounts, creating and
editing them, guardians, and the destructive support actions with their safeguards."""

from __future__ import annotations

import csv
import io
import re
import secrets

import pytest
import requests
from sqlalchemy import select

from idp.accounts.admin import AccountAdmin, Actor
from idp.accounts.models import User
from idp.audit.models import AuditEvent
from tests.helpers import Browser, decode_verified, form_fields

SYSTEM = Actor(ref="cli:test", permissions={"admin:users:write"})


# --- helpers ---------------------------------------------------------------------------
def console(server, make_user, *roles: str) -> tuple[Browser, object]:
    """A browser signed in as a new account with ``roles``, reading English pages."""
    person = make_user(roles=roles)
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303, response.text[:500]
    return browser, person


def db_user(server, user_id: int) -> User:
    with server.services.db.transaction() as session:
        user = session.get(User, user_id)
        session.expunge(user)
        return user


def make_class(server) -> str:
    name = "C" + secrets.token_hex(3).upper()
    svc = server.services
    with svc.db.transaction() as session:
        admin = AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)
        admin.create_class(SYSTEM, name)
    return name


def put_in_classes(server, user_id: int, names: list[str]) -> None:
    svc = server.services
    with svc.db.transaction() as session:
        admin = AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)
        admin.set_classes(SYSTEM, session.get(User, user_id), names)


def set_locked(server, user_id: int, reason: str = "test") -> None:
    with server.services.db.transaction() as session:
        user = session.get(User, user_id)
        user.locked = True
        user.lock_reason = reason


def errors(page: requests.Response) -> list[str]:
    return re.findall(r'<p class="error" role="alert">(.*?)</p>', page.text, re.S)


def journal(server, user_id: int, action: str) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.subject == f"user:{user_id}", AuditEvent.action == action).order_by(AuditEvent.seq)
            )
        )
        for row in rows:
            session.expunge(row)
        return rows


def signed_in_with_tokens(server, make_user, make_client):
    """A person signed in in their own browser, holding a portal app's refresh token."""
    person = make_user(roles=("student",))
    client = make_client(scopes=["openid", "profile", "offline_access"], trusted=True)
    browser = Browser(server.url)
    params, verifier, _ = browser.authorize(client, person, scope="openid profile offline_access")
    assert "code" in params, params
    tokens = requests.post(
        server.url + "/token",
        data={"grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
              "code_verifier": verifier},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    ).json()
    assert "refresh_token" in tokens, tokens
    assert browser.get("/").status_code == 200
    return person, browser, client, tokens


def refresh(server, client, refresh_token: str) -> requests.Response:
    return requests.post(
        server.url + "/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )


# --- permissions -----------------------------------------------------------------------
# (path, a role holding the permission, a role with console access lacking it)
ROUTES = [
    ("/admin/accounts", "tech_support", "student"),
    ("/admin/accounts/export.csv", "security_officer", "student"),
    ("/admin/accounts/new", "school_admin", "tech_support"),
    ("/admin/accounts/{id}", "tech_support", "student"),
    ("/admin/accounts/{id}/profile", "school_admin", "tech_support"),
    ("/admin/accounts/{id}/roles", "security_officer", "tech_support"),
    ("/admin/accounts/{id}/classes", "school_admin", "security_officer"),
    # Reading guardians (and active link codes) needs admin:users:read; changing them, write
    # (tests/integration/test_guardian_codes.py checks the POSTs).
    ("/admin/accounts/{id}/guardians", "tech_support", "student"),
    ("/admin/accounts/{id}/lock", "tech_support", "school_admin"),
    ("/admin/accounts/{locked}/unlock", "tech_support", "security_officer"),
    ("/admin/accounts/{id}/sessions/end", "tech_support", "school_admin"),
    ("/admin/accounts/{id}/password/require-change", "tech_support", "security_officer"),
    ("/admin/accounts/{id}/activation-code", "school_admin", "security_officer"),
]


@pytest.mark.parametrize(("path", "allowed", "denied"), ROUTES)
def test_each_page_needs_its_permission(server, make_user, path, allowed, denied):
    target = make_user(roles=("student",))
    locked = make_user(roles=("student",))
    set_locked(server, locked.id)
    url = path.format(id=target.id, locked=locked.id)

    for role in {denied, "student"}:
        browser, _ = console(server, make_user, role)
        refused = browser.get(url)
        assert refused.status_code == 403, (role, url)
        assert "Traceback" not in refused.text

    browser, _ = console(server, make_user, allowed)
    assert browser.get(url).status_code == 200, (allowed, url)


def test_unlink_needs_write_permission(server, make_user):
    parent = make_user(roles=("parent",))
    child = make_user(roles=("student",))
    svc = server.services
    with svc.db.transaction() as session:
        admin = AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)
        admin.link_guardian(SYSTEM, session.get(User, parent.id), session.get(User, child.id))
    url = f"/admin/accounts/{parent.id}/guardians/unlink"
    data = {"guardian_id": str(parent.id), "child_id": str(child.id)}

    support, _ = console(server, make_user, "tech_support")
    _, fields = form_fields(support.get("/").text, "/logout")
    assert support.post(url, data={**data, "csrf_token": fields["csrf_token"]}).status_code == 403
    assert [c.id for c in db_user_children(server, parent.id)] == [child.id]

    admin_browser, _ = console(server, make_user, "school_admin")
    page = admin_browser.get(f"/admin/accounts/{parent.id}/guardians")
    assert admin_browser.submit(page, "/guardians/unlink", **data).status_code == 303
    assert db_user_children(server, parent.id) == []


def db_user_children(server, user_id: int) -> list[User]:
    with server.services.db.transaction() as session:
        children = list(session.get(User, user_id).children)
        for child in children:
            session.expunge(child)
        return children


def test_console_nav_lists_accounts(server, make_user):
    browser, _ = console(server, make_user, "tech_support")
    assert 'href="/admin/accounts"' in browser.get("/admin/").text


# --- list, search, filters, paging -------------------------------------------------------
def test_search_filters_and_paging_keep_the_filters(server, make_user):
    tag = secrets.token_hex(3)
    school_class = make_class(server)
    people = [
        make_user(roles=("teacher",) if i % 2 else ("student",), login=f"p{tag}-{i:02d}",
                  display_name=f"Pupil {tag} {i:02d}")
        for i in range(30)
    ]
    put_in_classes(server, people[3].id, [school_class])
    put_in_classes(server, people[4].id, [school_class])
    set_locked(server, people[5].id)
    browser, _ = console(server, make_user, "tech_support")

    def logins(page: requests.Response) -> set[str]:
        assert page.status_code == 200, page.text[:500]
        return set(re.findall(rf">(p{tag}-\d\d)</a>", page.text))

    first = browser.get("/admin/accounts", params={"q": tag})
    assert len(logins(first)) == 25
    next_link = re.search(r'href="([^"]*)" rel="next"', first.text)
    assert next_link and f"q={tag}" in next_link.group(1)
    second = browser.get(next_link.group(1).replace("&amp;", "&"))
    assert len(logins(second)) == 5
    assert logins(first) | logins(second) == {p.login for p in people}
    assert 'rel="prev"' in second.text and 'rel="next"' not in second.text

    # By name too, case-insensitively.
    assert logins(browser.get("/admin/accounts", params={"q": f"PUPIL {tag} 07"})) == {f"p{tag}-07"}

    by_class = browser.get("/admin/accounts", params={"class": school_class})
    assert logins(by_class) == {f"p{tag}-03", f"p{tag}-04"}

    teachers = browser.get("/admin/accounts", params={"q": tag, "role": "teacher"})
    assert logins(teachers) == {p.login for i, p in enumerate(people) if i % 2}

    locked = browser.get("/admin/accounts", params={"q": tag, "state": "locked"})
    assert logins(locked) == {f"p{tag}-05"}
    active = browser.get("/admin/accounts", params={"q": tag, "state": "active"})
    assert f"p{tag}-05" not in logins(active) and len(logins(active)) == 25

    # Paging links carry every filter.
    students = browser.get("/admin/accounts", params={"q": tag, "role": "student", "state": "active", "page": "1"})
    assert 'rel="next"' not in students.text  # 15 active students fit on one page
    export = re.search(r'href="([^"]*export\.csv[^"]*)"', students.text).group(1)
    assert f"q={tag}" in export and "role=student" in export and "state=active" in export

    # Nonsense in the query string is ignored, never a 500.
    odd = browser.get("/admin/accounts", params={"page": "-3", "state": "weird", "q": "%_" * 80})
    assert odd.status_code == 200


# --- CSV export ------------------------------------------------------------------------
def test_csv_export_is_filtered_utf8_with_bom_and_formula_safe(server, make_user):
    tag = secrets.token_hex(3)
    school_class = make_class(server)
    names = {
        f"x{tag}-1": "=HYPERLINK(\"http://evil.example\",\"click\")",
        f"x{tag}-2": "+7 700 000",
        f"x{tag}-3": "-2+3",
        f"x{tag}-4": "@SUM(A1:A9)",
        f"x{tag}-5": "Айгүл Осмонова",
    }
    created = {login: make_user(roles=("student",), login=login, display_name=name, email=f"{login}@school.test")
               for login, name in names.items()}
    put_in_classes(server, created[f"x{tag}-5"].id, [school_class])
    set_locked(server, created[f"x{tag}-4"].id)
    make_user(roles=("student",), display_name="Someone else")
    browser, _ = console(server, make_user, "security_officer")

    response = browser.get("/admin/accounts/export.csv", params={"q": tag})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in response.headers["Content-Disposition"]
    assert "no-store" in response.headers["Cache-Control"]
    assert response.content.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert rows[0] == ["Login", "Name", "E-mail", "Roles", "Classes", "State", "Created"]
    by_login = {row[0]: row for row in rows[1:]}
    assert set(by_login) == set(names)
    assert by_login[f"x{tag}-1"][1] == "'" + names[f"x{tag}-1"]
    assert by_login[f"x{tag}-2"][1] == "'+7 700 000"
    assert by_login[f"x{tag}-3"][1] == "'-2+3"
    assert by_login[f"x{tag}-4"][1] == "'@SUM(A1:A9)"
    assert by_login[f"x{tag}-4"][5] == "Locked"
    cyrillic = by_login[f"x{tag}-5"]
    assert cyrillic[1:6] == ["Айгүл Осмонова", f"x{tag}-5@school.test", "student", school_class, "Active"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", cyrillic[6])
    # No cell starts with a formula character.
    assert not [cell for row in rows for cell in row if cell[:1] in ("=", "+", "-", "@")]

    only_locked = browser.get("/admin/accounts/export.csv", params={"q": tag, "state": "locked"})
    assert [row[0] for row in csv.reader(io.StringIO(only_locked.content.decode("utf-8-sig")))][1:] == [f"x{tag}-4"]


# --- create --------------------------------------------------------------------------------
def test_create_account_without_password_then_offer_activation(server, make_user):
    school_class = make_class(server)
    browser, _ = console(server, make_user, "school_admin")
    login = "new-" + secrets.token_hex(4)
    page = browser.get("/admin/accounts/new")
    response = browser.submit(
        page, "/admin/accounts/new", login=login.upper(), display_name="Бакыт Асанов", email=f"{login}@school.test",
        locale="ru", roles=["student"], classes=[school_class],
    )
    assert response.status_code == 303, errors(response)
    account_page = browser.get(response.headers["Location"])
    assert account_page.status_code == 200
    assert login in account_page.text and "Бакыт Асанов" in account_page.text and school_class in account_page.text
    assert "/activation-code" in account_page.text
    with server.services.db.transaction() as session:
        user = session.scalar(select(User).where(User.login == login))
        assert user.password_hash is None
        assert user.role_names == ["student"] and user.class_names == [school_class] and user.locale == "ru"
    assert journal(server, user.id, "account:create")


def test_create_refuses_a_role_with_permissions_the_admin_lacks(server, make_user):
    browser, _ = console(server, make_user, "school_admin")
    page = browser.get("/admin/accounts/new")
    # The page offers tech_support only greyed out: school admins cannot lock accounts.
    assert re.search(r'value="tech_support"[^>]*disabled', page.text)
    login = "esc-" + secrets.token_hex(4)
    refused = browser.submit(page, "/admin/accounts/new", login=login, display_name="Would Be Support",
                             email="", locale="", roles=["student", "tech_support"], classes=[])
    assert refused.status_code == 400
    assert errors(refused)
    assert 'value="Would Be Support"' in refused.text  # what was typed is kept
    with server.services.db.transaction() as session:
        assert session.scalar(select(User).where(User.login == login)) is None

    # A role whose permissions the admin holds is fine, including their own.
    allowed = browser.submit(browser.get("/admin/accounts/new"), "/admin/accounts/new", login=login,
                             display_name="Second Admin", email="", locale="", roles=["school_admin"], classes=[])
    assert allowed.status_code == 303, errors(allowed)


def test_create_shows_form_errors_for_bad_input(server, make_user):
    existing = make_user(roles=("student",))
    browser, _ = console(server, make_user, "school_admin")
    page = browser.get("/admin/accounts/new")
    for fields in (
        {"login": "bad login!", "display_name": "X"},
        {"login": existing.login, "display_name": "Duplicate"},
        {"login": "ok-" + secrets.token_hex(3), "display_name": ""},
        {"login": "ok-" + secrets.token_hex(3), "display_name": "X", "email": "not-an-address"},
        {"login": "ok-" + secrets.token_hex(3), "display_name": "X", "locale": "de"},
        {"login": "ok-" + secrets.token_hex(3), "display_name": "X", "roles": ["no-such-role"]},
    ):
        values = {"email": "", "locale": "", "roles": [], "classes": [], **fields}
        response = browser.submit(page, "/admin/accounts/new", **values)
        assert response.status_code == 400, fields
        assert errors(response), fields
        assert "Traceback" not in response.text


# --- edit ------------------------------------------------------------------------------------
def test_edit_profile_roles_and_classes(server, make_user):
    class_a, class_b = make_class(server), make_class(server)
    person = make_user(roles=("student", "tech_support"), display_name="Old Name")
    browser, _ = console(server, make_user, "school_admin")

    profile = browser.get(f"/admin/accounts/{person.id}/profile")
    assert 'value="Old Name"' in profile.text
    saved = browser.submit(profile, "/profile", display_name="Нургүл Токтосунова", email="n@school.test",
                           locale="ky")
    assert saved.status_code == 303
    bad = browser.submit(profile, "/profile", display_name="", email="x", locale="ky")
    assert bad.status_code == 400 and errors(bad)
    user = db_user(server, person.id)
    assert (user.display_name, user.email, user.locale) == ("Нургүл Токтосунова", "n@school.test", "ky")

    roles = browser.get(f"/admin/accounts/{person.id}/roles")
    # tech_support is not the school admin's to change: it is kept although the browser
    # does not send the greyed-out box.
    changed = browser.submit(roles, "/roles", roles=["teacher"])
    assert changed.status_code == 303, errors(changed)
    assert db_user(server, person.id).role_names == ["teacher", "tech_support"]
    escalate = browser.submit(roles, "/roles", roles=["teacher", "tech_support", "security_officer"])
    assert escalate.status_code == 400 and errors(escalate)
    assert db_user(server, person.id).role_names == ["teacher", "tech_support"]

    classes = browser.get(f"/admin/accounts/{person.id}/classes")
    assert browser.submit(classes, "/classes", classes=[class_a, class_b]).status_code == 303
    assert db_user(server, person.id).class_names == sorted([class_a, class_b])
    assert browser.submit(classes, "/classes", classes=["NOPE-CLASS"]).status_code == 400
    assert db_user(server, person.id).class_names == sorted([class_a, class_b])

    page = browser.get(f"/admin/accounts/{person.id}")
    assert "Нургүл Токтосунова" in page.text and class_a in page.text and "teacher" in page.text
    assert journal(server, person.id, "account:roles") and journal(server, person.id, "account:classes")


# --- guardians -----------------------------------------------------------------------------
def test_guardian_link_shows_on_both_pages_and_in_the_children_claim(server, make_user, make_client):
    parent = make_user(roles=("parent",), display_name="Parent Person")
    child = make_user(roles=("student",), display_name="Child Person")
    browser, _ = console(server, make_user, "school_admin")

    page = browser.get(f"/admin/accounts/{parent.id}/guardians")
    unknown = browser.submit(page, f"/admin/accounts/{parent.id}/guardians", child_login="no-such-" + secrets.token_hex(3))
    assert unknown.status_code == 400 and errors(unknown)
    itself = browser.submit(page, f"/admin/accounts/{parent.id}/guardians", child_login=parent.login)
    assert itself.status_code == 400 and errors(itself)
    linked = browser.submit(page, f"/admin/accounts/{parent.id}/guardians", child_login=child.login.upper())
    assert linked.status_code == 303

    assert f'href="/admin/accounts/{child.id}">Child Person ({child.login})' in browser.get(f"/admin/accounts/{parent.id}").text
    assert f'href="/admin/accounts/{parent.id}">Parent Person ({parent.login})' in browser.get(f"/admin/accounts/{child.id}").text

    client = make_client(scopes=["openid", "profile"], trusted=True)
    parent_browser = Browser(server.url)
    params, verifier, _ = parent_browser.authorize(client, parent, scope="openid profile")
    tokens = requests.post(
        server.url + "/token",
        data={"grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
              "code_verifier": verifier},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    ).json()
    jwks = requests.get(server.url + "/jwks.json", timeout=10).json()
    _, claims = decode_verified(tokens["id_token"], jwks)
    assert claims["children"] == [{"sub": child.subject, "name": "Child Person"}]

    # Unlinking from the child's page removes it from both.
    child_page = browser.get(f"/admin/accounts/{child.id}/guardians")
    assert browser.submit(child_page, "/guardians/unlink").status_code == 303
    assert f'href="/admin/accounts/{parent.id}"' not in browser.get(f"/admin/accounts/{child.id}").text
    assert db_user_children(server, parent.id) == []
    assert journal(server, child.id, "account:guardian:link") and journal(server, child.id, "account:guardian:unlink")


# --- lock, unlock, end sessions, require password change -----------------------------------
def test_lock_ends_sessions_and_tokens_and_is_journaled_then_unlock(server, make_user, make_client):
    person, their_browser, client, tokens = signed_in_with_tokens(server, make_user, make_client)
    support, agent = console(server, make_user, "tech_support")

    form = support.get(f"/admin/accounts/{person.id}/lock")
    reason = "Reported compromised by the class teacher " + secrets.token_hex(3)
    done = support.submit(form, "/lock", confirm_login=person.login, reason=reason)
    assert done.status_code == 303
    account_page = support.get(done.headers["Location"])
    assert 'class="flash' in account_page.text
    assert reason in account_page.text  # the lock reason and the journal row
    assert re.search(rf"account:lock</code></td><td>{re.escape(agent.login)}</td><td>{re.escape(reason)}",
                     account_page.text)

    # The person's browser session is over and the portal app's refresh token is dead.
    assert their_browser.get("/").status_code == 302
    assert "/login" in their_browser.get("/").headers["Location"]
    dead = refresh(server, client, tokens["refresh_token"])
    assert dead.status_code == 400 and dead.json()["error"] == "invalid_grant"
    again = Browser(server.url).sign_in(person.login, person.password)
    assert again.status_code == 403

    [event] = journal(server, person.id, "account:lock")
    assert event.reason == reason and event.actor == f"user:{agent.id}"

    # Locking twice is not offered; unlocking needs its own confirmation and reason.
    assert support.get(f"/admin/accounts/{person.id}/lock").status_code == 303
    unlock = support.get(f"/admin/accounts/{person.id}/unlock")
    assert support.submit(unlock, "/unlock", confirm_login=person.login, reason="Password changed with support").status_code == 303
    assert not db_user(server, person.id).locked
    assert Browser(server.url).sign_in(person.login, person.password).status_code == 303
    assert journal(server, person.id, "account:unlock")[0].reason == "Password changed with support"


@pytest.mark.parametrize(
    ("confirm", "reason"),
    [("someone-else", "a good reason"), ("", "a good reason"), ("{login}", ""), ("{login}", "   ")],
)
def test_lock_needs_the_typed_login_and_a_reason(server, make_user, confirm, reason):
    person = make_user(roles=("student",))
    support, _ = console(server, make_user, "tech_support")
    form = support.get(f"/admin/accounts/{person.id}/lock")
    response = support.submit(form, "/lock", confirm_login=confirm.format(login=person.login), reason=reason)
    assert response.status_code == 400
    assert errors(response)
    assert not db_user(server, person.id).locked
    assert journal(server, person.id, "account:lock") == []
    assert Browser(server.url).sign_in(person.login, person.password).status_code == 303


def test_end_sessions_with_reason(server, make_user, make_client):
    person, their_browser, client, tokens = signed_in_with_tokens(server, make_user, make_client)
    support, _ = console(server, make_user, "tech_support")
    form = support.get(f"/admin/accounts/{person.id}/sessions/end")
    missing = support.submit(form, "/sessions/end", confirm_login=person.login, reason="")
    assert missing.status_code == 400 and their_browser.get("/").status_code == 200

    done = support.submit(form, "/sessions/end", confirm_login=person.login, reason="Lost phone")
    assert done.status_code == 303
    assert their_browser.get("/").status_code == 302
    assert refresh(server, client, tokens["refresh_token"]).json()["error"] == "invalid_grant"
    assert journal(server, person.id, "account:sessions:end")[0].reason == "Lost phone"
    # Not locked: the person signs in again.
    assert Browser(server.url).sign_in(person.login, person.password).status_code == 303


def test_require_password_change_with_reason(server, make_user):
    person = make_user(roles=("student",))
    support, _ = console(server, make_user, "tech_support")
    form = support.get(f"/admin/accounts/{person.id}/password/require-change")
    wrong = support.submit(form, "/password/require-change", confirm_login="nobody", reason="Shared password")
    assert wrong.status_code == 400 and not db_user(server, person.id).must_change_password
    done = support.submit(form, "/password/require-change", confirm_login=person.login, reason="Shared password")
    assert done.status_code == 303
    assert db_user(server, person.id).must_change_password
    assert journal(server, person.id, "account:password:require-change")[0].reason == "Shared password"
    # The next sign-in asks for a new password first.
    response = Browser(server.url).sign_in(person.login, person.password)
    assert response.status_code == 303 and response.headers["Location"].endswith("/password/change-required")


def test_unknown_account_is_404_not_500(server, make_user):
    browser, _ = console(server, make_user, "school_admin")
    assert browser.get("/admin/accounts/99999999").status_code == 404
    assert browser.get("/admin/accounts/99999999/profile").status_code == 404


def test_search_folds_cyrillic_and_matches_wildcards_literally(server, browser, make_user):
    admin = make_user(roles=("school_admin",))
    make_user(display_name="Айжамал Жунусова")
    make_user(display_name="Percent 100% Sure")
    browser.sign_in(admin.login, admin.password)
    found = browser.get("/admin/accounts", params={"q": "АЙЖАМАЛ"})
    assert "Айжамал Жунусова" in found.text
    literal = browser.get("/admin/accounts", params={"q": "100%"})
    assert "Percent 100% Sure" in literal.text
    wildcard = browser.get("/admin/accounts", params={"q": "%"})
    assert "Айжамал Жунусова" not in wildcard.text
