"""Passkeys in a real browser: Chromium's virtual authenticator (DevTools protocol
``WebAuthn`` domain) plays a phone with a platform passkey. A person signs in with the
password, adds a passkey on /account/2fa, signs out, and signs in again with the
passkey alone (no login name, no password), through idp/static/passkeys.js.

WebAuthn needs a secure context and an RP id that is a domain: http://localhost is a
secure context, while Chromium refuses an IP address such as 127.0.0.1 as RP id. So
this test runs its own provider whose issuer is http://localhost:<port> (same database
and Redis as the shared ``server``; listening on 127.0.0.1, which Chromium reaches for
"localhost")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from idp.accounts.models import Passkey
from idp.app import create_app
from idp.audit.models import AuditEvent
from tests.conftest import LiveServer, free_port, make_settings
from tests.e2e.test_browser_signin import CHROMIUM, _launch_chromium

pytestmark = pytest.mark.browser

TIMEOUT_MS = 20_000


@pytest.fixture
def localhost_server(server: LiveServer, database_url: str, redis_url: str) -> Iterator[LiveServer]:
    """The provider again, with ``http://localhost:<port>`` as issuer (the RP id)."""
    port = free_port()
    app = create_app(make_settings(database_url, redis_url, f"http://localhost:{port}"))
    live = LiveServer(app, port)  # listens on 127.0.0.1
    live.url = f"http://localhost:{port}"
    live.start()
    try:
        yield live
    finally:
        live.stop()
        svc = live.services
        svc.db.remove()
        svc.db.dispose()
        svc.redis.close()


def _journal(server: Any, action: str, user_id: int) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(
            select(AuditEvent).where(AuditEvent.action == action, AuditEvent.subject == f"user:{user_id}")
            .order_by(AuditEvent.seq)))
        for row in rows:
            session.expunge(row)
        return rows


def test_add_a_passkey_and_sign_in_with_it_alone(localhost_server, make_user, tmp_path):  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM
    expect.set_options(timeout=TIMEOUT_MS)
    idp = localhost_server
    person = make_user(display_name="Айбек Жумабаев")

    with sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            context = browser.new_context(locale="en-US")
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}")
                    if r.status >= 500 or (r.status >= 400 and not r.url.endswith("/favicon.ico")) else None)

            # A phone with a platform authenticator that holds passkeys and verifies its owner.
            cdp = context.new_cdp_session(page)
            cdp.send("WebAuthn.enable", {"enableUI": False})
            authenticator = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
                "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
                "hasUserVerification": True, "isUserVerified": True, "automaticPresenceSimulation": True,
            }})["authenticatorId"]

            # 1. Password sign-in, then "Add a passkey" on the two-factor page.
            page.goto(f"{idp.url}/login?next=/account/2fa")
            page.fill("#login", person.login)
            page.fill("#password", person.password)
            page.click("form button.primary")
            page.wait_for_url(f"{idp.url}/account/2fa")
            expect(page.locator("#passkey-register")).to_be_visible()
            page.fill("#passkey_name", "My phone")
            page.click("#passkey-register")
            expect(page.locator("td.passkey-name")).to_have_text("My phone")
            expect(page.locator("#passkey-add-error")).to_be_hidden()
            page.screenshot(path=str(tmp_path / "passkey-added.png"), full_page=True)

            held = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})["credentials"]
            assert len(held) == 1 and held[0]["isResidentCredential"] is True
            with idp.services.db.transaction() as session:
                [stored] = session.scalars(select(Passkey).where(Passkey.user_id == person.id)).all()
                assert stored.name == "My phone" and stored.transports == "internal"
                assert stored.last_used_at is None

            # 2. Signed out (the cookie is gone), then "Sign in with a passkey": no login, no password.
            context.clear_cookies()
            page.goto(f"{idp.url}/login?next=/account/2fa")
            expect(page.locator("#passkey-signin")).to_be_visible()
            assert page.locator("#login").input_value() == ""
            page.click("#passkey-signin")
            page.wait_for_url(f"{idp.url}/account/2fa")
            expect(page.locator("td.passkey-name")).to_have_text("My phone")
            assert "never" not in page.locator("table.passkeys").inner_text()

            success = _journal(idp, "account:login:success", person.id)[-1]
            assert success.details["amr"] == ["hwk", "user", "mfa"]
            with idp.services.db.transaction() as session:
                stored = session.scalars(select(Passkey).where(Passkey.user_id == person.id)).one()
                assert stored.last_used_at is not None

            # 3. A device without the passkey is told so, in the page's language.
            cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": authenticator})
            cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
                "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
                "hasUserVerification": True, "isUserVerified": True, "automaticPresenceSimulation": True,
            }})
            context.clear_cookies()
            page.goto(f"{idp.url}/login")
            page.click("#passkey-signin")
            expect(page.locator("#passkey-signin-error")).to_be_visible()
            expect(page.locator("#passkey-signin-error")).to_contain_text("No passkey was used")
            expect(page.locator("#passkey-signin-error")).to_have_class("error")
            assert page.url.startswith(f"{idp.url}/login")

            # The browser's own "NotAllowedError" of step 3 is logged by Chromium; nothing else.
            # (and the 404 of the favicon the browser asks for by itself).
            unexpected = [m for m in problems if "NotAllowedError" not in m and "not allowed" not in m.lower()
                          and not m.startswith("Failed to load resource: the server responded with a status of 404")]
            assert not unexpected, unexpected
        finally:
            browser.close()
