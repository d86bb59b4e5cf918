"""A real browser on "My sessions" (issue 5, ASVS 7.5.2): a student signs in on two
browsers (two Chromium contexts with their own cookies: a laptop and a phone), sees
both listed with the laptop marked "this device", ends the phone's session from the
laptop, and the phone is signed out at its next page load."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.test_browser_signin import TIMEOUT_MS, _launch_chromium

pytestmark = pytest.mark.browser

LAPTOP_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
             "Chrome/126.0.0.0 Safari/537.36")
PHONE_UA = ("Mozilla/5.0 (Linux; Android 13; SM-A515F) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/120.0.0.0 Mobile Safari/537.36")


def _sign_in(page: Any, server: Any, login: str, password: str) -> None:
    page.goto(server.url + "/login")
    page.locator("#login").fill(login)
    page.locator("#password").fill(password)
    page.locator("form:has(#password) button[type=submit]").click()
    page.wait_for_url(server.url + "/")


def test_a_student_ends_the_session_of_her_other_browser(server: Any, make_user: Any, tmp_path: Any) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    student = make_user(roles=("student",), display_name="Айгерим Токтогулова")
    with sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            server_errors: list[str] = []
            pages = []
            for user_agent in (LAPTOP_UA, PHONE_UA):
                context = browser.new_context(locale="en-US", user_agent=user_agent)
                context.set_default_timeout(TIMEOUT_MS)
                page = context.new_page()
                page.on("response", lambda r: server_errors.append(f"{r.status} {r.url}") if r.status >= 500 else None)
                pages.append(page)
            laptop, phone = pages
            _sign_in(laptop, server, student.login, student.password)
            _sign_in(phone, server, student.login, student.password)

            # The account page links to My sessions; both browsers are there.
            laptop.locator("#my-sessions").click()
            laptop.wait_for_url(server.url + "/account/sessions")
            sessions = laptop.locator("li.session")
            expect(sessions).to_have_count(2)
            expect(laptop.locator("li.session.this-device")).to_have_count(1)
            expect(laptop.locator("li.session.this-device h2")).to_contain_text("Chrome 126, Windows 10")
            expect(laptop.locator("li.this-device .this-device-badge")).to_have_text("this device")
            other = laptop.locator("li.session:not(.this-device)")
            expect(other.locator("h2")).to_contain_text("Android 13")
            expect(other.locator(".place")).to_contain_text("127.0.0.1")
            laptop.screenshot(path=str(tmp_path / "my-sessions.png"), full_page=True)

            # End the phone's session from the laptop.
            other.locator("button[type=submit]").click()
            laptop.wait_for_url(server.url + "/account/sessions")
            expect(laptop.locator("p.flash")).to_contain_text("was ended")
            expect(laptop.locator("li.session")).to_have_count(1)
            expect(laptop.locator("li.session.this-device")).to_have_count(1)

            # The phone is signed out: reloading its page leads to the sign-in page.
            phone.reload()
            phone.wait_for_url(server.url + "/login**")
            expect(phone.locator("#password")).to_be_visible()
            # The laptop is still signed in.
            laptop.goto(server.url + "/")
            expect(laptop.locator("h1")).to_contain_text("Айгерим Токтогулова")
            assert server_errors == []
        finally:
            browser.close()
    assert [s.device for s in server.services.sessions.list(student.id)] == ["Chrome 126, Windows 10"]
