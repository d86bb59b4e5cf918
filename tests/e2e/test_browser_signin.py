"""A real browser through the whole journey: the demo portal app (examples/demo_portal.py)
signs in with the live provider, shows who signed in, refreshes its tokens and signs out
with RP-initiated logout; afterwards the provider asks for the password again.

Headless Chromium from the system (/usr/bin/chromium) is driven by Playwright; the
Playwright-managed browsers are never downloaded. CI installs chromium
(scripts/system-deps.sh), so a missing browser fails this test instead of skipping it.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from werkzeug.serving import make_server

from examples.demo_portal import create_app as create_demo_app
from idp.oidc.models import RefreshToken
from tests.helpers import ClientInfo

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DemoPortal:
    url: str
    client: ClientInfo


@pytest.fixture
def demo_portal(server: Any, make_client: Any) -> Iterator[DemoPortal]:
    """The demo portal app on its own loopback port, registered with the provider."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    client = make_client(
        name="Demo portal (e-journal)",
        redirect_uris=[base + "/callback"],
        post_logout_redirect_uris=[base + "/"],
        grant_types=["authorization_code", "refresh_token"],
        scopes=["openid", "profile", "email", "roles", "school", "offline_access"],
    )
    app = create_demo_app(
        {
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "issuer": server.url,
            "base_url": base,
        }
    )
    http = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, name="demo-portal", daemon=True)
    thread.start()
    try:
        yield DemoPortal(url=base, client=client)
    finally:
        http.shutdown()
        http.server_close()


def _launch_chromium(playwright: Any) -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser test needs the system Chromium "
            "(install it with `sudo apt-get install chromium` or `scripts/system-deps.sh chromium`). "
            "Do not run `playwright install`.",
            pytrace=False,
        )
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _refresh_tokens(server: Any, client_id: str) -> list[tuple[int | None, int | None]]:
    """(used_at, revoked_at) of every refresh token the provider issued to the client."""
    with server.services.db.transaction() as session:
        rows = session.scalars(
            select(RefreshToken)
            .where(RefreshToken.client_id == client_id)
            .order_by(RefreshToken.id)
        ).all()
        return [(row.used_at, row.revoked_at) for row in rows]


def test_sign_in_refresh_and_sign_out_in_a_browser(server, make_user, demo_portal, tmp_path):  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    user = make_user(
        roles=("student", "parent"),
        display_name="Айгерим Токтогулова",
        email="aigerim@example.test",
    )
    demo = demo_portal.url

    with sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            context = browser.new_context(locale="ky-KG")
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            visited: list[str] = []
            server_errors: list[str] = []
            page.on(
                "request", lambda r: visited.append(r.url) if r.is_navigation_request() else None
            )
            page.on(
                "response",
                lambda r: server_errors.append(f"{r.status} {r.url}") if r.status >= 500 else None,
            )

            # 1. The demo portal, signed out, in Kyrgyz by default.
            page.goto(demo + "/")
            expect(page.locator("html")).to_have_attribute("lang", "ky")
            expect(page.locator("#signed-out")).to_be_visible()

            # 2. Sign in: the provider's login page, in Kyrgyz.
            page.locator("#signin").click()
            page.wait_for_url(server.url + "/login?**")
            expect(page.locator("html")).to_have_attribute("lang", "ky")
            page.locator("#login").fill(user.login)
            page.locator("#password").fill(user.password)
            page.locator("form:has(#password) button[type=submit]").click()

            # 3. The consent page (the app is not a trusted first-party app), then back.
            page.locator("button[name='approve'], #signed-in").first.wait_for(state="visible")
            if page.url.startswith(server.url):
                expect(page.locator("html")).to_have_attribute("lang", "ky")
                page.locator("button[name='approve']").click()
            page.wait_for_url(demo + "/")
            expect(page.locator("#signed-in")).to_be_visible()
            expect(page.locator("html")).to_have_attribute("lang", "ky")
            expect(page.locator("#user-name")).to_have_text("Айгерим Токтогулова")
            expect(page.locator("#user-login")).to_have_text(user.login)
            roles = page.locator("#user-roles")
            expect(roles).to_contain_text("student")
            expect(roles).to_contain_text("parent")
            expect(roles).to_contain_text("Окуучу")  # the Kyrgyz label of "student"
            expect(page.locator("#user-school")).not_to_be_empty()
            first_expiry = int(page.locator("#expires-at").get_attribute("data-expires-at") or 0)
            assert first_expiry > 0
            assert any(url.startswith(server.url + "/authorize") for url in visited)
            assert any(url.startswith(demo + "/callback?") for url in visited)

            shot = tmp_path / "demo-portal-signed-in.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000

            # 4. Refresh: still signed in, and the refresh token was rotated.
            assert [
                used is None and revoked is None
                for used, revoked in _refresh_tokens(server, demo_portal.client.client_id)
            ] == [True]
            page.locator("#refresh").click()
            expect(page.locator("#notice")).to_have_attribute("data-notice", "refreshed")
            expect(page.locator("#signed-in")).to_be_visible()
            expect(page.locator("#user-name")).to_have_text("Айгерим Токтогулова")
            second_expiry = int(page.locator("#expires-at").get_attribute("data-expires-at") or 0)
            assert second_expiry >= first_expiry
            tokens = _refresh_tokens(server, demo_portal.client.client_id)
            assert len(tokens) == 2
            assert tokens[0][0] is not None  # the first one is used up...
            assert tokens[1] == (None, None)  # ...and the new one is live

            # 5. Sign out: through the provider's end_session and back, signed out.
            visited.clear()
            page.locator("#signout").click()
            page.wait_for_url(demo + "/?state=**")
            expect(page.locator("#signed-out")).to_be_visible()
            expect(page.locator("#notice")).to_have_attribute("data-notice", "signed_out")
            end_session = [u for u in visited if u.startswith(server.url + "/end_session?")]
            assert end_session, visited
            assert (
                "id_token_hint=" in end_session[0] and "post_logout_redirect_uri=" in end_session[0]
            )
            assert all(
                revoked is not None
                for _used, revoked in _refresh_tokens(server, demo_portal.client.client_id)
            )

            # 6. The provider session really ended: signing in again asks for the password.
            page.locator("#signin").click()
            page.wait_for_url(server.url + "/login?**")
            expect(page.locator("#login")).to_be_visible()
            expect(page.locator("#password")).to_be_visible()

            assert not server_errors, server_errors
        finally:
            browser.close()


def test_demo_portal_error_pages(server, demo_portal):  # type: ignore[no-untyped-def]
    """Errors end on a friendly page in the chosen language, never on a stack trace."""
    import requests

    http = requests.Session()
    denied = http.get(demo_portal.url + "/callback?error=access_denied&state=x", timeout=10)
    assert denied.status_code == 400
    assert 'lang="ky"' in denied.text and 'id="error-code">access_denied<' in denied.text
    assert "Traceback" not in denied.text

    http.get(demo_portal.url + "/?lang=en", timeout=10)
    forged = http.get(demo_portal.url + "/callback?code=abc&state=never-issued", timeout=10)
    assert forged.status_code == 400 and 'lang="en"' in forged.text
    assert "The sign-in request has expired or is not valid" in forged.text

    injected = http.get(demo_portal.url + "/callback?error=%3Cb%3Ehi%3C/b%3E", timeout=10)
    assert (
        injected.status_code == 400
        and "<b>hi" not in injected.text
        and "&lt;b&gt;" not in injected.text
    )

    no_csrf = http.post(demo_portal.url + "/logout", timeout=10)
    assert no_csrf.status_code == 400

    # A provider that does not answer: a friendly 503 page in Russian.
    unreachable = create_demo_app(
        {
            "client_id": "x",
            "client_secret": "y",
            "issuer": f"http://127.0.0.1:{_free_port()}",
            "base_url": "http://127.0.0.1:1",
        }
    ).test_client()
    unreachable.get("/?lang=ru")
    page = unreachable.get("/login")
    assert page.status_code == 503
    assert "Служба входа недоступна" in page.get_data(as_text=True)


def test_demo_portal_keeps_large_tokens_server_side():  # type: ignore[no-untyped-def]
    from flask import session

    from examples.demo_portal import load_tokens, save_tokens

    app = create_demo_app({"client_id": "x", "client_secret": "y", "issuer": "http://127.0.0.1:1"})
    small = {"id_token": "a.b.c", "refresh_token": "r" * 64, "expires_at": 1}
    # Random, so that the cookie serializer cannot compress it below the limit.
    big = {
        "id_token": "a." + secrets.token_urlsafe(4500) + ".c",
        "refresh_token": "r" * 64,
        "expires_at": 1,
    }
    with app.test_request_context("/"):
        save_tokens(small)
        assert session["tokens"] == small and "tokens_ref" not in session
        save_tokens(big)
        assert "tokens" not in session and isinstance(session["tokens_ref"], str)
        assert load_tokens() == big
        save_tokens(small)  # back in the cookie; the server-side copy is dropped
        assert "tokens_ref" not in session and load_tokens() == small
        assert not app.extensions["demo_portal"].store._data
