"""The account's e-mail address (issue 4): changed or verified only through a link mailed
to the address, confirmed by a POST; the old address is told; through HTTP and the real
mail path (the outbox rows the worker would send)."""

from __future__ import annotations

import re
import secrets

import requests
from sqlalchemy import select

from idp.accounts.models import User
from idp.audit.models import AuditEvent
from idp.notify.models import OutboxMessage
from tests.helpers import Browser, form_fields
from tests.integration.test_reauth import age_session, english, errors, reauth_target

LINK = re.compile(r"http://127\.0\.0\.1:\d+(/account/email/verify/[A-Za-z0-9_-]{43})")


def address() -> str:
    return f"p-{secrets.token_hex(4)}@example.org"


def mails(server, to: str) -> list[OutboxMessage]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(select(OutboxMessage).where(OutboxMessage.to_address == to)
                                    .order_by(OutboxMessage.id)))
        for row in rows:
            session.expunge(row)
        return rows


def link_in(message: OutboxMessage) -> str:
    found = LINK.search(message.body_text)
    assert found, message.body_text
    return found.group(1)


def db_user(server, user_id: int) -> User:
    with server.services.db.transaction() as session:
        user = session.get(User, user_id)
        session.expunge(user)
        return user


def actions(server, user_id: int, prefix: str) -> list[str]:
    with server.services.db.transaction() as session:
        return list(session.scalars(select(AuditEvent.action).where(
            AuditEvent.subject == f"user:{user_id}", AuditEvent.action.startswith(prefix)).order_by(AuditEvent.seq)))


def signed_in(server, make_user, **fields):
    person = make_user(**fields)
    browser = english(server)
    assert browser.sign_in(person.login, person.password).status_code == 303
    return person, browser


def ask_for(browser: Browser, new_address: str) -> requests.Response:
    page = browser.get("/account/email")
    assert page.status_code == 200
    # The "send a verification link" form's action contains this one's: pick by field.
    _action, fields = form_fields(page.text, "/account/email")
    return browser.post("/account/email", data={"csrf_token": fields["csrf_token"], "email": new_address})


def confirm(browser: Browser, path: str) -> requests.Response:
    page = browser.get(path)
    assert page.status_code == 200, page.text[:300]
    return browser.submit(page, path)


def test_a_new_address_is_used_only_after_the_link_sent_to_it_is_confirmed(server, make_user):
    old, new = address(), address()
    person, browser = signed_in(server, make_user, email=old)
    sent = ask_for(browser, new)
    assert sent.status_code == 303
    assert new in browser.get("/account/email").text  # "We sent a link to ..."
    (verify,) = mails(server, new)
    assert verify.template == "email_verify" and person.login in verify.body_text
    (notice,) = mails(server, old)
    assert notice.template == "email_change_notice"
    assert new not in notice.body_text and f"{new[0]}***@example.org" in notice.body_text
    assert db_user(server, person.id).email == old
    path = link_in(verify)
    # The link does nothing on GET (mail scanners open links): only a button.
    other_device = english(server)
    page = other_device.get(path)
    assert page.status_code == 200 and new in page.text and "<form" in page.text
    assert db_user(server, person.id).email == old
    done = other_device.submit(page, path)
    assert done.status_code == 200 and new in done.text
    user = db_user(server, person.id)
    assert user.email == new and user.email_verified_at is not None
    assert actions(server, person.id, "account:email:") == ["account:email:change-requested", "account:email:verified"]
    # Single use.
    again = other_device.get(path)
    assert again.status_code == 400 and "This link does not work" in again.text


def test_an_unverified_address_gets_a_verification_link(server, make_user):
    current = address()
    person, browser = signed_in(server, make_user, email=current)
    page = browser.get("/account/email")
    assert "not verified" in page.text
    assert browser.submit(page, "/account/email/send-link").status_code == 303
    (verify,) = mails(server, current)
    assert verify.template == "email_verify"
    confirm(english(server), link_in(verify))
    user = db_user(server, person.id)
    assert user.email == current and user.email_verified_at is not None
    page = browser.get("/account/email")
    assert "(verified)" in page.text and "/account/email/send-link" not in page.text


def test_a_verification_link_stops_working_when_the_address_changes_or_a_newer_link_is_sent(server, make_user):
    current, first, second = address(), address(), address()
    person, browser = signed_in(server, make_user, email=current)
    browser.submit(browser.get("/account/email"), "/account/email/send-link")
    (for_current,) = mails(server, current)
    ask_for(browser, first)
    ask_for(browser, second)
    (for_first,) = mails(server, first)
    (for_second,) = mails(server, second)
    # Only the newest link of the account works.
    for stale in (for_current, for_first):
        assert english(server).get(link_in(stale)).status_code == 400
    confirm(english(server), link_in(for_second))
    assert db_user(server, person.id).email == second


def test_addresses_are_checked(server, make_user):
    _person, browser = signed_in(server, make_user)
    for bad in ("no-at-sign", "two@@example.org", "a@localhost", "a b@example.org", "a@example.org\r\nBcc: x@y.org",
                "x" * 310 + "@example.org", "<a@example.org>", "a@-example.org"):
        refused = ask_for(browser, bad)
        assert refused.status_code == 400 and errors(refused), bad
    with server.services.db.transaction() as session:
        assert not session.scalars(select(OutboxMessage).where(OutboxMessage.template == "email_verify",
                                                               OutboxMessage.to_address.contains("localhost"))).all()


def test_the_same_verified_address_is_not_sent_again(server, make_user):
    current = address()
    person, browser = signed_in(server, make_user, email=current)
    browser.submit(browser.get("/account/email"), "/account/email/send-link")
    confirm(english(server), link_in(mails(server, current)[0]))
    refused = ask_for(browser, current.upper())
    assert refused.status_code == 400 and "This is already your verified address." in errors(refused)
    assert len(mails(server, current.upper())) == 0 and len(mails(server, current)) == 1


def test_garbage_and_unknown_links_get_a_clear_page(server):
    browser = english(server)
    for path in ("/account/email/verify/nonsense", "/account/email/verify/" + "A" * 43,
                 "/account/email/verify/" + "%00" * 10, "/account/email/verify/" + "x" * 5000):
        response = browser.get(path)
        assert response.status_code in (400, 404) and "Something went wrong" not in response.text, path
    page = browser.get("/account/email/verify/" + "A" * 43)
    assert "This link does not work" in page.text


def test_a_stale_session_confirms_first(server, make_user):
    person, browser = signed_in(server, make_user)
    age_session(server, browser)
    assert reauth_target(browser.get("/account/email")) == "/account/email"


def test_mail_links_are_limited_per_account(server, make_user):
    current = address()
    person, browser = signed_in(server, make_user, email=current)
    page = browser.get("/account/email")
    statuses = [browser.submit(page, "/account/email/send-link").status_code for _ in range(7)]
    assert statuses[:6] == [303] * 6 and statuses[6] == 429
    throttled = browser.submit(page, "/account/email/send-link")
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
    assert len(mails(server, current)) == 6


def test_an_address_set_by_the_school_admin_is_not_verified(server, make_user):
    """Only the person can verify an address, so a reset link never goes to one that an
    administrator typed (idp/accounts/admin.py ``update_profile``)."""
    from tests.integration.admin.test_accounts import console

    current = address()
    person, browser = signed_in(server, make_user, email=current)
    browser.submit(browser.get("/account/email"), "/account/email/send-link")
    confirm(english(server), link_in(mails(server, current)[0]))
    admin, _ = console(server, make_user, "school_admin")
    profile = admin.get(f"/admin/accounts/{person.id}/profile")
    # Saving the profile with the same address keeps it verified ...
    assert admin.submit(profile, "/profile", display_name="Test User", email=current, locale="").status_code == 303
    assert db_user(server, person.id).email_verified_at is not None
    # ... another address is not.
    other = address()
    assert admin.submit(profile, "/profile", display_name="Test User", email=other, locale="").status_code == 303
    user = db_user(server, person.id)
    assert user.email == other and user.email_verified_at is None
