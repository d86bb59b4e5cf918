"""Two-factor sign-in with TOTP and recovery codes (issue 4), through HTTP, with pyotp
computing the codes an authenticator app would show."""

from __future__ import annotations

import re
import time

import pyotp
import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from sqlalchemy import select, update

from idp.accounts.models import RecoveryCode, User
from idp.app import create_app
from idp.audit.models import AuditEvent
from idp.mfa import recovery
from idp.notify.models import OutboxMessage
from tests.conftest import make_settings
from tests.helpers import Browser, decode_verified, form_fields

CODE_ERROR = "The code is incorrect."


def english(server) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def errors(page: requests.Response) -> list[str]:
    return re.findall(r'<p class="error" role="alert">(.*?)</p>', page.text, re.S)


def code_at(secret: str, offset_steps: int = 0) -> str:
    """The code ``offset_steps`` away from now; waits out the last two seconds of a step
    so the server checks it in the same step the test meant (no flaky boundaries)."""
    if 30 - time.time() % 30 < 2:
        time.sleep(30 - time.time() % 30 + 0.05)
    return pyotp.TOTP(secret).at(time.time() + 30 * offset_steps)


def forget_used_step(server, user_id: int) -> None:
    """Lets a test use the current code again (only where replay is not the point)."""
    server.services.redis.delete(f"totp-step:{user_id}")


def db_user(server, user_id: int) -> User:
    with server.services.db.transaction() as session:
        user = session.get(User, user_id)
        session.expunge(user)
        return user


def events(server, action: str, user_id: int) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == action, AuditEvent.subject == f"user:{user_id}")
            .order_by(AuditEvent.seq)
        ))
        for row in rows:
            session.expunge(row)
        return rows


def enrol(server, browser: Browser, person) -> tuple[str, list[str]]:
    """Enrols TOTP for a signed-in ``browser``; returns the secret and the recovery codes."""
    page = browser.get("/account/2fa/totp")
    assert page.status_code == 200, page.text[:500]
    secret = re.search(r'<code class="secret">([A-Z2-7 ]+)</code>', page.text).group(1).replace(" ", "")
    done = browser.submit(page, "/account/2fa/totp", code=code_at(secret, -1))
    assert done.status_code == 303 and done.headers["Location"].endswith("/account/2fa/recovery-codes"), done.text[:500]
    shown = browser.get("/account/2fa/recovery-codes")
    codes = re.findall(r"<li><code>([0-9a-z]{5}-[0-9a-z]{5})</code></li>", shown.text)
    assert len(codes) == 10
    return secret, codes


def enrolled(server, make_user, **fields):
    person = make_user(**fields)
    browser = english(server)
    assert browser.sign_in(person.login, person.password).status_code == 303
    secret, codes = enrol(server, browser, person)
    return person, secret, codes


def second_step(browser: Browser, person, next_url: str = "/") -> requests.Response:
    """Password step; returns the second-step page."""
    response = browser.sign_in(person.login, person.password, next_url)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/second-factor")
    page = browser.get("/login/second-factor")
    assert page.status_code == 200 and 'autocomplete="one-time-code"' in page.text
    return page


def give_code(browser: Browser, page: requests.Response, code: str) -> requests.Response:
    return browser.submit(page, "/login/second-factor", code=code)


def signed_in(browser: Browser) -> bool:
    return browser.get("/").status_code == 200


# --- enrolment -----------------------------------------------------------------------

def test_enrolment_shows_a_qr_svg_and_the_secret_and_refuses_a_wrong_first_code(server, make_user):
    person = make_user()
    browser = english(server)
    browser.sign_in(person.login, person.password)
    assert 'href="/account/2fa"' in browser.get("/").text
    status = browser.get("/account/2fa")
    assert status.status_code == 200 and 'href="/account/2fa/totp"' in status.text
    page = browser.get("/account/2fa/totp")
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    svg = re.search(r"<svg [^>]*>.*?</svg>", page.text, re.S)
    assert svg and 'class="qr"' in svg.group(0) and "<path" in svg.group(0)
    assert "style=" not in svg.group(0) and "<img" not in page.text
    grouped = re.search(r'<code class="secret">([A-Z2-7 ]+)</code>', page.text).group(1)
    assert re.fullmatch(r"([A-Z2-7]{4} ){7}[A-Z2-7]{4}", grouped)
    secret = grouped.replace(" ", "")
    # A reload shows the same secret (the enrolment in progress is kept, sealed).
    assert grouped in browser.get("/account/2fa/totp").text

    wrong_code = f"{(int(code_at(secret)) + 1) % 1_000_000:06d}"
    wrong = browser.submit(page, "/account/2fa/totp", code=wrong_code)
    assert wrong.status_code == 400 and any(e.startswith(CODE_ERROR) for e in errors(wrong))
    # ASVS 7.5.1: the fresh sign-in (idp/login/reauth.py) replaces a password field here.
    assert "current_password" not in form_fields(page.text, "/account/2fa/totp")[1]
    assert db_user(server, person.id).totp_enabled_at is None

    done = browser.submit(page, "/account/2fa/totp", code=code_at(secret))
    assert done.status_code == 303
    user = db_user(server, person.id)
    assert user.totp_enabled_at is not None
    # N20: the seed is stored encrypted, never in clear.
    assert user.totp_secret_encrypted and secret not in user.totp_secret_encrypted
    assert server.services.two_factor.open_secret(user.totp_secret_encrypted) == secret
    assert len(events(server, "mfa:totp:enable", person.id)) == 1


def test_recovery_codes_are_shown_once_with_no_store_and_stored_hashed(server, make_user):
    person = make_user(email="two-factor@example.test")
    browser = english(server)
    browser.sign_in(person.login, person.password)
    page = browser.get("/account/2fa/totp")
    secret = re.search(r'<code class="secret">([A-Z2-7 ]+)</code>', page.text).group(1).replace(" ", "")
    browser.submit(page, "/account/2fa/totp", code=code_at(secret))
    shown = browser.get("/account/2fa/recovery-codes")
    assert shown.headers["Cache-Control"] == "no-store"
    codes = re.findall(r"<li><code>([0-9a-z]{5}-[0-9a-z]{5})</code></li>", shown.text)
    assert len(codes) == 10 and len(set(codes)) == 10
    again = browser.get("/account/2fa/recovery-codes")
    assert not re.findall(r"<li><code>", again.text) and not any(c in again.text for c in codes)
    with server.services.db.transaction() as session:
        hashes = list(session.scalars(select(RecoveryCode.code_hash).where(RecoveryCode.user_id == person.id)))
        mails = list(session.scalars(select(OutboxMessage.template).where(
            OutboxMessage.to_address == "two-factor@example.test")))
    # ASVS 6.5.2: argon2id with its own salt, no code in clear.
    assert len(hashes) == 10 and all(h.startswith("$argon2id$") for h in hashes)
    assert not any(recovery.normalise(c) in h for c in codes for h in hashes)
    assert mails == ["mfa_added"]


# --- sign-in -------------------------------------------------------------------------

def test_sign_in_asks_for_the_code_and_gives_no_session_before_it(server, make_user):
    person, secret, _codes = enrolled(server, make_user)
    browser = english(server)
    page = second_step(browser, person)
    # ASVS 6.3.3: the password alone gives no session.
    assert not signed_in(browser)
    assert browser.get("/account/2fa").status_code == 302
    forget_used_step(server, person.id)
    done = give_code(browser, page, code_at(secret))
    assert done.status_code == 303 and done.headers["Location"] == "/"
    assert signed_in(browser)
    success = events(server, "account:login:success", person.id)[-1]
    assert success.details["amr"] == ["pwd", "otp", "mfa"]


def test_the_oidc_flow_continues_after_the_code_with_amr_otp_and_acr_loa2(server, make_user, make_client):
    person, secret, _codes = enrolled(server, make_user)
    client = make_client(scopes=["openid", "profile"])
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    rp = OAuth2Session(client.client_id, client.client_secret, scope="openid profile",
                       redirect_uri=client.redirect_uri, code_challenge_method="S256")
    verifier = generate_token(48)
    url, state = rp.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier, nonce="n-2fa")
    browser = english(server)
    response = browser.follow_until_external(browser.get(url))
    response = browser.submit(response, "/login", login=person.login, password=person.password)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/second-factor")
    page = browser.follow_until_external(response)
    assert 'action="/login/second-factor"' in page.text
    forget_used_step(server, person.id)
    callback = browser.follow_until_external(give_code(browser, page, code_at(secret))).headers["Location"]
    assert callback.startswith(client.redirect_uri) and "code=" in callback
    token = rp.fetch_token(meta["token_endpoint"], authorization_response=callback, code_verifier=verifier,
                           state=state)
    _header, claims = decode_verified(token["id_token"], requests.get(meta["jwks_uri"], timeout=10).json())
    assert claims["sub"] == person.subject and claims["nonce"] == "n-2fa"
    assert "otp" in claims["amr"] and "pwd" in claims["amr"]
    assert claims["acr"] == "urn:darbaza:loa:2"


def test_a_code_is_accepted_once_even_by_a_second_server_process(server, make_user, database_url, redis_url):
    person, secret, _codes = enrolled(server, make_user)
    forget_used_step(server, person.id)
    code = code_at(secret)
    first = english(server)
    assert give_code(first, second_step(first, person), code).status_code == 303
    # ASVS 6.5.1 / N17: the same code again on this process ...
    again = english(server)
    replay = give_code(again, second_step(again, person), code)
    assert replay.status_code == 401 and CODE_ERROR in errors(replay)
    # ... and on another process sharing the database and Redis.
    other = create_app(make_settings(database_url, redis_url, server.url,
                                     secret_key=server.services.settings.secret_key))
    try:
        with other.test_client() as client:
            client.environ_base["HTTP_ACCEPT_LANGUAGE"] = "en"
            page = client.get("/login")
            _action, fields = form_fields(page.get_data(as_text=True), "/login")
            fields.update(login=person.login, password=person.password)
            step = client.post("/login", data=fields)
            assert step.status_code == 303 and step.headers["Location"].endswith("/login/second-factor")
            page = client.get("/login/second-factor")
            _action, fields = form_fields(page.get_data(as_text=True), "/login/second-factor")
            refused = client.post("/login/second-factor", data={**fields, "code": code})
            assert refused.status_code == 401 and CODE_ERROR in refused.get_data(as_text=True)
            # A later step is still fine there: the guard is per step, not per process.
            accepted = client.post("/login/second-factor", data={**fields, "code": code_at(secret, 1)})
            assert accepted.status_code == 303
    finally:
        svc = other.extensions["darbaza"]
        svc.db.remove()
        svc.db.dispose()
        svc.redis.close()


@pytest.mark.parametrize(("offset", "accepted"), [(-2, False), (-1, True), (0, True), (1, True)])
def test_one_step_of_drift_is_accepted_two_steps_are_not(server, make_user, offset, accepted):
    person, secret, _codes = enrolled(server, make_user)
    forget_used_step(server, person.id)
    browser = english(server)
    response = give_code(browser, second_step(browser, person), code_at(secret, offset))
    assert response.status_code == (303 if accepted else 401)
    assert signed_in(browser) is accepted


# --- recovery codes ------------------------------------------------------------------

def test_a_recovery_code_works_once(server, make_user):
    person, _secret, codes = enrolled(server, make_user)
    browser = english(server)
    done = give_code(browser, second_step(browser, person), codes[0].upper())
    assert done.status_code == 303 and signed_in(browser)
    success = events(server, "account:login:success", person.id)[-1]
    assert success.details["amr"] == ["pwd", "mfa"] and success.details["recovery_code"] is True
    again = english(server)
    refused = give_code(again, second_step(again, person), codes[0])
    assert refused.status_code == 401 and CODE_ERROR in errors(refused)
    assert give_code(again, refused, codes[1]).status_code == 303


def test_new_recovery_codes_invalidate_the_old_ones(server, make_user):
    person, _secret, old_codes = enrolled(server, make_user, email="regen@example.test")
    browser = english(server)
    give_code(browser, second_step(browser, person), old_codes[0])
    status = browser.get("/account/2fa")
    assert "9 unused recovery codes" in status.text
    assert "current_password" not in form_fields(status.text, "/account/2fa/recovery-codes/new")[1]
    made = browser.submit(status, "/account/2fa/recovery-codes/new")
    assert made.status_code == 303
    shown = browser.get(made.headers["Location"])
    assert shown.headers["Cache-Control"] == "no-store"
    new_codes = re.findall(r"<li><code>([0-9a-z]{5}-[0-9a-z]{5})</code></li>", shown.text)
    assert len(new_codes) == 10 and not set(new_codes) & set(old_codes)
    assert len(events(server, "mfa:recovery:regenerate", person.id)) == 1
    other = english(server)
    page = second_step(other, person)
    assert give_code(other, page, old_codes[1]).status_code == 401
    assert give_code(other, page, new_codes[0]).status_code == 303
    with server.services.db.transaction() as session:
        mails = list(session.scalars(select(OutboxMessage.template).where(
            OutboxMessage.to_address == "regen@example.test").order_by(OutboxMessage.id)))
    assert mails == ["mfa_added", "recovery_codes_new"]


def test_removal_needs_a_fresh_sign_in_and_a_code(server, make_user):
    from tests.integration.test_reauth import age_session, reauth_target

    person, secret, codes = enrolled(server, make_user, email="remove@example.test")
    browser = english(server)
    give_code(browser, second_step(browser, person), codes[0])
    status = browser.get("/account/2fa")
    no_code = browser.submit(status, "/account/2fa/totp/remove", code="000000")
    assert no_code.status_code == 400 and CODE_ERROR in errors(no_code)
    forget_used_step(server, person.id)
    # ASVS 7.5.1: a sign-in older than the re-authentication limit changes nothing.
    age_session(server, browser)
    stale = browser.submit(status, "/account/2fa/totp/remove", code=code_at(secret))
    assert reauth_target(stale) == "/account/2fa"
    assert db_user(server, person.id).totp_enabled_at is not None
    page = browser.get(stale.headers["Location"])
    assert browser.submit(page, "/login/reauth", password=person.password, code=codes[1]).status_code == 303
    removed = browser.submit(status, "/account/2fa/totp/remove", code=code_at(secret))
    assert removed.status_code == 303
    user = db_user(server, person.id)
    assert user.totp_enabled_at is None and user.totp_secret_encrypted is None
    assert len(events(server, "mfa:totp:disable", person.id)) == 1
    # Password alone again.
    assert english(server).sign_in(person.login, person.password).headers["Location"] == "/"
    with server.services.db.transaction() as session:
        assert not session.scalars(select(RecoveryCode).where(RecoveryCode.user_id == person.id)).all()
        mails = list(session.scalars(select(OutboxMessage.template).where(
            OutboxMessage.to_address == "remove@example.test").order_by(OutboxMessage.id)))
    assert mails == ["mfa_added", "mfa_removed"]


# --- failures ------------------------------------------------------------------------

def test_100_totp_failures_disable_it_and_a_recovery_code_still_works(server, make_user):
    person, secret, codes = enrolled(server, make_user)
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.id == person.id).values(totp_failures=99))
    browser = english(server)
    page = second_step(browser, person)
    wrong = give_code(browser, page, f"{(int(code_at(secret)) + 1) % 1_000_000:06d}")
    assert wrong.status_code == 401 and CODE_ERROR in errors(wrong)
    user = db_user(server, person.id)
    assert user.totp_failures == 100 and user.totp_disabled_at is not None
    assert len(events(server, "account:credential:disabled", person.id)) == 1
    forget_used_step(server, person.id)
    right = give_code(browser, page, code_at(secret))
    # N12: the right code of a disabled TOTP gets the very same answer.
    assert right.status_code == 401 and errors(right) == errors(wrong)
    assert not signed_in(browser)
    failure = events(server, "account:login:failure", person.id)[-1]
    assert failure.details["factor"] == "otp"
    # The way back: a recovery code, and the journal says it was the re-bind path.
    assert give_code(browser, right, codes[0]).status_code == 303
    used = events(server, "mfa:recovery:use", person.id)[-1]
    assert used.reason == "totp-disabled-rebind" and used.details["totp_disabled"] is True


def test_the_password_minimum_is_8_with_totp(server, make_user):
    person, _secret, codes = enrolled(server, make_user)
    browser = english(server)
    give_code(browser, second_step(browser, person), codes[0])
    page = browser.get("/account/password")
    assert "At least 8 characters" in page.text
    action, fields = form_fields(page.text, "/account/password")
    fields.update(current_password=person.password, password="kettle9x", confirm="kettle9x")
    assert browser.post(action, data=fields).status_code == 303
    assert db_user(server, person.id).password_changed_at is not None
    # An account without a second factor still needs 15.
    plain = make_user()
    other = english(server)
    other.sign_in(plain.login, plain.password)
    page = other.get("/account/password")
    action, fields = form_fields(page.text, "/account/password")
    fields.update(current_password=plain.password, password="kettle9x", confirm="kettle9x")
    short = other.post(action, data=fields)
    assert short.status_code == 400 and any("at least 15 characters" in e for e in errors(short))


def test_a_required_password_change_comes_after_the_code_and_keeps_the_amr(server, make_user):
    person, secret, _codes = enrolled(server, make_user)
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.id == person.id).values(must_change_password=True))
    browser = english(server)
    forget_used_step(server, person.id)
    done = give_code(browser, second_step(browser, person), code_at(secret))
    assert done.headers["Location"].endswith("/password/change-required")
    page = browser.get("/password/change-required")
    assert "At least 8 characters" in page.text
    saved = browser.submit(page, "/password/change-required", password="meadow orbit", confirm="meadow orbit")
    assert saved.status_code == 303 and signed_in(browser)
    assert events(server, "account:login:success", person.id)[-1].details["amr"] == ["pwd", "otp", "mfa"]


def test_the_pending_second_step_expires(server, make_user):
    person, secret, _codes = enrolled(server, make_user)
    browser = english(server)
    page = second_step(browser, person)
    # Age the pending state in the server-side session past its five minutes.
    svc = server.services
    for key in svc.redis.scan_iter("sess:*"):
        import json

        data = json.loads(svc.redis.get(key) or "{}")
        pending = data.get("pending_sign_in")
        if pending and pending.get("uid") == person.id:
            pending["expires"] = time.time() - 1
            svc.redis.set(key, json.dumps(data), keepttl=True)
    forget_used_step(server, person.id)
    late = give_code(browser, page, code_at(secret))
    assert late.status_code == 303 and late.headers["Location"].endswith("/login")
    assert not signed_in(browser)


def test_an_activation_card_resets_the_password_but_not_the_second_factor(server, make_user):
    from tests.integration.test_activation import CODE, activate, issue_card

    server.services.redis.delete("throttle:activate:127.0.0.1")
    person, secret, _codes = enrolled(server, make_user)
    code = CODE.search(issue_card(server, make_user, person.id).text).group(1)
    browser = english(server)
    # ASVS 6.4.3: the card sets a new password (8 characters are enough with TOTP) ...
    response = activate(browser, person.login, code, password="lamp9orb")
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/second-factor")
    assert not signed_in(browser)
    # ... and the code from the app is still asked for.
    forget_used_step(server, person.id)
    page = browser.get("/login/second-factor")
    assert give_code(browser, page, code_at(secret)).status_code == 303 and signed_in(browser)


# --- support resets a lost second factor (ASVS 6.4.4) ------------------------------------

def test_support_resets_two_factor_with_a_reason_and_the_person_signs_in_with_the_password(server, make_user):
    person, _secret, _codes = enrolled(server, make_user)
    support_person = make_user(roles=("tech_support",))
    support = english(server)
    support.sign_in(support_person.login, support_person.password)
    url = f"/admin/accounts/{person.id}/two-factor/reset"
    page = support.get(url)
    assert page.status_code == 200
    refused = support.submit(page, url, confirm_login="someone-else", reason="lost phone, ID checked")
    assert refused.status_code in (200, 400) and db_user(server, person.id).has_totp
    page = support.get(url)
    done = support.submit(page, url, confirm_login=person.login, reason="lost phone, ID checked")
    assert done.status_code == 303
    assert not db_user(server, person.id).has_totp
    (event,) = events(server, "mfa:totp:reset", person.id)
    assert event.reason == "lost phone, ID checked" and event.actor == f"user:{support_person.id}"
    # The password alone signs in again (and the person can enrol anew).
    browser = english(server)
    assert browser.sign_in(person.login, person.password).headers["Location"].endswith("/")


def test_only_credential_support_may_reset_two_factor(server, make_user):
    person, _secret, _codes = enrolled(server, make_user)
    officer_person = make_user(roles=("security_officer",))
    officer = english(server)
    officer.sign_in(officer_person.login, officer_person.password)
    assert officer.get(f"/admin/accounts/{person.id}/two-factor/reset").status_code == 403


def test_nobody_resets_the_credentials_of_an_account_that_outranks_them(server, make_user):
    """Threat model gap 6: resetting an account's second factor or issuing it an activation
    code lets the actor become that person, so the actor must hold every permission the
    account holds. Tech support cannot take over a school admin; a school admin can reset
    another school admin (the same permissions)."""
    admin_person = make_user(roles=("school_admin",))
    support_person = make_user(roles=("tech_support",))
    support = english(server)
    support.sign_in(support_person.login, support_person.password)
    for url, fields in (
        (f"/admin/accounts/{admin_person.id}/two-factor/reset", {"confirm_login": admin_person.login}),
        (f"/admin/accounts/{admin_person.id}/password/require-change", {"confirm_login": admin_person.login}),
        (f"/admin/accounts/{admin_person.id}/activation-code", {}),
    ):
        page = support.get(url)
        refused = support.submit(page, url, reason="says they lost the phone", **fields)
        assert refused.status_code == 403, url
        assert "holds permissions you do not have" in refused.text
    stored = db_user(server, admin_person.id)
    assert stored.has_totp and not stored.must_change_password
    assert events(server, "mfa:totp:reset", admin_person.id) == []
    assert events(server, "account:activation-code:issue", admin_person.id) == []
    # An equal may: another school admin resets it (journalled as usual).
    peer_person = make_user(roles=("school_admin",))
    peer = english(server)
    peer.sign_in(peer_person.login, peer_person.password)
    url = f"/admin/accounts/{admin_person.id}/two-factor/reset"
    done = peer.submit(peer.get(url), url, confirm_login=admin_person.login, reason="lost phone, ID checked")
    assert done.status_code == 303 and not db_user(server, admin_person.id).has_totp
    assert len(events(server, "mfa:totp:reset", admin_person.id)) == 1


def test_the_operator_resets_a_second_factor_nobody_in_the_console_may(server, make_user):
    from tests.integration.test_cli import run

    officer = make_user(roles=("security_officer",))
    assert db_user(server, officer.id).has_totp
    refused = run(server, "users", "reset-2fa", officer.login, "--reason", " ")
    assert refused.exit_code != 0 and "reason" in refused.output and db_user(server, officer.id).has_totp
    unknown = run(server, "users", "reset-2fa", "nobody-" + officer.login, "--reason", "ID checked")
    assert unknown.exit_code != 0 and "no account" in unknown.output
    done = run(server, "users", "reset-2fa", officer.login, "--reason", "lost phone, ID checked in person")
    assert done.exit_code == 0, done.output
    assert not db_user(server, officer.id).has_totp
    (event,) = events(server, "mfa:totp:reset", officer.id)
    assert event.actor.startswith("cli") and event.reason == "lost phone, ID checked in person"
    again = run(server, "users", "reset-2fa", officer.login, "--reason", "again")
    assert again.exit_code != 0 and "not on" in again.output
