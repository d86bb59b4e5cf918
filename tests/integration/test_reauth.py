"""Re-authentication before a sensitive change (ASVS 7.5.1, 7.2.4; issue 4: "Changing
password, e-mail or 2FA needs a fresh sign-in"), through HTTP."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from sqlalchemy import select, update

from idp.accounts.models import User
from idp.app import create_app
from idp.audit.models import AuditEvent
from idp.notify.models import OutboxMessage
from tests.conftest import LiveServer, free_port, make_settings
from tests.helpers import Browser, form_fields

COOKIE = "darbaza"


def english(server) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def errors(page: requests.Response) -> list[str]:
    return re.findall(r'<p class="error" role="alert">(.*?)</p>', page.text, re.S)


def session_key(browser: Browser) -> str:
    return "sess:" + hashlib.sha256(browser.http.cookies[COOKIE].encode()).hexdigest()


def session_data(server, browser: Browser) -> dict:
    return json.loads(server.services.redis.get(session_key(browser)) or "{}")


def age_session(server, browser: Browser, seconds: float = 3600) -> None:
    """Moves this browser's last authentication ``seconds`` into the past (the session
    itself stays valid: its idle and absolute clocks are not touched)."""
    key = session_key(browser)
    data = json.loads(server.services.redis.get(key))
    data["authenticated_at"] -= seconds
    server.services.redis.set(key, json.dumps(data), keepttl=True)


def signed_in(server, make_user, **fields) -> tuple[object, Browser]:
    person = make_user(**fields)
    browser = english(server)
    assert browser.sign_in(person.login, person.password).status_code == 303
    return person, browser


def reauth_target(response: requests.Response) -> str | None:
    """The ``next`` of a redirect to /login/reauth, or None when it is no such redirect."""
    if response.status_code != 303:
        return None
    parts = urlsplit(response.headers["Location"])
    if parts.path != "/login/reauth":
        return None
    return parse_qs(parts.query)["next"][0]


def events(server, action: str, user_id: int) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(select(AuditEvent).where(
            AuditEvent.action == action, AuditEvent.subject == f"user:{user_id}").order_by(AuditEvent.seq)))
        for row in rows:
            session.expunge(row)
        return rows


def db_user(server, user_id: int) -> User:
    with server.services.db.transaction() as session:
        user = session.get(User, user_id)
        session.expunge(user)
        return user


def reauthenticate(browser: Browser, next_url: str, **fields: str) -> requests.Response:
    page = browser.get("/login/reauth?next=" + next_url)
    assert page.status_code == 200 and "Confirm it" in page.text
    return browser.submit(page, "/login/reauth", **fields)


# --- who is sent there ------------------------------------------------------------------

def test_a_fresh_sign_in_goes_straight_to_the_pages(server, make_user):
    _person, browser = signed_in(server, make_user)
    for path in ("/account/password", "/account/2fa/totp", "/account/email"):
        assert browser.get(path).status_code == 200, path


def test_a_stale_session_is_asked_to_confirm_before_every_sensitive_page(server, make_user):
    person, browser = signed_in(server, make_user, email="stale@example.org")
    set_at = db_user(server, person.id).password_changed_at
    form_page = browser.get("/account/password")
    email_page = browser.get("/account/email")
    age_session(server, browser)
    for path in ("/account/password", "/account/2fa/totp", "/account/email"):
        assert reauth_target(browser.get(path)) == path, path
    # Reading the 2FA status changes nothing and needs no fresh sign-in.
    assert browser.get("/account/2fa").status_code == 200
    # A POST is not carried out; the browser comes back to the form's page afterwards.
    action, fields = form_fields(form_page.text, "/account/password")
    fields.update(current_password=person.password, password="meadow orbit lantern 7", confirm="meadow orbit lantern 7")
    refused = browser.post(action, data=fields)
    assert reauth_target(refused) == "/account/password"
    assert db_user(server, person.id).password_changed_at == set_at
    # A POST-only form goes back to the page it sits on, and sends nothing.
    sent = browser.submit(email_page, "/account/email/send-link")
    assert reauth_target(sent) == "/account/email"
    with server.services.db.transaction() as session:
        assert not session.scalars(select(OutboxMessage).where(
            OutboxMessage.to_address == "stale@example.org")).all()


def test_the_setting_decides_how_old_a_sign_in_may_be(server, make_user, database_url, redis_url):
    port = free_port()
    live = LiveServer(create_app(make_settings(database_url, redis_url, f"http://127.0.0.1:{port}",
                                               reauth_max_age_seconds=1)), port)
    live.start()
    try:
        person = make_user()
        browser = english(live)
        browser.sign_in(person.login, person.password)
        assert browser.get("/account/password").status_code == 200
        time.sleep(1.5)
        assert reauth_target(browser.get("/account/password")) == "/account/password"
    finally:
        live.stop()
        live.services.db.remove()
        live.services.db.dispose()
        live.services.redis.close()


def test_not_signed_in_goes_to_the_sign_in_page(server):
    browser = english(server)
    response = browser.get("/login/reauth?next=/account/password")
    assert response.status_code == 302 and urlsplit(response.headers["Location"]).path == "/login"
    assert urlsplit(browser.get("/account/email").headers["Location"]).path == "/login"


# --- the re-authentication ------------------------------------------------------------------

def test_a_wrong_password_is_refused_and_counted_like_a_failed_sign_in(server, make_user):
    person, browser = signed_in(server, make_user)
    age_session(server, browser)
    wrong = reauthenticate(browser, "/account/password", password="not the password")
    assert wrong.status_code == 401 and "The password is incorrect." in errors(wrong)
    assert server.services.login_account_throttle.failures(person.login) == 1
    assert db_user(server, person.id).password_failures == 1
    (failure,) = events(server, "account:reauth:failure", person.id)
    assert failure.reason == "wrong-password"
    # Still not fresh.
    assert reauth_target(browser.get("/account/password")) == "/account/password"


def test_the_right_password_rotates_the_session_and_lets_the_change_through(server, make_user):
    person, browser = signed_in(server, make_user)
    set_at = db_user(server, person.id).password_changed_at
    age_session(server, browser)
    before = session_data(server, browser)
    old_cookie = browser.http.cookies[COOKIE]
    done = reauthenticate(browser, "/account/password", password=person.password)
    assert done.status_code == 303 and done.headers["Location"] == "/account/password"
    # ASVS 7.2.4: a new session id at re-authentication; the old one is dead.
    new_cookie = browser.http.cookies[COOKIE]
    assert new_cookie != old_cookie
    stale = requests.Session()
    stale.cookies.set(COOKIE, old_cookie)
    assert stale.get(server.url + "/", allow_redirects=False, timeout=10).status_code == 302
    after = session_data(server, browser)
    assert after["sid"] == before["sid"] and after["uid"] == person.id
    assert after["authenticated_at"] > before["authenticated_at"] + 3000
    assert after["auth_time"] >= int(time.time()) - 5
    assert len(events(server, "account:reauth:success", person.id)) == 1
    page = browser.get("/account/password")
    assert page.status_code == 200
    # ASVS 6.2.3: the form still asks for the current password.
    fields = form_fields(page.text, "/account/password")[1]
    assert "current_password" in fields
    changed = browser.submit(page, "/account/password", current_password=person.password,
                             password="meadow orbit lantern 7", confirm="meadow orbit lantern 7")
    assert changed.status_code == 303
    assert db_user(server, person.id).password_changed_at > set_at


def test_the_return_address_is_only_a_local_path(server, make_user):
    person, browser = signed_in(server, make_user)
    for target in ("https://evil.example/", "//evil.example/x"):
        age_session(server, browser)
        done = reauthenticate(browser, target, password=person.password)
        assert done.status_code == 303 and done.headers["Location"] == "/", target


def test_the_100th_failure_disables_the_password_here_too(server, make_user):
    person, browser = signed_in(server, make_user)
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.id == person.id).values(password_failures=99))
    age_session(server, browser)
    reauthenticate(browser, "/account/password", password="still not it")
    assert db_user(server, person.id).password_disabled_at is not None
    assert len(events(server, "account:credential:disabled", person.id)) == 1
    # N12: now even the right password is refused, with the same answer.
    server.services.login_account_throttle.reset(person.login)
    right = reauthenticate(browser, "/account/password", password=person.password)
    assert right.status_code == 401 and "The password is incorrect." in errors(right)


def test_the_account_throttle_answers_429(server, make_user):
    person, browser = signed_in(server, make_user)
    age_session(server, browser)
    free = server.services.settings.login_account_free_failures
    for _ in range(free + 1):
        reauthenticate(browser, "/account/password", password="wrong again")
    throttled = reauthenticate(browser, "/account/password", password=person.password)
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
    server.services.login_account_throttle.reset(person.login)


@pytest.fixture
def totp_person(server, make_user) -> Iterator[tuple[object, str, list[str], Browser]]:
    from tests.integration.test_two_factor import enrolled

    person, secret, codes = enrolled(server, make_user)
    yield person, secret, codes, english(server)


def test_with_totp_the_code_is_asked_on_the_same_form(server, totp_person):
    from tests.integration.test_two_factor import code_at, forget_used_step, give_code, second_step

    person, secret, codes, browser = totp_person
    forget_used_step(server, person.id)
    give_code(browser, second_step(browser, person), code_at(secret))
    age_session(server, browser)
    page = browser.get("/login/reauth?next=/account/2fa/totp")
    assert 'name="code"' in page.text and 'autocomplete="one-time-code"' in page.text
    no_code = browser.submit(page, "/login/reauth", password=person.password, code="")
    assert no_code.status_code == 400
    wrong_code = f"{(int(code_at(secret)) + 1) % 1_000_000:06d}"
    wrong = browser.submit(page, "/login/reauth", password=person.password, code=wrong_code)
    assert wrong.status_code == 401 and "The password or the code is incorrect." in errors(wrong)
    assert db_user(server, person.id).totp_failures == 1
    assert events(server, "account:reauth:failure", person.id)[-1].reason == "wrong-code"
    # A wrong password with a right code: the same answer, and the code is not spent.
    forget_used_step(server, person.id)
    code = code_at(secret)
    both = browser.submit(page, "/login/reauth", password="wrong", code=code)
    assert both.status_code == 401 and errors(both) == errors(wrong)
    done = browser.submit(page, "/login/reauth", password=person.password, code=code)
    assert done.status_code == 303 and done.headers["Location"] == "/account/2fa/totp"
    data = session_data(server, browser)
    # The acr is derived from the amr (not stored in the session): urn:darbaza:loa:2.
    assert data["amr"] == ["pwd", "otp", "mfa"] and "acr" not in data
    # A recovery code does too, and is spent.
    age_session(server, browser)
    with_recovery = reauthenticate(browser, "/account/email", password=person.password, code=codes[0])
    assert with_recovery.status_code == 303 and with_recovery.headers["Location"] == "/account/email"
    assert events(server, "mfa:recovery:use", person.id)[-1].reason == "reauthentication"


def test_a_passkey_only_account_signs_in_again_instead(server, make_user):
    """No passkey check on /login/reauth: a password alone must not stand in for the
    passkey, so the person signs in afresh (password and passkey) and comes back."""
    import secrets

    from idp.accounts.models import Passkey

    person, browser = signed_in(server, make_user)
    with server.services.db.transaction() as session:
        session.add(Passkey(user_id=person.id, credential_id=secrets.token_bytes(16), public_key=b"\x00",
                            sign_count=0, transports="", aaguid="", backed_up=False, name="key"))
    age_session(server, browser)
    page = browser.get("/login/reauth?next=/account/password")
    assert page.status_code == 200 and 'name="password"' not in page.text
    refused = browser.post("/login/reauth", data={**form_fields(page.text, "/login/reauth/sign-in-again")[1],
                                                  "password": person.password})
    assert refused.status_code == 400 and reauth_target(browser.get("/account/password")) == "/account/password"
    again = browser.submit(page, "/login/reauth/sign-in-again")
    target = urlsplit(again.headers["Location"])
    assert again.status_code == 303 and target.path == "/login"
    assert parse_qs(target.query) == {"next": ["/account/password"], "login_hint": [person.login]}
    assert browser.get("/").status_code == 302
