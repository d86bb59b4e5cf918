"""The user's side of credentials set by the school: redeeming an activation card at
/activate, and the "choose a new password" step a sign-in must pass when support
required it, including inside an OIDC sign-in that then continues to the portal app."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta

import pytest
import requests
from sqlalchemy import select

from idp.accounts.models import ActivationCode, User
from idp.audit.models import AuditEvent
from tests.helpers import Browser, callback_params

CODE = re.compile(r"<code>([A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4})</code>")
NEW_PASSWORD = "river mountain apricot lamp"


@pytest.fixture(autouse=True)
def fresh_throttle(server):
    """Every test here posts to /activate from 127.0.0.1; start each with a clean count."""
    server.services.redis.delete("throttle:activate:127.0.0.1")
    yield
    server.services.redis.delete("throttle:activate:127.0.0.1")


def english(server) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def errors(page: requests.Response) -> list[str]:
    return re.findall(r'<p class="error" role="alert">(.*?)</p>', page.text, re.S)


def issue_card(server, make_user, person_id: int) -> requests.Response:
    """A school admin issues an activation code in the console; returns the card page."""
    admin = make_user(roles=("school_admin",))
    console = english(server)
    console.sign_in(admin.login, admin.password)
    form = console.get(f"/admin/accounts/{person_id}/activation-code")
    card = console.submit(form, "/activation-code", reason="New pupil")
    assert card.status_code == 200, card.text[:500]
    return card


def create_in_console(server, make_user, display_name: str = "Асель Жумабаева",
                      login: str | None = None) -> tuple[str, int]:
    admin = make_user(roles=("school_admin",))
    console = english(server)
    console.sign_in(admin.login, admin.password)
    login = login or "pupil-" + secrets.token_hex(4)
    created = console.submit(console.get("/admin/accounts/new"), "/admin/accounts/new", login=login,
                             display_name=display_name, email="", locale="", roles=["student"], classes=[])
    assert created.status_code == 303
    user_id = int(created.headers["Location"].rstrip("/").rsplit("/", 1)[1])
    return login, user_id


def activate(browser: Browser, login: str, code: str, password: str = NEW_PASSWORD,
             confirm: str | None = None) -> requests.Response:
    page = browser.get("/activate")
    assert page.status_code == 200
    return browser.submit(page, "/activate", login=login, code=code, password=password,
                          confirm=password if confirm is None else confirm)


def test_login_page_links_to_activation(server, browser):
    assert 'href="/activate"' in browser.get("/login").text


def test_card_code_sets_the_password_and_signs_in_once(server, make_user):
    login, user_id = create_in_console(server, make_user)
    card = issue_card(server, make_user, user_id)
    assert "no-store" in card.headers["Cache-Control"]
    assert server.services.settings.school_name in card.text
    assert "Асель Жумабаева" in card.text and login in card.text
    assert f"{server.url}/activate" in card.text
    expiry = (datetime.now(UTC) + timedelta(days=7)).year
    assert str(expiry) in card.text
    code = CODE.search(card.text).group(1)

    person = english(server)
    # Codes are typed from paper: lower case and without dashes are accepted.
    signed_in = activate(person, login, code.replace("-", " ").lower())
    assert signed_in.status_code == 303, errors(signed_in)
    home = person.get(signed_in.headers["Location"])
    assert home.status_code == 200 and login in home.text

    again = activate(english(server), login, code, password="another long password 123")
    assert again.status_code == 400 and len(errors(again)) == 1

    # The chosen password works at the sign-in page; the code's second use changed nothing.
    assert english(server).sign_in(login, NEW_PASSWORD).status_code == 303
    assert english(server).sign_in(login, "another long password 123").status_code == 401
    with server.services.db.transaction() as session:
        actions = set(session.scalars(select(AuditEvent.action).where(AuditEvent.subject == f"user:{user_id}")))
    assert {"account:activation-code:issue", "account:activation-code:redeem"} <= actions


def test_every_code_failure_gets_the_same_message(server, make_user):
    login, user_id = create_in_console(server, make_user)
    code = CODE.search(issue_card(server, make_user, user_id).text).group(1)

    wrong_code = activate(english(server), login, "ABCD-EFGH-JKMN")
    unknown_login = activate(english(server), "nobody-" + secrets.token_hex(4), code)
    assert wrong_code.status_code == unknown_login.status_code == 400
    assert errors(wrong_code) == errors(unknown_login) and len(errors(wrong_code)) == 1

    with server.services.db.transaction() as session:
        live = session.scalar(select(ActivationCode).where(ActivationCode.user_id == user_id,
                                                           ActivationCode.used_at.is_(None)))
        assert live.failed_attempts == 1
        live.expires_at = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=1)
    expired = activate(english(server), login, code)
    assert expired.status_code == 400 and errors(expired) == errors(wrong_code)


def test_new_password_rules_do_not_spend_the_code(server, make_user):
    login, user_id = create_in_console(server, make_user)
    code = CODE.search(issue_card(server, make_user, user_id).text).group(1)
    cases = [
        {"password": "short pass"},  # 10 characters
        {"password": "x" * 129},
        {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD + "!"},
        # 20 code points as typed, but 10 characters after NFC (и + combining breve = й).
        {"password": "и\u0306" * 10},
    ]
    for case in cases:
        response = activate(english(server), login, code, **case)
        assert response.status_code == 400 and errors(response), case
    decomposed = "и\u0306" * 15
    assert activate(english(server), login, code, password=decomposed).status_code == 303
    with server.services.db.transaction() as session:
        assert session.get(User, user_id).password_changed_at is not None


def test_password_equal_to_login_is_refused(server, make_user):
    login, user_id = create_in_console(server, make_user, login="long-pupil-" + secrets.token_hex(4))
    assert len(login) >= 15
    code = CODE.search(issue_card(server, make_user, user_id).text).group(1)
    same = activate(english(server), login, code, password=login.upper())
    assert same.status_code == 400 and errors(same)
    assert activate(english(server), login, code).status_code == 303


def test_activation_posts_are_limited_per_address(server):
    browser = english(server)
    page = browser.get("/activate")
    for _ in range(20):
        assert browser.submit(page, "/activate", login="x", code="y", password="", confirm="").status_code == 400
    limited = browser.submit(page, "/activate", login="x", code="y", password="", confirm="")
    assert limited.status_code == 429
    assert 0 < int(limited.headers["Retry-After"]) <= 600
    assert "<h1>" in limited.text and "Traceback" not in limited.text


# --- must change password -------------------------------------------------------------------
def require_change(server, make_user, person) -> None:
    """Tech support requires a new password in the console."""
    support = english(server)
    agent = make_user(roles=("tech_support",))
    support.sign_in(agent.login, agent.password)
    form = support.get(f"/admin/accounts/{person.id}/password/require-change")
    done = support.submit(form, "/password/require-change", confirm_login=person.login,
                          reason="Password seen by classmates")
    assert done.status_code == 303


def test_required_password_change_inside_an_oidc_sign_in(server, make_user, make_client):
    person = make_user(roles=("student",))
    client = make_client(scopes=["openid", "profile"], trusted=True)
    require_change(server, make_user, person)

    browser = english(server)
    verifier_params = {
        "response_type": "code", "client_id": client.client_id, "redirect_uri": client.redirect_uri,
        "scope": "openid profile", "state": "st-1", "nonce": "n-1",
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "code_challenge_method": "S256",
    }
    login_page = browser.follow_until_external(browser.get("/authorize", params=verifier_params))
    assert 'action="/login"' in login_page.text
    after_password = browser.submit(login_page, "/login", login=person.login, password=person.password)
    assert after_password.status_code == 303
    assert after_password.headers["Location"].endswith("/password/change-required")
    # Not signed in yet: the account page still asks for a sign-in.
    assert browser.get("/").status_code == 302

    change = browser.get("/password/change-required")
    assert change.status_code == 200
    for bad in ({"password": "too short"}, {"password": person.password},
                {"password": NEW_PASSWORD, "confirm": "something else entirely"}):
        values = {"confirm": bad["password"], **bad}
        refused = browser.submit(change, "/password/change-required", **values)
        assert refused.status_code == 400 and errors(refused), bad

    changed = browser.submit(change, "/password/change-required", password=NEW_PASSWORD, confirm=NEW_PASSWORD)
    assert changed.status_code == 303 and "/authorize/continue/" in changed.headers["Location"]
    callback = browser.follow_until_external(changed)
    params = callback_params(callback.headers.get("Location", ""))
    assert params.get("code") and params.get("state") == "st-1"

    assert english(server).sign_in(person.login, person.password).status_code == 401
    fresh = english(server).sign_in(person.login, NEW_PASSWORD)
    assert fresh.status_code == 303 and fresh.headers["Location"] == "/"
    with server.services.db.transaction() as session:
        assert not session.get(User, person.id).must_change_password
        assert session.scalar(select(AuditEvent).where(AuditEvent.subject == f"user:{person.id}",
                                                       AuditEvent.action == "account:password:change"))


def test_change_page_without_a_verified_password_goes_to_sign_in(server, make_user):
    browser = english(server)
    assert browser.get("/password/change-required").status_code == 303
    person = make_user(roles=("student",))
    require_change(server, make_user, person)
    # A wrong password never reaches the change page.
    wrong = browser.sign_in(person.login, "not the password at all")
    assert wrong.status_code == 401
    assert browser.get("/password/change-required").headers["Location"].endswith("/login")
