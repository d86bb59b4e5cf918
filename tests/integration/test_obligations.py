"""The confidentiality obligation (policy 2.5: "the employee accepts an obligation not
to disclose confidential information"), through HTTP: a versioned text per role,
accepted at sign-in before any session or authorization code exists, accepted again
when a new version is published, each acceptance stored with its version, time and IP,
journalled, and shown in the console."""

from __future__ import annotations

import re
import secrets
from datetime import UTC
from zoneinfo import ZoneInfo

import requests
from babel.dates import format_time
from sqlalchemy import select

from idp.access.roles import create_role
from idp.accounts import obligations
from idp.accounts.models import (
    SEEDED_ROLES,
    SEEDED_ROLES_REQUIRING_2FA,
    Obligation,
    ObligationAcceptance,
    Role,
)
from idp.audit.models import AuditEvent
from tests.helpers import Browser, callback_params, pkce_pair

BISHKEK = ZoneInfo("Asia/Bishkek")
NOT_TICKED = "Tick the box to confirm that you have read the obligation and accept it."


# --- helpers -------------------------------------------------------------------------

def english(server) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def errors(page: requests.Response) -> list[str]:
    return re.findall(r'<p class="error" role="alert">(.*?)</p>', page.text, re.S)


def csrf_of(page: requests.Response) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
    assert match, page.text[:2000]
    return match.group(1)


def signed_in(browser: Browser) -> bool:
    return browser.get("/").status_code == 200


def custom_role(server, requires_2fa: bool = False) -> str:
    """A role without a second-factor requirement (and no obligation until one is published)."""
    name = f"obl_{secrets.token_hex(4)}"
    with server.services.db.transaction() as session:
        role = create_role(session, name=name, description="for a test", permissions=set())
        role.requires_2fa = requires_2fa
    return name


def acceptances(server, user_id: int) -> list[tuple[str, int, str | None, str]]:
    """(role, version, ip, locale) of every acceptance, oldest first."""
    with server.services.db.transaction() as session:
        rows = session.scalars(
            select(ObligationAcceptance).where(ObligationAcceptance.user_id == user_id)
            .order_by(ObligationAcceptance.id)
        )
        return [(a.obligation.role.name, a.obligation.version, a.ip, a.locale) for a in rows]


def current_obligation(server, role_name: str) -> Obligation:
    with server.services.db.transaction() as session:
        role = session.scalar(select(Role).where(Role.name == role_name))
        obligation = obligations.latest_for_role(session, role)
        assert obligation is not None
        session.expunge(obligation)
        return obligation


def events(server, action: str, subject: str) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(
            select(AuditEvent).where(AuditEvent.action == action, AuditEvent.subject == subject)
            .order_by(AuditEvent.seq)
        ))
        for row in rows:
            session.expunge(row)
        return rows


def to_obligation_step(browser: Browser, person) -> requests.Response:
    """Password (and the second factor the test phone knows); returns the obligation page."""
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/obligation"), (
        response.status_code, response.headers.get("Location"), response.text[:500])
    page = browser.get("/login/obligation")
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    return page


def officer(server, make_user) -> Browser:
    """The security officer (admin:roles:write) signed in to the console with two factors."""
    person = make_user(roles=("security_officer",))
    browser = english(server)
    assert browser.sign_in(person.login, person.password).status_code == 303
    assert browser.get("/admin/roles").status_code == 200
    return browser


def publish(browser: Browser, role: str, *, ky: str, ru: str, en: str, reason: str = "text reviewed") -> requests.Response:
    page = browser.get(f"/admin/roles/{role}/obligation")
    assert page.status_code == 200
    return browser.post(f"/admin/roles/{role}/obligation",
                        data={"csrf_token": csrf_of(page), "text_ky": ky, "text_ru": ru, "text_en": en,
                              "reason": reason})


def texts(tag: str) -> dict[str, str]:
    return {"ky": f"Милдеттенме {tag}: купуя маалыматты жарыя кылбайм.",
            "ru": f"Обязательство {tag}: не разглашаю конфиденциальную информацию.",
            "en": f"Obligation {tag}: I do not disclose confidential information."}


# --- seeding ---------------------------------------------------------------------------

def test_every_employee_role_is_seeded_with_version_1_in_three_languages(server, make_user):
    make_user()  # seeds the roles, as `darbaza db upgrade` and `demo seed` do
    with server.services.db.transaction() as session:
        roles = {r.name: r for r in session.scalars(select(Role))}
        for name in SEEDED_ROLES:
            first = session.scalar(select(Obligation).where(Obligation.role_id == roles[name].id,
                                                            Obligation.version == 1))
            if name not in SEEDED_ROLES_REQUIRING_2FA:
                assert first is None, name
                continue
            assert first is not None and first.created_by == "system", name
            assert "купуя" in first.text_ky.lower()
            assert "бир жумушчу күндүн ичинде" in first.text_ky  # policy 5.2.3
            assert "конфиденциальн" in first.text_ru and "For official use" in first.text_en
            # The console roles carry the clause about their access to other accounts.
            assert ("audit journal" in first.text_en) == (name in {"tech_support", "security_officer",
                                                                   "school_admin"})
    # Seeding again changes nothing (no second version 1, no duplicate).
    make_user()
    with server.services.db.transaction() as session:
        assert obligations.ensure_default_obligations(session) == []


# --- the sign-in step ------------------------------------------------------------------

def test_a_teacher_gets_no_session_and_no_code_until_accepting(server, make_user, make_client):
    teacher = make_user(roles=("teacher",), accept_obligations=False)
    client = make_client()
    current = current_obligation(server, "teacher")
    browser = Browser(server.url)  # Accept-Language: ky
    params, _verifier, last = browser.authorize(client, teacher)
    # The sign-in stopped at the obligation: no code went back to the app, no session.
    assert "code" not in params
    assert last.status_code == 200 and 'action="/login/obligation"' in last.text
    assert not signed_in(browser)
    # The text is shown in the person's language (Kyrgyz), with its version.
    first_line = current.text_ky.strip().splitlines()[0]
    assert first_line in last.text and current.text_en.strip().splitlines()[0] not in last.text
    assert f"{current.version}" in re.search(r"<h2>(.*?)</h2>", last.text, re.S).group(1)
    # A new /authorize while the obligation waits still gets no code.
    verifier, challenge = pkce_pair()
    again = browser.get("/authorize", params={
        "response_type": "code", "client_id": client.client_id, "redirect_uri": client.redirect_uri,
        "scope": "openid", "state": "s2", "code_challenge": challenge, "code_challenge_method": "S256"})
    assert "code=" not in again.headers.get("Location", "")
    assert not signed_in(browser)

    # Without the tick: a form error, still no session and nothing stored.
    page = browser.get("/login/obligation")
    # (the form reader sends every input; a browser leaves an unticked box out)
    refused = browser.submit(page, "/login/obligation", accept="")
    assert refused.status_code == 400 and 'role="alert"' in refused.text
    assert not signed_in(browser) and acceptances(server, teacher.id) == []

    # Accepting continues the sign-in where it was going: the app gets its code.
    page = browser.get("/login/obligation")
    done = browser.submit(page, "/login/obligation", accept="y")
    assert done.status_code == 303
    final = browser.follow_until_external(done)
    code = callback_params(final.headers.get("Location", ""))
    assert code.get("code") and final.headers["Location"].startswith(client.redirect_uri)
    assert signed_in(browser)

    # Stored with the version, the page's language and the IP; journalled.
    assert acceptances(server, teacher.id) == [("teacher", current.version, "127.0.0.1", "ky")]
    (accepted,) = events(server, "account:obligation:accept", f"user:{teacher.id}")
    assert accepted.details["role"] == "teacher" and accepted.details["version"] == current.version
    assert accepted.actor == f"user:{teacher.id}" and accepted.ip == "127.0.0.1"
    (success,) = events(server, "account:login:success", f"user:{teacher.id}")
    assert success.seq > accepted.seq and "mfa" in success.details["amr"]

    # The next sign-in does not ask again.
    other = english(server)
    assert other.sign_in(teacher.login, teacher.password).headers["Location"].endswith("/")
    assert signed_in(other)


def test_the_obligation_step_cannot_be_used_to_skip_the_second_factor(server, make_user):
    teacher = make_user(roles=("teacher",), accept_obligations=False)
    browser = english(server)
    page = browser.get("/login")
    first = browser.submit(page, "/login", login=teacher.login, password=teacher.password)
    assert first.headers["Location"].endswith("/login/second-factor")
    # Straight to the obligation page: sent back to the second factor.
    assert browser.get("/login/obligation").headers["Location"].endswith("/login/second-factor")
    token = csrf_of(browser.get("/login/second-factor"))
    skipped = browser.post("/login/obligation", data={"csrf_token": token, "accept": "y"})
    assert skipped.status_code == 303 and skipped.headers["Location"].endswith("/login/second-factor")
    assert not signed_in(browser) and acceptances(server, teacher.id) == []


def test_declining_cancels_the_sign_in(server, make_user):
    role = custom_role(server)
    admin = officer(server, make_user)
    assert publish(admin, role, **texts("v1")).status_code == 303
    person = make_user(roles=(role,), accept_obligations=False)
    browser = english(server)
    page = to_obligation_step(browser, person)
    assert "Obligation v1: I do not disclose confidential information." in page.text
    cancelled = browser.submit(page, "/login/obligation/cancel")
    assert cancelled.status_code == 303 and cancelled.headers["Location"].endswith("/login")
    assert not signed_in(browser)
    # The pending sign-in is gone: the step cannot be resumed without signing in again.
    assert browser.get("/login/obligation").headers["Location"].endswith("/login")
    assert acceptances(server, person.id) == []
    (declined,) = events(server, "account:obligation:decline", f"user:{person.id}")
    assert declined.details["obligations"] == [{"role": role, "version": 1}]
    assert events(server, "account:login:success", f"user:{person.id}") == []


def test_a_new_version_is_pending_again_at_the_next_sign_in(server, make_user):
    role = custom_role(server)
    admin = officer(server, make_user)
    person = make_user(roles=(role,), accept_obligations=False)
    # No obligation yet: the sign-in completes at once.
    browser = english(server)
    assert browser.sign_in(person.login, person.password).headers["Location"].endswith("/")

    assert publish(admin, role, **texts("v1")).status_code == 303
    # The session already open goes on; the next sign-in asks.
    assert signed_in(browser)
    second = english(server)
    page = to_obligation_step(second, person)
    assert "Obligation v1" in page.text
    assert second.submit(page, "/login/obligation", accept="y").status_code == 303
    assert signed_in(second)

    published = publish(admin, role, **texts("v2"), reason="new clause on messengers")
    assert published.status_code == 303
    third = english(server)
    page = to_obligation_step(third, person)
    assert "Obligation v2" in page.text and "Obligation v1" not in page.text
    assert third.submit(page, "/login/obligation", accept="y").status_code == 303
    assert signed_in(third)

    assert [(r, v) for r, v, _ip, _l in acceptances(server, person.id)] == [(role, 1), (role, 2)]
    versions = [e.details["version"] for e in events(server, "role:obligation:publish", f"role:{role}")]
    assert versions == [1, 2]
    (_first, last) = events(server, "role:obligation:publish", f"role:{role}")
    assert last.reason == "new clause on messengers" and last.details["previous_version"] == 1

    # The person's own page lists what they accepted, with the text.
    mine = third.get("/account/obligations")
    assert mine.status_code == 200
    rows = re.findall(r'<tr class="acceptance"><td>(.*?)</td><td>(\d+)</td><td>(.+?)</td></tr>', mine.text)
    assert [(r, v) for r, v, _when in rows] == [(role, "2"), (role, "1")]
    assert "Obligation v1" in mine.text and "Obligation v2" in mine.text
    assert 'href="/account/obligations"' in third.get("/").text


def test_a_text_published_while_reading_is_not_accepted_unseen(server, make_user):
    role = custom_role(server)
    admin = officer(server, make_user)
    assert publish(admin, role, **texts("v1")).status_code == 303
    person = make_user(roles=(role,), accept_obligations=False)
    browser = english(server)
    page = to_obligation_step(browser, person)
    assert publish(admin, role, **texts("v2")).status_code == 303
    stale = browser.submit(page, "/login/obligation", accept="y")
    assert stale.status_code == 409 and "Obligation v2" in stale.text
    box = re.search(r'<input[^>]*name="accept"[^>]*>', stale.text).group(0)
    assert "checked" not in box  # the new text was not read yet
    assert not signed_in(browser) and acceptances(server, person.id) == []
    assert browser.submit(stale, "/login/obligation", accept="y").status_code == 303
    assert [(r, v) for r, v, _ip, _l in acceptances(server, person.id)] == [(role, 2)]


def test_the_page_language_decides_the_text_shown_and_stored(server, make_user):
    role = custom_role(server)
    admin = officer(server, make_user)
    assert publish(admin, role, **texts("lang")).status_code == 303
    person = make_user(roles=(role,), accept_obligations=False)
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "ru"
    page = to_obligation_step(browser, person)
    assert "Обязательство lang" in page.text and "Obligation lang" not in page.text
    # The language switcher keeps the pending sign-in and shows the Kyrgyz text.
    switched = browser.submit(page, "/lang", lang="ky")
    assert switched.status_code == 303 and switched.headers["Location"].startswith("/login/obligation")
    page = browser.get("/login/obligation")
    assert "Милдеттенме lang" in page.text and "Обязательство lang" not in page.text
    assert browser.submit(page, "/login/obligation", accept="y").status_code == 303
    assert acceptances(server, person.id)[0][3] == "ky"


# --- the console -----------------------------------------------------------------------

def test_the_console_shows_acceptances_to_a_permitted_admin_and_refuses_others(server, make_user):
    role = custom_role(server)
    admin = officer(server, make_user)
    assert publish(admin, role, **texts("v1")).status_code == 303
    person = make_user(roles=(role,), accept_obligations=False)
    browser = english(server)
    page = to_obligation_step(browser, person)
    assert browser.submit(page, "/login/obligation", accept="y").status_code == 303

    support = make_user(roles=("tech_support",))
    desk = english(server)
    assert desk.sign_in(support.login, support.password).status_code == 303
    account = desk.get(f"/admin/accounts/{person.id}")
    assert account.status_code == 200
    (row,) = re.findall(r'<tr class="acceptance">(.*?)</tr>', account.text, re.S)
    with server.services.db.transaction() as session:
        accepted_at = session.scalar(select(ObligationAcceptance.accepted_at)
                                     .where(ObligationAcceptance.user_id == person.id))
    bishkek = format_time(accepted_at.replace(tzinfo=UTC), "short", tzinfo=BISHKEK, locale="en")
    assert f"<td>{role}</td><td>1</td>" in row and bishkek in row and "<td>127.0.0.1</td>" in row
    assert "not accepted yet" not in account.text

    # A new version: the console says it awaits the person.
    assert publish(admin, role, **texts("v2")).status_code == 303
    account = desk.get(f"/admin/accounts/{person.id}")
    (status,) = re.findall(r'<li class="obligation-status">(.*?)</li>', account.text, re.S)
    assert "version 2" in status and "not accepted yet" in status

    # Someone without admin:users:read (a teacher, signed in with two factors) is refused.
    teacher = make_user(roles=("teacher",))
    other = english(server)
    assert other.sign_in(teacher.login, teacher.password).status_code == 303
    assert other.get(f"/admin/accounts/{person.id}").status_code == 403
    assert other.get(f"/admin/roles/{role}/obligation").status_code == 403
    # Tech support reads the obligation but may not publish one.
    shown = desk.get(f"/admin/roles/{role}/obligation")
    assert shown.status_code == 200 and "Obligation v2" in shown.text and "text_en" not in shown.text
    refused = desk.post(f"/admin/roles/{role}/obligation", data={
        "csrf_token": csrf_of(shown), **{f"text_{k}": v for k, v in texts("v3").items()}, "reason": "x"})
    assert refused.status_code == 403
    assert current_obligation(server, role).version == 2


def test_the_admin_api_returns_an_accounts_acceptances(server, make_user, make_client):
    role = custom_role(server)
    admin = officer(server, make_user)
    assert publish(admin, role, **texts("api")).status_code == 303
    person = make_user(roles=(role,), accept_obligations=False)
    client = make_client(grant_types=["client_credentials"], scopes=["admin:users:read"], redirect_uris=[],
                         post_logout_redirect_uris=[], name="School IT script")
    token = requests.post(server.url + "/token", data={"grant_type": "client_credentials"},
                          auth=(client.client_id, client.client_secret), timeout=10).json()["access_token"]
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"
    before = api.get(f"{server.url}/admin/api/v1/users/{person.id}", timeout=10).json()
    assert before["obligations_pending"] == [{"role": role, "version": 1}]
    assert before["obligation_acceptances"] == []

    browser = english(server)
    page = to_obligation_step(browser, person)
    assert browser.submit(page, "/login/obligation", accept="y").status_code == 303
    after = api.get(f"{server.url}/admin/api/v1/users/{person.id}", timeout=10).json()
    assert after["obligations_pending"] == []
    (accepted,) = after["obligation_acceptances"]
    assert accepted["role"] == role and accepted["version"] == 1 and accepted["ip"] == "127.0.0.1"
    assert accepted["locale"] == "en" and accepted["accepted_at"].endswith("Z")


def test_publish_form_refuses_bad_input_with_form_errors(server, make_user):
    role = custom_role(server)
    admin = officer(server, make_user)
    good = texts("ok")
    cases = [
        ({**good, "ru": ""}, "Enter the text in Russian."),
        ({**good, "ky": "   \r\n  "}, "Enter the text in Kyrgyz."),
        ({**good, "en": "x" * (obligations.MAX_TEXT + 1)}, "At most 20000 characters."),
    ]
    for fields, message in cases:
        response = publish(admin, role, **fields)
        assert response.status_code == 400 and message in errors(response), (message, errors(response))
    no_reason = publish(admin, role, **good, reason=" ")
    assert no_reason.status_code == 400 and "Give a reason; it is kept in the audit journal." in errors(no_reason)
    with server.services.db.transaction() as session:
        assert session.scalar(select(Obligation.id).join(Role).where(Role.name == role)) is None

    assert publish(admin, role, **good).status_code == 303
    # The same words again are not a new version (everyone would accept them again for nothing).
    same = publish(admin, role, **good)
    assert same.status_code == 400 and "nothing to publish" in same.text
    assert current_obligation(server, role).version == 1
    # No CSRF token: refused, nothing published.
    forged = admin.post(f"/admin/roles/{role}/obligation", data={**{f"text_{k}": v for k, v in texts("x").items()},
                                                                  "reason": "forged"})
    assert forged.status_code == 400 and current_obligation(server, role).version == 1
    # The roles list shows each role's current version.
    listed = admin.get("/admin/roles").text
    row = re.search(rf'<tr id="role-{role}">(.*?)</tr>', listed, re.S).group(1)
    assert "version 1" in row


def test_role_form_sets_whether_members_need_a_second_factor(server, make_user):
    admin = officer(server, make_user)
    name = "librarian_" + secrets.token_hex(3)
    page = admin.get("/admin/roles/new")
    assert 'name="requires_2fa"' in page.text
    created = admin.post("/admin/roles/new", data={"csrf_token": csrf_of(page), "name": name, "description": "",
                                                   "requires_2fa": "y"})
    assert created.status_code == 303
    with server.services.db.transaction() as session:
        assert session.scalar(select(Role.requires_2fa).where(Role.name == name)) is True
    (made,) = events(server, "role:create", f"role:{name}")
    assert made.details["requires_2fa"] is True

    edit = admin.get(f"/admin/roles/{name}/edit")
    assert re.search(r'name="requires_2fa"[^>]*checked', edit.text)
    saved = admin.post(f"/admin/roles/{name}/edit", data={"csrf_token": csrf_of(edit)})
    assert saved.status_code == 303
    with server.services.db.transaction() as session:
        assert session.scalar(select(Role.requires_2fa).where(Role.name == name)) is False
    (changed,) = events(server, "role:2fa:change", f"role:{name}")
    assert changed.details["requires_2fa"] is False

    # The school's employee roles always require it: an unticked box changes nothing.
    teacher_edit = admin.get("/admin/roles/teacher/edit")
    assert re.search(r'name="requires_2fa"[^>]*disabled', teacher_edit.text)
    with server.services.db.transaction() as session:
        before = sorted(session.scalar(select(Role).where(Role.name == "teacher")).permissions)
    admin.post("/admin/roles/teacher/edit", data={"csrf_token": csrf_of(teacher_edit), "permissions": before})
    with server.services.db.transaction() as session:
        assert session.scalar(select(Role.requires_2fa).where(Role.name == "teacher")) is True
