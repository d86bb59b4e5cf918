"""The console in a real browser: a school admin creates an account, the person
activates it, tech support locks it with a reason; the locked account cannot sign in
and the security officer sees both events in the audit journal."""

from __future__ import annotations

import os
import re
import secrets

import pytest

from tests.e2e.test_browser_signin import CHROMIUM, CHROMIUM_ARGS
from tests.helpers import SECOND_FACTORS

TIMEOUT_MS = 20_000


@pytest.mark.browser
def test_admin_creates_support_locks_journal_shows(server, make_user, tmp_path):  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (make test does)"
    admin = make_user(roles=("school_admin",))
    support = make_user(roles=("tech_support",))
    officer = make_user(roles=("security_officer",))
    new_login = "new-" + secrets.token_hex(3)

    def sign_in(page, who, next_path: str) -> None:  # type: ignore[no-untyped-def]
        page.goto(f"{server.url}/login?next={next_path}")
        page.fill("#login", who.login)
        page.fill("#password", who.password)
        page.click("button.primary")
        page.wait_for_load_state()
        if page.url.endswith("/login/second-factor"):
            # Console roles always sign in with a second factor (the test "phone").
            page.fill("#code", SECOND_FACTORS.code_for(who.login) or "")
            page.click("button.primary")
            page.wait_for_load_state()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # 1. The school admin creates the account and issues an activation code.
            admin_page = browser.new_context(locale="en-US").new_page()
            admin_page.set_default_timeout(TIMEOUT_MS)
            sign_in(admin_page, admin, "/admin/accounts/new")
            admin_page.fill("#login", new_login)
            admin_page.fill("#display_name", "Нурлан Бекмуратов")
            admin_page.check("#role-student")
            admin_page.click("button.primary")
            admin_page.wait_for_load_state()
            assert "Нурлан Бекмуратов" in admin_page.content()
            account_url = admin_page.url
            user_id = int(re.search(r"/admin/accounts/(\d+)", account_url).group(1))
            admin_page.goto(f"{server.url}/admin/accounts/{user_id}/activation-code")
            admin_page.click("button.primary")
            admin_page.wait_for_load_state()
            code = admin_page.locator("code").first.inner_text().strip()
            assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}", code)
            admin_page.screenshot(path=str(tmp_path / "activation-card.png"))

            # 2. The person activates the account and is signed in.
            person = browser.new_context(locale="ky-KG").new_page()
            person.set_default_timeout(TIMEOUT_MS)
            person.goto(f"{server.url}/activate")
            password = "жаңы сырсөз " + secrets.token_hex(6)
            person.fill("#login", new_login)
            person.fill("#code", code)
            person.fill("#password", password)
            person.fill("#confirm", password)
            person.click("button.primary")
            person.wait_for_load_state()
            assert new_login in person.content()

            # 3. Tech support locks the account with a reason.
            support_page = browser.new_context(locale="en-US").new_page()
            support_page.set_default_timeout(TIMEOUT_MS)
            sign_in(support_page, support, f"/admin/accounts/{user_id}/lock")
            support_page.fill("#confirm_login", new_login)
            support_page.fill("#reason", "Reported a shared password")
            support_page.click("button.primary")
            support_page.wait_for_load_state()
            assert "Reported a shared password" in support_page.content()

            # 4. The person's session is gone and signing in again is refused.
            person.goto(f"{server.url}/")
            assert "/login" in person.url
            person.fill("#login", new_login)
            person.fill("#password", password)
            person.click("button.primary")
            person.wait_for_load_state()
            assert "/login" in person.url and person.locator(".error").count() == 1

            # 5. The security officer sees both events in the journal.
            officer_page = browser.new_context(locale="en-US").new_page()
            officer_page.set_default_timeout(TIMEOUT_MS)
            sign_in(officer_page, officer, f"/admin/audit?subject=user:{user_id}")
            journal = officer_page.content()
            assert "account:create" in journal and "account:lock" in journal
            assert "Reported a shared password" in journal
            officer_page.screenshot(path=str(tmp_path / "journal.png"), full_page=True)
        finally:
            browser.close()
