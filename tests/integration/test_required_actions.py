"""The pending sign-in chain (idp/login/pending.py): after the password, each required
step in turn — second factor, new password, 2FA enrolment when a role requires it, the
confidentiality obligation — and no session and no authorization code before the last
one is done. Steps cannot be skipped by posting to a later one, and the console opens
only for a session signed in with two factors."""

from __future__ import annotations

import re
import time

import pyotp
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from sqlalchemy import select

from idp.accounts.models import Role, User
from idp.audit.models import AuditEvent
from tests.helpers import Browser, decode_verified, form_fields


def english(server) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def fresh_code(secret: str) -> str:
    # Not in the last two seconds of a step, so the server checks the same step.
    if 30 - time.time() % 30 < 2:
        time.sleep(30 - time.time() % 30 + 0.05)
    return pyotp.TOTP(secret).now()


def signed_in(browser: Browser) -> bool:
    return browser.get("/").status_code == 200


def enrol_in_chain(browser: Browser, page: requests.Response) -> tuple[str, requests.Response]:
    """On /login/enrol-2fa: read the key as a phone would, give the first code."""
    secret = re.search(r'<code class="secret">([A-Z2-7 ]+)</code>', page.text).group(1).replace(" ", "")
    response = browser.submit(page, "/login/enrol-2fa", code=fresh_code(secret))
    return secret, response


def test_a_role_that_requires_2fa_enrols_it_before_any_code_is_issued(server, make_user, make_client):
    teacher = make_user(roles=("teacher",), two_factor=False)
    client = make_client(scopes=["openid", "profile"])
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    rp = OAuth2Session(client.client_id, client.client_secret, scope="openid profile",
                       redirect_uri=client.redirect_uri, code_challenge_method="S256")
    verifier = generate_token(48)
    url, state = rp.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier, nonce="n-req")
    browser = english(server)
    response = browser.follow_until_external(browser.get(url))
    response = browser.submit(response, "/login", login=teacher.login, password=teacher.password)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/enrol-2fa")
    # Nothing is signed in yet: no account page, and the flow gives no code.
    assert not signed_in(browser)
    again = browser.follow_until_external(browser.get(url))
    assert "code=" not in again.headers.get("Location", "")

    page = browser.get("/login/enrol-2fa")
    assert page.status_code == 200 and "<svg" in page.text
    assert "no-store" in page.headers["Cache-Control"]
    _secret, response = enrol_in_chain(browser, page)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/enrol-2fa/codes")
    codes_page = browser.get("/login/enrol-2fa/codes")
    assert len(re.findall(r"<li><code>", codes_page.text)) == 10
    assert "no-store" in codes_page.headers["Cache-Control"]
    assert not signed_in(browser)
    # The codes page shows them once; "continue" goes on to the flow this sign-in belongs to.
    response = browser.submit(codes_page, "/login/enrol-2fa/codes")
    callback = browser.follow_until_external(response).headers["Location"]
    assert callback.startswith(client.redirect_uri) and "code=" in callback
    token = rp.fetch_token(meta["token_endpoint"], authorization_response=callback, code_verifier=verifier,
                           state=state)
    _header, claims = decode_verified(token["id_token"], requests.get(meta["jwks_uri"], timeout=10).json())
    assert {"pwd", "otp", "mfa"} <= set(claims["amr"])
    assert claims["acr"] == "urn:darbaza:loa:2"
    with server.services.db.transaction() as session:
        assert session.get(User, teacher.id).has_totp
        enabled = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "mfa:totp:enable", AuditEvent.subject == f"user:{teacher.id}")).all()
        assert [e.details.get("required") for e in enabled] == [True]


def test_a_wrong_first_code_keeps_the_enrolment_step(server, make_user):
    staff = make_user(roles=("staff",), two_factor=False)
    browser = english(server)
    response = browser.sign_in(staff.login, staff.password)
    assert response.headers["Location"].endswith("/login/enrol-2fa")
    page = browser.get("/login/enrol-2fa")
    wrong = browser.submit(page, "/login/enrol-2fa", code="000000")
    assert wrong.status_code == 400 and "The code is incorrect" in wrong.text
    assert not signed_in(browser)
    with server.services.db.transaction() as session:
        assert not session.get(User, staff.id).has_totp


def test_later_steps_cannot_be_used_to_skip_earlier_ones(server, make_user):
    teacher = make_user(roles=("teacher",), two_factor=False, accept_obligations=False)
    with server.services.db.transaction() as session:
        session.get(User, teacher.id).must_change_password = True
    browser = english(server)
    response = browser.sign_in(teacher.login, teacher.password)
    assert response.headers["Location"].endswith("/password/change-required")
    change_page = browser.get("/password/change-required")
    _action, fields = form_fields(change_page.text, "/password/change-required")
    token = fields["csrf_token"]
    # The later steps' pages send the browser back to the due step ...
    for path in ("/login/enrol-2fa", "/login/enrol-2fa/codes", "/login/obligation", "/login/second-factor"):
        page = browser.get(path)
        assert page.status_code == 303 and page.headers["Location"].endswith("/password/change-required"), path
    # ... and posting to them changes nothing.
    for path, data in (("/login/enrol-2fa/codes", {}), ("/login/obligation", {"accept": "y"}),
                       ("/login/enrol-2fa", {"code": "123456"})):
        response = browser.post(path, data={"csrf_token": token, **data})
        assert response.status_code == 303 and response.headers["Location"].endswith("/password/change-required")
    assert not signed_in(browser)
    # Done in order, the chain goes on: new password -> enrolment -> obligation.
    new_password = "river stone lantern orchard"
    response = browser.submit(change_page, "/password/change-required", password=new_password, confirm=new_password)
    assert response.headers["Location"].endswith("/login/enrol-2fa")
    _secret, response = enrol_in_chain(browser, browser.get("/login/enrol-2fa"))
    response = browser.submit(browser.get("/login/enrol-2fa/codes"), "/login/enrol-2fa/codes")
    assert response.headers["Location"].endswith("/login/obligation")
    assert not signed_in(browser)


def test_the_password_minimum_is_8_for_a_role_that_requires_2fa(server, make_user):
    teacher = make_user(roles=("teacher",), two_factor=False)
    with server.services.db.transaction() as session:
        session.get(User, teacher.id).must_change_password = True
    browser = english(server)
    browser.sign_in(teacher.login, teacher.password)
    page = browser.get("/password/change-required")
    assert "At least 8 characters" in page.text


def test_the_console_needs_a_session_signed_in_with_two_factors(server, make_user):
    person = make_user(roles=("student",))
    browser = english(server)
    assert browser.sign_in(person.login, person.password).status_code == 303
    assert signed_in(browser)
    # Given a console role while signed in with the password alone:
    with server.services.db.transaction() as session:
        user = session.get(User, person.id)
        user.roles.append(session.scalar(select(Role).where(Role.name == "tech_support")))
    page = browser.get("/admin/")
    assert page.status_code == 403
    assert "The console needs two-factor sign-in" in page.text
    assert 'href="/account/2fa"' in page.text
    assert "/admin/accounts" not in page.text
    # The next sign-in asks for the second factor the role now requires.
    again = english(server)
    response = again.sign_in(person.login, person.password)
    assert response.headers["Location"].endswith("/login/enrol-2fa")


def test_a_console_role_signs_in_with_its_second_factor_and_opens_the_console(server, make_user):
    support = make_user(roles=("tech_support",))
    browser = english(server)
    response = browser.sign_in(support.login, support.password)  # the test "phone" gives the code
    assert response.status_code == 303 and not response.headers["Location"].endswith("/login/second-factor")
    assert browser.get("/admin/").status_code == 200


def test_the_only_second_factor_of_a_role_that_requires_2fa_cannot_be_removed(server, make_user):
    teacher = make_user(roles=("teacher",))
    browser = english(server)
    assert browser.sign_in(teacher.login, teacher.password).status_code == 303
    page = browser.get("/account/2fa")
    assert page.status_code == 200
    refused = browser.submit(page, "/account/2fa/totp/remove", code=teacher.recovery_codes[0])
    assert refused.status_code == 400 and "requires two-factor sign-in" in refused.text
    with server.services.db.transaction() as session:
        assert session.get(User, teacher.id).has_totp
        refusals = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "mfa:totp:disable-refused", AuditEvent.subject == f"user:{teacher.id}")).all()
        assert len(refusals) == 1
