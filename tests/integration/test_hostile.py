"""Targeted hostile-input tests over real HTTP (issue 9 "Hostile input"):

- CSRF on every POST route of the url_map (the exempt set is listed and must equal the
  app's), with nothing changed by a refused POST;
- session fixation with a cookie the attacker chose or planted;
- clickjacking headers on every GET route, error pages and the console;
- stored XSS through the normal entry points (display names, lock reasons, breach-report
  descriptions and case notes, app names on consent and the sessions page, device strings,
  role descriptions and class names) rendered escaped;
- SQL and LDAP metacharacters in logins and searches;
- header injection in mail fields (e-mail change, password reset, report contact).

Open redirects (R1-R4) are in tests/integration/test_rfc9700.py; the property-based
sweep in tests/integration/test_fuzz.py also checks every redirect stays on the provider.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from markupsafe import escape
from sqlalchemy import select

from idp.accounts.models import User
from idp.breach.models import BreachCase
from idp.notify.models import OutboxMessage
from idp.oidc.clients import create_client
from tests.helpers import Browser, ClientInfo, form_fields
from tests.integration.test_fuzz import all_routes, concrete_path

SCHOOL_TZ = ZoneInfo("Asia/Bishkek")
XSS = [
    "<script>alert(1)</script>",
    "\"><img src=x onerror=alert(1)>",
    "'><svg onload=alert(1)>",
]
CSRF_MESSAGE = "The form has expired"

# POST routes that take no CSRF token, by design: the client authenticates itself
# (token, revocation, introspection: client credentials; userinfo and the admin API: a
# bearer token), or the request is an OAuth/OIDC front-channel request an app's page may
# send cross-site (OIDC Core 3.1.2.1 /authorize by POST; RP-Initiated Logout by POST, which
# without a valid id_token_hint only shows a confirmation form that has a token).
CSRF_EXEMPT = {
    ("/token", "POST"), ("/revoke", "POST"), ("/introspect", "POST"), ("/userinfo", "POST"),
    ("/authorize", "POST"), ("/end_session", "POST"),
}
CSRF_EXEMPT_PREFIX = "/admin/api/v1"  # the whole admin API blueprint (bearer tokens)


def en_browser(server: Any) -> Browser:
    b = Browser(server.url)
    b.http.headers["Accept-Language"] = "en"
    return b


def signed_in(server: Any, user: Any, **headers: str) -> Browser:
    b = en_browser(server)
    b.http.headers.update(headers)
    response = b.sign_in(user.login, user.password)
    assert response.status_code == 303 and "/login" not in response.headers["Location"], response.text[:300]
    return b


ADMIN_ROLES = ("school_admin", "security_officer", "tech_support")  # every console permission


def db_user(server: Any, user_id: int) -> User:
    with server.services.db.transaction() as session:
        user = session.get(User, user_id)
        session.expunge(user)
        return user


def assert_escaped(page: requests.Response, payload: str, where: str) -> None:
    """The payload is shown, and only in its escaped form."""
    assert page.status_code == 200, (where, page.status_code)
    assert payload not in page.text, (where, "unescaped", payload)
    assert str(escape(payload)) in page.text, (where, "not displayed", payload)


# --- CSRF ------------------------------------------------------------------------------------
def _actual_exempt(app: Any) -> set[tuple[str, str]]:
    csrf = app.extensions["csrf"]
    exempt_views = set(csrf._exempt_views)
    exempt_blueprints = {getattr(bp, "name", bp) for bp in csrf._exempt_blueprints}
    out = set()
    for rule, method, endpoint in all_routes(app):
        if method not in ("POST", "PUT", "PATCH", "DELETE"):
            continue
        view = app.view_functions[endpoint]
        if f"{view.__module__}.{view.__name__}" in exempt_views or endpoint.split(".")[0] in exempt_blueprints:
            out.add((rule, method))
    return out


def test_csrf_exemptions_are_exactly_the_listed_ones(server):
    actual = _actual_exempt(server.app)
    api = {(r, m) for r, m in actual if r.startswith(CSRF_EXEMPT_PREFIX)}
    assert actual - api == CSRF_EXEMPT
    # The whole admin API is exempt, and it is all bearer-token only.
    api_routes = {(r, m) for r, m, _ in all_routes(server.app)
                  if r.startswith(CSRF_EXEMPT_PREFIX) and m in ("POST", "PUT", "PATCH", "DELETE")}
    assert api == api_routes
    response = requests.post(server.url + CSRF_EXEMPT_PREFIX + "/users", json={"login": "x"}, timeout=10)
    assert response.status_code == 401 and response.json()["error"]


def test_every_post_route_needs_the_csrf_token_and_changes_nothing_without_it(server, make_user):
    target = make_user(roles=("student",), email=f"t{secrets.token_hex(3)}@school.test")
    student = make_user(roles=("student",))
    console_user = make_user(roles=ADMIN_ROLES)
    console = signed_in(server, console_user)
    person = signed_in(server, student)
    other = en_browser(server)
    foreign_token = form_fields(other.get("/login").text, "/login")[1]["csrf_token"]
    world = SimpleNamespace(target=SimpleNamespace(id=target.id),
                            client=SimpleNamespace(client_id="no-such-app"))
    before = db_user(server, target.id)
    checked = []
    for rule, method, _endpoint in all_routes(server.app):
        if method != "POST" or (rule, method) in CSRF_EXEMPT or rule.startswith(CSRF_EXEMPT_PREFIX):
            continue
        path = concrete_path(rule, world)  # type: ignore[arg-type]
        b = console if rule.startswith("/admin/") else person
        # Fields a real form would send, for the target account (so only the token is missing).
        data = {"login": target.login, "password": target.password, "confirm_login": target.login,
                "reason": "csrf test", "display_name": "Changed", "email": "changed@school.test",
                "roles": "school_admin", "new_password": "a new password " + secrets.token_hex(4),
                "code": "123456", "category": "other", "approve": "1", "sid": "x", "lang": "ru"}
        for token in (None, foreign_token, ""):
            body = dict(data) if token is None else dict(data, csrf_token=token)
            response = b.post(path, data=body)
            assert response.status_code == 400, (path, token is None, response.status_code,
                                                 response.headers.get("Location"))
            assert CSRF_MESSAGE in response.text, (path, response.text[:300])
            assert response.headers["X-Frame-Options"] == "DENY"
        checked.append(rule)
    assert len(checked) > 60
    # Nothing happened: both browsers are still signed in, the target account is as it was.
    assert console.get("/admin/").status_code == 200
    assert person.get("/").status_code == 200
    after = db_user(server, target.id)
    assert (after.locked, after.must_change_password, after.display_name, after.email, after.password_hash) == (
        before.locked, before.must_change_password, before.display_name, before.email, before.password_hash)
    assert signed_in(server, target).get("/").status_code == 200


# --- session fixation ----------------------------------------------------------------------
def _cookie_name(server: Any) -> str:
    return str(server.app.session_interface.cookie_name)


def test_an_attacker_chosen_session_cookie_is_never_adopted(server, make_user):
    user = make_user()
    name = _cookie_name(server)
    chosen = secrets.token_urlsafe(32)
    victim = en_browser(server)
    victim.http.cookies.set(name, chosen, domain="127.0.0.1", path="/")
    assert victim.sign_in(user.login, user.password).status_code == 303
    assert victim.get("/").status_code == 200
    assert victim.http.cookies.get(name) != chosen
    attacker = en_browser(server)
    attacker.http.cookies.set(name, chosen, domain="127.0.0.1", path="/")
    response = attacker.get("/")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_a_planted_anonymous_session_is_replaced_at_sign_in(server, make_user):
    """The attacker opens the login page (a real anonymous session with a CSRF token),
    plants that cookie in the victim's browser; the victim signs in through the two steps.
    The id changes at each step, and the planted one never becomes signed in."""
    name = _cookie_name(server)
    for roles in (("student",), ("teacher",)):  # password only; password + TOTP
        user = make_user(roles=roles)
        attacker = en_browser(server)
        attacker.get("/login")
        planted = attacker.http.cookies.get(name)
        assert planted
        victim = en_browser(server)
        victim.http.cookies.set(name, planted, domain="127.0.0.1", path="/")
        page = victim.get("/login")
        first = victim.submit(page, "/login", login=user.login, password=user.password)
        assert first.status_code == 303
        pending_id = victim.http.cookies.get(name)
        assert pending_id != planted
        done = victim.second_step(first, user.login)
        assert done.status_code == 303 and "/login" not in done.headers["Location"]
        assert victim.get("/").status_code == 200
        dead = [planted]
        if "teacher" in roles:  # the pending step had its own id; the second factor rotates it again
            assert victim.http.cookies.get(name) != pending_id
            dead.append(pending_id)
        for cookie in dead:
            probe = en_browser(server)
            probe.http.cookies.set(name, cookie, domain="127.0.0.1", path="/")
            response = probe.get("/")
            assert response.status_code == 302 and "/login" in response.headers["Location"]


# --- clickjacking --------------------------------------------------------------------------
def test_every_get_route_and_error_page_refuses_framing(server, make_user):
    target = make_user()
    console = signed_in(server, make_user(roles=ADMIN_ROLES))
    person = signed_in(server, make_user())
    anon = en_browser(server)
    client = SimpleNamespace(client_id="no-such-app")
    world = SimpleNamespace(target=SimpleNamespace(id=target.id), client=client)
    static = sorted(p.name for p in Path(server.app.static_folder or ".").glob("*.js"))
    paths: list[tuple[Browser, str]] = []
    for rule, method, _ in all_routes(server.app):
        if method != "GET":
            continue
        path = concrete_path(rule, world)  # type: ignore[arg-type]
        if rule.startswith("/static/") and static:
            path = "/static/" + static[0]
        for b in {id(x): x for x in (console if rule.startswith("/admin") else person, anon)}.values():
            paths.append((b, path))
    # Error pages: 404, 405 (page and JSON), 400 (authorize without a client), CSRF 400,
    # a console page without the permission (403), an unknown API path.
    extra = [(anon, "/no-such-page"), (anon, "/authorize"), (person, "/admin/"), (anon, "/token"),
             (anon, CSRF_EXEMPT_PREFIX + "/nothing"), (anon, "/static/nothing.js"), (anon, "/%ff"),
             (person, "/admin/accounts/999999")]
    statuses = set()
    for b, path in paths + extra:
        response = b.get(path)
        statuses.add(response.status_code)
        h = response.headers
        assert h.get("X-Frame-Options") == "DENY", (path, response.status_code)
        assert "frame-ancestors 'none'" in h.get("Content-Security-Policy", ""), (path, response.status_code)
    posted = anon.post("/login", data={"login": "x"})  # CSRF error page
    assert posted.status_code == 400 and posted.headers["X-Frame-Options"] == "DENY"
    assert {200, 302, 400, 403, 404, 405} <= statuses, statuses
    assert len(paths) > 100


# --- stored XSS ------------------------------------------------------------------------------
def test_names_and_reasons_typed_in_the_console_are_escaped(server, make_user):
    admin = signed_in(server, make_user(roles=ADMIN_ROLES))
    target = make_user()
    name = XSS[0] + "Ali"
    page = admin.get(f"/admin/accounts/{target.id}/profile")
    _, fields = form_fields(page.text, "/profile")
    fields.update(display_name=name, locale="ky")
    response = admin.post(f"/admin/accounts/{target.id}/profile", data=fields)
    assert response.status_code in (302, 303), response.text[:500]
    assert db_user(server, target.id).display_name == name
    assert_escaped(admin.get(f"/admin/accounts/{target.id}"), name, "console account page")
    assert_escaped(admin.get("/admin/accounts", params={"q": target.login}), name, "console account list")
    assert_escaped(signed_in(server, target).get("/"), name, "the person's own account page")
    # A lock reason.
    reason = XSS[1] + " shared his password"
    page = admin.get(f"/admin/accounts/{target.id}/lock")
    response = admin.submit(page, "/lock", confirm_login=target.login, reason=reason)
    assert response.status_code in (302, 303), response.text[:500]
    assert db_user(server, target.id).locked
    assert_escaped(admin.get(f"/admin/accounts/{target.id}"), reason, "lock reason")
    assert_escaped(admin.get("/admin/audit", params={"subject": f"user:{target.id}"}), reason, "journal")
    # A role description, a class name.
    role = "r" + secrets.token_hex(4)
    page = admin.get("/admin/roles/new")
    response = admin.submit(page, "/admin/roles/new", name=role, description=XSS[2])
    assert response.status_code in (302, 303), response.text[:500]
    assert_escaped(admin.get("/admin/roles"), XSS[2], "role list")
    page = admin.get("/admin/classes/new")
    response = admin.submit(page, "/admin/classes/new", name=XSS[0][:20])
    # Either refused with a form message, or created and shown escaped.
    assert response.status_code in (200, 302, 303, 400)
    if response.status_code in (200, 400):
        assert 'role="alert"' in response.text and XSS[0][:20] not in response.text
    else:
        assert XSS[0][:20] not in admin.get("/admin/classes").text


def test_report_descriptions_and_case_notes_are_escaped(server, make_user):
    student = make_user()
    b = signed_in(server, student)
    description = XSS[0] + " someone changed my " + XSS[1]
    page = b.get("/account/report-problem")
    now = datetime.now(SCHOOL_TZ).strftime("%Y-%m-%dT%H:%M")
    response = b.submit(page, "/account/report-problem", category="other", noticed=now, description=description)
    assert response.status_code in (200, 302, 303), response.text[:500]
    officer = signed_in(server, make_user(roles=ADMIN_ROLES))
    with server.services.db.transaction() as session:
        case_id = session.scalars(select(BreachCase.id).where(BreachCase.user_id == student.id)).one()
    assert_escaped(officer.get(f"/admin/cases/{case_id}"), description, "case page")
    note = XSS[2] + " called the parent"
    page = officer.get(f"/admin/cases/{case_id}")
    response = officer.submit(page, f"/admin/cases/{case_id}/note", reason=note)
    assert response.status_code in (302, 303), response.text[:500]
    assert_escaped(officer.get(f"/admin/cases/{case_id}"), note, "case note")
    assert officer.get("/admin/cases").status_code == 200


def test_app_names_on_consent_sessions_and_console_are_escaped(server, make_user):
    name = XSS[1] + " Diary"
    with server.services.db.transaction() as session:
        client, secret = create_client(session, name=name, redirect_uris=["https://rp.example.test/cb"],
                                       post_logout_redirect_uris=[], client_id="xss-" + secrets.token_hex(5),
                                       trusted=False)
        info = ClientInfo(client.client_id, secret, "https://rp.example.test/cb", "")
    user = make_user()
    b = signed_in(server, user)
    _params, _verifier, consent = b.authorize(info, user, consent=False)
    assert 'action="/authorize/consent"' in consent.text
    assert_escaped(consent, name, "consent page")
    params, _verifier, _ = b.authorize(info, user)
    assert "code" in params
    assert_escaped(b.get("/account/sessions"), name, "sessions page (apps used)")
    admin = signed_in(server, make_user(roles=ADMIN_ROLES))
    assert_escaped(admin.get("/admin/apps"), name, "console app list")
    assert_escaped(admin.get(f"/admin/apps/{info.client_id}"), name, "console app page")


@pytest.mark.parametrize("agent", [XSS[0] + "/1.0", "Mozilla/5.0 (" + XSS[1] + ") Chrome/126.0 " + XSS[0]])
def test_device_strings_never_reach_a_page_raw(server, make_user, agent):
    user = make_user()
    b = signed_in(server, user, **{"User-Agent": agent})
    own = b.get("/account/sessions")
    assert own.status_code == 200 and 'class="session' in own.text
    for payload in XSS:
        assert payload not in own.text
    admin = signed_in(server, make_user(roles=ADMIN_ROLES))
    page = admin.get(f"/admin/accounts/{user.id}")
    assert page.status_code == 200
    for payload in XSS:
        assert payload not in page.text
    # The label comes from the UA parser, never the raw string.
    assert "Chrome 126" in own.text or "Unknown device" in own.text


# --- SQL and LDAP metacharacters -----------------------------------------------------------------
METACHARACTERS = [
    "' OR 1=1 --", "' OR '1'='1", "\" OR \"\"=\"", "admin'--", "'; DROP TABLE users; --", "1; SELECT 1",
    "*", "*)(uid=*", "admin)(|(a=*", "*)(|(objectClass=*))", "\\2a", "%", "_", "\\", "\x00",
]


def test_metacharacters_in_logins_match_no_account(server, make_user):
    user = make_user()
    b = en_browser(server)
    tries = METACHARACTERS + [user.login[:-2] + "%", user.login[:-1] + "_", user.login + "' --",
                              user.login + "*", "*" + user.login[2:], user.login + ")(uid=*"]
    for login in tries:
        page = b.get("/login")
        response = b.submit(page, "/login", login=login, password=user.password)
        assert response.status_code in (200, 400, 401), (login, response.status_code, response.headers.get("Location"))
        assert 'role="alert"' in response.text, login
        assert b.get("/").status_code == 302, login
    # The same at the password-reset form: the one answer for every login, no 500.
    for login in tries:
        page = b.get("/password/forgot")
        response = b.submit(page, "/password/forgot", login=login)
        assert response.status_code in (200, 303, 400, 429), (login, response.status_code)
    # The console's search takes them literally.
    admin = signed_in(server, make_user(roles=ADMIN_ROLES))
    for q in METACHARACTERS:
        response = admin.get("/admin/accounts", params={"q": q})
        assert response.status_code in (200, 400), (q, response.status_code)
        if q != "\x00":  # a NUL-only search is an empty one: the whole list
            assert user.login not in response.text, repr(q)
    # And the real login still works.
    assert signed_in(server, user).get("/").status_code == 200


# --- mail header injection -----------------------------------------------------------------------
INJECTIONS = [
    "a@b.test\r\nBcc: evil@y.test", "a@b.test\nBcc: evil@y.test", "a@b.test%0D%0ABcc:evil@y.test",
    "\"a\r\nBcc: evil@y.test\"@b.test", "a@b.test, evil@y.test", "a@b.test\r\n\r\nbody", "A <a@b.test>\r\nCc: evil@y.test",
]


def _outbox_since(server: Any, first_id: int) -> list[OutboxMessage]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(select(OutboxMessage).where(OutboxMessage.id > first_id)))
        for row in rows:
            session.expunge(row)
        return rows


def _last_outbox_id(server: Any) -> int:
    from sqlalchemy import func

    with server.services.db.transaction() as session:
        return int(session.scalar(select(func.max(OutboxMessage.id))) or 0)


def test_header_injection_in_mail_fields_is_refused(server, make_user):
    start = _last_outbox_id(server)
    email = f"s{secrets.token_hex(3)}@school.test"
    user = make_user(email=email)
    b = signed_in(server, user)
    for value in INJECTIONS:
        page = b.get("/account/email")
        assert page.status_code == 200, page.status_code
        token = form_fields(page.text, "/account/email")[1]["csrf_token"]
        # Posted to the change form itself (the page's first form sends a new link).
        response = b.post("/account/email", data={"csrf_token": token, "email": value})
        assert response.status_code in (200, 400), (value, response.status_code)
        assert 'role="alert"' in response.text, (value, response.text[:300])
    assert db_user(server, user.id).email == email
    # Password reset asked for with an injected login or address: the usual answer.
    anon = en_browser(server)
    for value in INJECTIONS + [email + "\r\nBcc: evil@y.test"]:
        page = anon.get("/password/forgot")
        response = anon.submit(page, "/password/forgot", login=value)
        assert response.status_code in (200, 303, 400, 429), (value, response.status_code)
    # The report form's contact field.
    for value in INJECTIONS:
        page = anon.get("/report-problem")
        now = datetime.now(SCHOOL_TZ).strftime("%Y-%m-%dT%H:%M")
        response = anon.submit(page, "/report-problem", login="nobody-" + secrets.token_hex(3), contact=value,
                               category="other", noticed=now)
        assert response.status_code in (200, 400, 429), (value, response.status_code)
        if response.status_code != 429:
            assert 'role="alert"' in response.text, (value, response.text[:300])
    for message in _outbox_since(server, start):
        assert "evil@y.test" not in message.to_address and "evil@y.test" not in message.body_text
        assert not re.search(r"[\r\n]", message.to_address + message.subject), message.to_address
