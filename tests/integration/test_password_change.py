"""Self-service password change at /account/password, through HTTP."""

from __future__ import annotations

import re

import requests
from sqlalchemy import select

from idp.audit.models import AuditEvent
from tests.helpers import Browser, form_fields

NEW_PASSWORD = "velvet kettle orbit meadow"


def english(server) -> Browser:
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def errors(page: requests.Response) -> list[str]:
    return re.findall(r'<p class="error" role="alert">(.*?)</p>', page.text, re.S)


def change(browser: Browser, current: str, new: str, confirm: str | None = None) -> requests.Response:
    page = browser.get("/account/password")
    assert page.status_code == 200, page.text[:300]
    action, fields = form_fields(page.text, "/account/password")
    fields.update({"current_password": current, "password": new, "confirm": new if confirm is None else confirm})
    return browser.post(action, data=fields)


def signed_in(browser: Browser) -> bool:
    return browser.get("/").status_code == 200


def test_account_page_links_to_the_change_and_the_page_needs_a_session(server, make_user):
    person = make_user()
    browser = english(server)
    assert browser.get("/account/password").status_code == 302
    browser.sign_in(person.login, person.password)
    assert 'href="/account/password"' in browser.get("/").text
    page = browser.get("/account/password").text
    assert 'autocomplete="new-password"' in page and 'autocomplete="current-password"' in page
    assert "<meter" in page and "password_meter.js" in page
    assert "onpaste" not in page and "<script>" not in page


def test_the_current_password_is_required(server, make_user):
    person = make_user()
    browser = english(server)
    browser.sign_in(person.login, person.password)
    missing = change(browser, "", NEW_PASSWORD)
    assert missing.status_code == 400 and "Enter your current password." in errors(missing)
    wrong = change(browser, person.password + "x", NEW_PASSWORD)
    assert wrong.status_code == 400 and "The current password is incorrect." in errors(wrong)
    # Nothing changed: the old password still signs in.
    assert english(server).sign_in(person.login, person.password).status_code == 303


def test_policy_reasons_are_shown(server, make_user):
    person = make_user(display_name="Aigerim Asanova")
    browser = english(server)
    browser.sign_in(person.login, person.password)
    cases = {
        "short one": "at least 15 characters",
        "x" * 129: "at most 128 characters",
        "Aigerim2025! and more": "must not contain your name",
        person.login + " and more words": "must not contain your login",
        "darbaza mountain river": "the word \u201cdarbaza\u201d",
        "password1234567890": "list of common or leaked passwords",
        person.password: "different from your current one",
    }
    for password, reason in cases.items():
        response = change(browser, person.password, password)
        assert response.status_code == 400, password
        assert any(reason in e for e in errors(response)), (password, errors(response))
    mismatch = change(browser, person.password, NEW_PASSWORD, confirm=NEW_PASSWORD + "!")
    assert mismatch.status_code == 400 and "The two passwords are not the same." in errors(mismatch)
    assert english(server).sign_in(person.login, person.password).status_code == 303


def test_success_changes_the_password_ends_other_sessions_and_keeps_this_one(server, make_user):
    person = make_user()
    other = english(server)
    other.sign_in(person.login, person.password)
    assert signed_in(other)
    browser = english(server)
    browser.sign_in(person.login, person.password)
    done = change(browser, person.password, NEW_PASSWORD)
    assert done.status_code == 303, errors(done)
    confirmation = browser.get(done.headers["Location"])
    assert confirmation.status_code == 200 and "Your password has been changed." in confirmation.text
    assert signed_in(browser)
    assert not signed_in(other)
    assert english(server).sign_in(person.login, person.password).status_code == 401
    assert english(server).sign_in(person.login, NEW_PASSWORD).status_code == 303
    with server.services.db.transaction() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "account:password:change",
                                     AuditEvent.subject == f"user:{person.id}").order_by(AuditEvent.seq)
        ).one()
        assert event.actor == f"user:{person.id}"
        assert event.details == {"required": False, "ended_other_sessions": True}


def test_128_characters_work_and_129_are_refused(server, make_user):
    person = make_user()
    browser = english(server)
    browser.sign_in(person.login, person.password)
    longest = ("ünïcödé meadow kettle " * 7)[:128]
    assert len(longest) == 128
    refused = change(browser, person.password, longest + "z")
    assert refused.status_code == 400 and any("at most 128" in e for e in errors(refused))
    done = change(browser, person.password, longest)
    assert done.status_code == 303, errors(done)
    assert english(server).sign_in(person.login, longest).status_code == 303
    # Never truncated: the 127-character prefix is not the password.
    assert english(server).sign_in(person.login, longest[:127]).status_code == 401
