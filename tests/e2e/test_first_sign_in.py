"""A real browser through a teacher's first sign-in (issue 4): the demo portal sends
her to the provider; with the initial password printed by `darbaza demo seed` she must
first choose her own password, set up an authenticator app (the QR code's key typed in
as a phone would), keep her recovery codes and accept the confidentiality obligation
(policy 2.5) — and only then reaches the demo app, signed in with two factors."""

from __future__ import annotations

import re
from typing import Any

import pyotp
import pytest
from sqlalchemy import select

from idp.accounts.models import ObligationAcceptance, User
from tests.e2e.test_browser_signin import TIMEOUT_MS, _launch_chromium, demo_portal  # noqa: F401

pytestmark = pytest.mark.browser


def test_first_sign_in_of_a_seeded_teacher(server: Any, make_user: Any, demo_portal: Any, tmp_path: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    # As `darbaza demo seed` makes a teacher: an initial password, a verified school
    # address, a role that requires 2FA and has an obligation, nothing enrolled yet.
    teacher = make_user(roles=("teacher",), display_name="Нургүл Сатыбалдиева", email="nurgul@school.example.org",
                        two_factor=False, accept_obligations=False)
    with server.services.db.transaction() as session:
        user = session.get(User, teacher.id)
        user.must_change_password = True
        user.email_verified_at = user.created_at
    new_password = "алма булут шамал жылдыз китеп"

    with sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            context = browser.new_context(locale="ky-KG")
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            server_errors: list[str] = []
            page.on("response", lambda r: server_errors.append(f"{r.status} {r.url}") if r.status >= 500 else None)

            page.goto(demo_portal.url + "/")
            page.locator("#signin").click()
            page.wait_for_url(server.url + "/login?**")
            page.locator("#login").fill(teacher.login)
            page.locator("#password").fill(teacher.password)
            page.locator("form:has(#password) button[type=submit]").click()

            # 1. The initial password must be replaced.
            page.wait_for_url(server.url + "/password/change-required")
            page.locator("#password").fill(new_password)
            page.locator("#confirm").fill(new_password)
            page.locator("form:has(#confirm) button[type=submit]").click()

            # 2. Her role requires a second factor: set up the authenticator app.
            page.wait_for_load_state()
            assert page.url == server.url + "/login/enrol-2fa", page.locator("main").inner_text()[:800]
            expect(page.locator("svg")).to_be_visible()  # the QR code, inline
            key = re.sub(r"\s+", "", page.locator("code.secret").inner_text())
            page.locator("#code").fill(pyotp.TOTP(key).now())
            page.locator("form:has(#code) button[type=submit]").click()

            # 3. The recovery codes, shown once.
            page.wait_for_url(server.url + "/login/enrol-2fa/codes")
            assert page.locator("ul.recovery-codes li").count() == 10
            page.locator("main button.primary").click()

            # 4. The confidentiality obligation.
            page.wait_for_url(server.url + "/login/obligation")
            expect(page.locator("#obligation-teacher")).to_be_visible()
            page.locator("#accept").check()
            page.locator("form:has(#accept) button[type=submit]").click()

            # 5. Consent for the (untrusted) demo app, then the demo app itself.
            page.locator("button[name='approve'], #signed-in").first.wait_for(state="visible")
            if page.url.startswith(server.url):
                page.locator("button[name='approve']").click()
            page.wait_for_url(demo_portal.url + "/")
            expect(page.locator("#signed-in")).to_be_visible()
            expect(page.locator("#user-name")).to_have_text("Нургүл Сатыбалдиева")
            page.screenshot(path=str(tmp_path / "teacher-first-sign-in.png"), full_page=True)
            assert server_errors == []
        finally:
            browser.close()

    with server.services.db.transaction() as session:
        user = session.get(User, teacher.id)
        assert not user.must_change_password
        assert user.has_totp
        assert server.services.passwords.verify(user.password_hash, new_password)
        accepted = session.scalars(select(ObligationAcceptance).where(ObligationAcceptance.user_id == teacher.id)).all()
        assert [a.obligation.role.name for a in accepted] == ["teacher"]
