"""Self-service password reset by e-mail link (issue 4; ASVS 6.4.3, 2.4.1), through HTTP
and the real mail path (the link is read from the queued message)."""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime

import pytest
import requests
from sqlalchemy import select, update

from idp.accounts.models import User
from idp.app import create_app
from idp.audit.models import AuditEvent
from idp.notify.models import OutboxMessage
from tests.conftest import LiveServer, free_port, make_settings
from tests.helpers import Browser, form_fields
from tests.integration.test_reauth import english, errors

LINK = re.compile(r"http://127\.0\.0\.1:\d+(/password/reset/[A-Za-z0-9_-]{43})")
NEW_PASSWORD = "harbour violet quietly 42"


def address() -> str:
    return f"r-{secrets.token_hex(4)}@example.org"


def person_with(make_user, server, *, verified: bool = True, **fields):
    email = fields.pop("email", None) or address()
    person = make_user(email=email, **fields)
    if verified:
        with server.services.db.transaction() as session:
            session.execute(update(User).where(User.id == person.id).values(
                email_verified_at=datetime.now(UTC).replace(tzinfo=None)))
    return person, email


def reset_mails(server, to: str) -> list[OutboxMessage]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.to_address == to, OutboxMessage.template == "password_reset_link").order_by(OutboxMessage.id)))
        for row in rows:
            session.expunge(row)
        return rows


def templates_to(server, to: str) -> list[str]:
    with server.services.db.transaction() as session:
        return list(session.scalars(select(OutboxMessage.template).where(OutboxMessage.to_address == to)
                                    .order_by(OutboxMessage.id)))


def ask(browser: Browser, typed: str) -> requests.Response:
    page = browser.get("/password/forgot")
    assert page.status_code == 200
    return browser.submit(page, "/password/forgot", login=typed)


def link_for(server, to: str) -> str:
    found = LINK.search(reset_mails(server, to)[-1].body_text)
    assert found
    return found.group(1)


def db_user(server, user_id: int) -> User:
    with server.services.db.transaction() as session:
        user = session.get(User, user_id)
        session.expunge(user)
        return user


def events(server, action: str, user_id: int) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(select(AuditEvent).where(
            AuditEvent.action == action, AuditEvent.subject == f"user:{user_id}").order_by(AuditEvent.seq)))
        for row in rows:
            session.expunge(row)
        return rows


def set_password(browser: Browser, path: str, password: str = NEW_PASSWORD) -> requests.Response:
    page = browser.get(path)
    assert page.status_code == 200 and 'name="password"' in page.text, page.text[:500]
    return browser.submit(page, path, password=password, confirm=password)


def without_csrf(text: str) -> str:
    return re.sub(r'name="csrf_token"[^>]*value="[^"]*"', "", text)


@pytest.fixture(autouse=True)
def fresh_throttles(server):
    """Each test starts with unspent allowances (the limits have their own test)."""
    for key in server.services.redis.scan_iter("throttle:password-reset:*"):
        server.services.redis.delete(key)


def test_the_login_page_links_to_it(server):
    page = english(server).get("/login")
    assert 'href="/password/forgot"' in page.text


def test_the_answer_is_the_same_whoever_is_asked_for_and_only_a_verified_address_gets_a_link(server, make_user):
    verified, verified_address = person_with(make_user, server, locale="en")
    unverified, unverified_address = person_with(make_user, server, verified=False)
    locked, locked_address = person_with(make_user, server)
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.id == locked.id).values(locked=True))
    no_address = make_user()
    answers = []
    for typed in (verified.login, verified_address.upper(), unverified.login, unverified_address, locked.login,
                  no_address.login, "nobody-" + secrets.token_hex(3), "nobody@example.org"):
        response = ask(english(server), typed)
        answers.append((response.status_code, without_csrf(response.text)))
    assert len(set(answers)) == 1 and answers[0][0] == 200
    assert "Check your e-mail" in answers[0][1]
    # By login and by address: two links to the verified address, none to the others.
    assert len(reset_mails(server, verified_address)) == 2
    assert reset_mails(server, unverified_address) == [] and reset_mails(server, locked_address) == []
    message = reset_mails(server, verified_address)[0]
    assert verified.login in message.body_text and "30 minutes" in message.body_text
    requested = events(server, "account:password:reset-requested", unverified.id)
    assert requested[-1].reason == "not-eligible" and requested[-1].details["sent"] is False


def test_a_reset_without_second_factor_ends_everything_and_the_new_password_works(server, make_user, make_client):
    person, email = person_with(make_user, server)
    # A session and a portal app's refresh token from before.
    before = english(server)
    client = make_client(scopes=["openid", "profile"], grant_types=["authorization_code", "refresh_token"])
    params, verifier, _last = before.authorize(client, person, scope="openid profile")
    tokens = requests.post(server.url + "/token", data={
        "grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
        "code_verifier": verifier,
    }, auth=(client.client_id, client.client_secret), timeout=10).json()
    assert "refresh_token" in tokens, tokens
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.id == person.id).values(must_change_password=True))

    set_at = db_user(server, person.id).password_changed_at
    browser = english(server)
    ask(browser, person.login)
    path = link_for(server, email)
    # GET shows the form and does nothing.
    page = browser.get(path)
    assert page.status_code == 200 and 'name="password"' in page.text and 'name="code"' not in page.text
    assert browser.get(path).status_code == 200
    assert db_user(server, person.id).password_changed_at == set_at
    # The policy applies.
    weak = browser.submit(page, path, password="short", confirm="short")
    assert weak.status_code == 400 and any("at least 15 characters" in e for e in errors(weak))
    done = browser.submit(page, path, password=NEW_PASSWORD, confirm=NEW_PASSWORD)
    assert done.status_code == 303 and done.headers["Location"] == "/login"
    # Not signed in; the sign-in page says what happened.
    assert browser.get("/").status_code == 302
    assert "Your password was changed" in browser.get("/login").text
    user = db_user(server, person.id)
    assert user.password_changed_at > set_at and not user.must_change_password
    # Every session and token of before is dead.
    assert before.get("/").status_code == 302
    refreshed = requests.post(server.url + "/token", data={
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
    }, auth=(client.client_id, client.client_secret), timeout=10)
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
    # The new password works, the old one does not.
    assert english(server).sign_in(person.login, person.password).status_code == 401
    assert english(server).sign_in(person.login, NEW_PASSWORD).status_code == 303
    # Used once.
    again = english(server).get(path)
    assert again.status_code == 400 and "This link does not work" in again.text
    (reset,) = events(server, "account:password:reset", person.id)
    assert reset.details["second_factor"] == "none" and reset.details["ended_other_sessions"] is True
    assert templates_to(server, email) == ["password_reset_link", "password_changed"]


def test_with_totp_the_code_comes_first_and_a_wrong_one_is_refused(server, make_user):
    from tests.integration.test_two_factor import code_at, enrolled, forget_used_step

    email = address()
    person, secret, _codes = enrolled(server, make_user, email=email)
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.id == person.id).values(
            email_verified_at=datetime.now(UTC).replace(tzinfo=None)))
    set_at = db_user(server, person.id).password_changed_at
    browser = english(server)
    ask(browser, email)
    path = link_for(server, email)
    page = browser.get(path)
    # ASVS 6.4.3: the e-mail link alone never sets a password when TOTP is on.
    assert page.status_code == 200 and 'name="code"' in page.text and 'name="password"' not in page.text
    direct = browser.post(path, data={**form_fields(page.text, path)[1], "password": NEW_PASSWORD,
                                      "confirm": NEW_PASSWORD})
    assert direct.status_code == 400 and db_user(server, person.id).password_changed_at == set_at
    wrong = browser.submit(page, path, code=f"{(int(code_at(secret)) + 1) % 1_000_000:06d}")
    assert wrong.status_code == 401 and "The code is incorrect." in errors(wrong)
    assert db_user(server, person.id).totp_failures == 1
    assert server.services.login_account_throttle.failures(person.login) >= 1
    assert events(server, "account:password:reset-failure", person.id)[-1].reason == "wrong-code"
    forget_used_step(server, person.id)
    accepted = browser.submit(page, path, code=code_at(secret))
    assert accepted.status_code == 303 and accepted.headers["Location"] == path
    # The code was given in this browser only: another one with the link is asked again.
    assert 'name="code"' in english(server).get(path).text
    # With TOTP, 8 characters are enough.
    done = set_password(browser, path, "kettle9x")
    assert done.status_code == 303 and done.headers["Location"] == "/login"
    assert events(server, "account:password:reset", person.id)[-1].details["second_factor"] == "totp"
    # The second factor is still asked at sign-in.
    signed = english(server).sign_in(person.login, "kettle9x")
    assert signed.status_code == 303 and signed.headers["Location"].endswith("/login/second-factor")


def test_a_passkey_only_account_is_sent_to_support(server, make_user):
    from idp.accounts.models import Passkey

    person, email = person_with(make_user, server)
    with server.services.db.transaction() as session:
        session.add(Passkey(user_id=person.id, credential_id=secrets.token_bytes(16), public_key=b"\x00",
                            sign_count=0, transports="", aaguid="", backed_up=False, name="key"))
    browser = english(server)
    set_at = db_user(server, person.id).password_changed_at
    ask(browser, person.login)
    path = link_for(server, email)
    page = browser.get(path)
    assert page.status_code == 200 and "technical support" in page.text and 'name="password"' not in page.text
    assert browser.post(path, data={"password": NEW_PASSWORD, "confirm": NEW_PASSWORD}).status_code in (200, 400)
    assert db_user(server, person.id).password_changed_at == set_at


def test_a_link_dies_when_the_password_changes_meanwhile(server, make_user):
    person, email = person_with(make_user, server)
    ask(english(server), person.login)
    path = link_for(server, email)
    owner = english(server)
    owner.sign_in(person.login, person.password)
    page = owner.get("/account/password")
    assert owner.submit(page, "/account/password", current_password=person.password, password=NEW_PASSWORD,
                        confirm=NEW_PASSWORD).status_code == 303
    stale = english(server).get(path)
    assert stale.status_code == 400 and "This link does not work" in stale.text


def test_garbage_and_expired_links_get_a_clear_page(server, make_user, database_url, redis_url):
    browser = english(server)
    for token in ("nonsense", "A" * 43, "%00" * 8, "x" * 3000):
        response = browser.get("/password/reset/" + token)
        assert response.status_code in (400, 404) and "Something went wrong" not in response.text, token
    port = free_port()
    live = LiveServer(create_app(make_settings(database_url, redis_url, f"http://127.0.0.1:{port}",
                                               password_reset_ttl_seconds=1)), port)
    live.start()
    try:
        person, email = person_with(make_user, server)
        ask(english(live), person.login)
        path = LINK.search(reset_mails(server, email)[-1].body_text).group(1)
        assert english(live).get(path).status_code == 200
        time.sleep(2.1)
        expired = english(live).get(path)
        assert expired.status_code == 400 and "This link does not work" in expired.text
    finally:
        live.stop()
        live.services.db.remove()
        live.services.db.dispose()
        live.services.redis.close()


def test_a_disabled_password_is_enabled_again_by_a_reset(server, make_user):
    person, email = person_with(make_user, server)
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.id == person.id).values(
            password_failures=100, password_disabled_at=datetime.now(UTC).replace(tzinfo=None)))
    ask(english(server), person.login)
    set_password(english(server), link_for(server, email))
    user = db_user(server, person.id)
    assert user.password_disabled_at is None and user.password_failures == 0
    assert events(server, "account:credential:enabled", person.id)[-1].reason == "password-reset"
    assert english(server).sign_in(person.login, NEW_PASSWORD).status_code == 303


def test_forgot_requests_are_limited_and_answered_429(server, make_user):
    person, email = person_with(make_user, server)
    browser = english(server)
    page = browser.get("/password/forgot")
    statuses = [browser.submit(page, "/password/forgot", login=person.login).status_code for _ in range(5)]
    assert statuses[:4] == [200] * 4 and statuses[4] == 429
    throttled = browser.submit(page, "/password/forgot", login=person.login)
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
    assert "Too many requests" in throttled.text
    # An unknown login gets the very same limit (a 429 tells nothing about accounts).
    unknown = "nobody-" + secrets.token_hex(3)
    statuses = [browser.submit(page, "/password/forgot", login=unknown).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]
    # The account itself is mailed at most 3 times an hour, however it is named.
    assert len(reset_mails(server, email)) == 3
    assert ask(english(server), email).status_code == 200
    assert len(reset_mails(server, email)) == 3
    assert events(server, "account:password:reset-requested", person.id)[-1].reason == "throttled"


def test_every_way_of_setting_a_password_mails_the_account(server, make_user):
    """Issue 4: "password changed" goes out from /account/password, the required change,
    /activate and the reset (the reset is checked above)."""
    from tests.integration.test_activation import CODE, activate, issue_card

    changed, changed_address = person_with(make_user, server)
    browser = english(server)
    browser.sign_in(changed.login, changed.password)
    page = browser.get("/account/password")
    assert browser.submit(page, "/account/password", current_password=changed.password, password=NEW_PASSWORD,
                          confirm=NEW_PASSWORD).status_code == 303
    assert templates_to(server, changed_address) == ["password_changed"]

    required, required_address = person_with(make_user, server, verified=False)
    with server.services.db.transaction() as session:
        session.execute(update(User).where(User.id == required.id).values(must_change_password=True))
    browser = english(server)
    assert browser.sign_in(required.login, required.password).headers["Location"].endswith("/password/change-required")
    page = browser.get("/password/change-required")
    assert browser.submit(page, "/password/change-required", password=NEW_PASSWORD,
                          confirm=NEW_PASSWORD).status_code == 303
    assert templates_to(server, required_address) == ["password_changed"]

    server.services.redis.delete("throttle:activate:127.0.0.1")
    carded, carded_address = person_with(make_user, server, verified=False)
    code = CODE.search(issue_card(server, make_user, carded.id).text).group(1)
    assert activate(english(server), carded.login, code, password=NEW_PASSWORD).status_code == 303
    assert templates_to(server, carded_address) == ["password_changed"]
