"""A breach report in a real browser (issue 6, policy 5.2.3): a student signed in on two
browsers (two Chromium contexts with their own cookies) reports "I see activity I don't
recognise" from the account page, sees the confirmation with the case number and is
signed out on both; tech support opens the case from the queue, unlocks the account,
issues a one-time activation code and resolves the case; the student sets a new password
with the code at /activate and is signed in again."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest
from sqlalchemy import select

from idp.accounts.models import User
from idp.breach.models import BreachCase
from tests.e2e.test_browser_signin import TIMEOUT_MS, _launch_chromium
from tests.e2e.test_sessions_browser import LAPTOP_UA, PHONE_UA
from tests.e2e.test_sessions_browser import _sign_in as sign_in_student
from tests.helpers import SECOND_FACTORS

pytestmark = pytest.mark.browser


def sign_in_console(page: Any, server: Any, who: Any, next_path: str) -> None:
    """Console roles sign in with a second factor (the test "phone")."""
    page.goto(f"{server.url}/login?next={next_path}")
    page.fill("#login", who.login)
    page.fill("#password", who.password)
    page.click("button.primary")
    page.wait_for_load_state()
    if page.url.endswith("/login/second-factor"):
        page.fill("#code", SECOND_FACTORS.code_for(who.login) or "")
        page.click("button.primary")
        page.wait_for_load_state()


def act(page: Any, action: str, reason: str, outcome: str | None = None) -> None:
    section = page.locator(f"#action-{action}")
    if outcome is not None:
        section.locator(f"#{action}-outcome").select_option(outcome)
    section.locator(f"#{action}-reason").fill(reason)
    section.locator("button[type=submit]").click()
    page.wait_for_load_state()


def test_a_student_reports_is_signed_out_everywhere_and_signs_in_again_after_support_resolves(
        server: Any, make_user: Any, tmp_path: Any) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    student = make_user(roles=("student",), display_name="Бакыт Сыдыков")
    support = make_user(roles=("tech_support",))
    with sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            server_errors: list[str] = []

            def new_page(user_agent: str | None = None) -> Any:
                context = browser.new_context(locale="en-US", **({"user_agent": user_agent} if user_agent else {}))
                context.set_default_timeout(TIMEOUT_MS)
                page = context.new_page()
                page.on("response",
                        lambda r: server_errors.append(f"{r.status} {r.url}") if r.status >= 500 else None)
                return page

            # 1. The student is signed in on a laptop and a phone, and reports from the laptop.
            laptop, phone = new_page(LAPTOP_UA), new_page(PHONE_UA)
            sign_in_student(laptop, server, student.login, student.password)
            sign_in_student(phone, server, student.login, student.password)
            assert len(server.services.sessions.list(student.id)) == 2
            laptop.locator("#report-problem").click()
            laptop.wait_for_url(server.url + "/account/report-problem")
            laptop.get_by_label("I see activity I don't recognise").check()
            laptop.locator("#description").fill("Messages in the portal I did not write")
            laptop.locator("form:has(#noticed) button[type=submit]").click()
            laptop.wait_for_load_state()
            expect(laptop.locator("h1")).to_have_text("Report received")
            number = laptop.locator("#case-number").inner_text().strip()
            assert re.fullmatch(r"BR-\d{6}", number)
            expect(laptop.locator("main, body").first).to_contain_text("locked")
            laptop.screenshot(path=str(tmp_path / "report-received.png"), full_page=True)

            # Signed out on both browsers.
            for page in (laptop, phone):
                page.goto(server.url + "/")
                page.wait_for_url(server.url + "/login**")
                expect(page.locator("#password")).to_be_visible()
            assert server.services.sessions.list(student.id) == []
            with server.services.db.transaction() as session:
                user = session.get(User, student.id)
                assert user is not None and user.locked and user.must_change_password
                case_id = session.scalar(select(BreachCase.id).where(BreachCase.user_id == student.id))

            # 2. Tech support opens the case from the queue and resolves it.
            console = new_page()
            sign_in_console(console, server, support, "/admin/cases")
            assert console.url.startswith(server.url + "/admin/cases")
            console.locator(f'tr[data-case="{number}"] a').first.click()
            console.wait_for_url(f"{server.url}/admin/cases/{case_id}")
            expect(console.locator("#case-state")).to_contain_text("ontained")
            act(console, "unlock", "Spoke to the student in person with the class teacher")
            expect(console.locator("body")).to_contain_text("The account was unlocked.")
            act(console, "activation-code", "New password after the report")
            code_text = console.locator("section.card code").inner_text().strip()
            assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}", code_text), code_text
            console.screenshot(path=str(tmp_path / "case-activation-card.png"), full_page=True)
            console.goto(f"{server.url}/admin/cases/{case_id}")
            act(console, "resolve", "Classmate knew the password; talked to both", outcome="confirmed")
            expect(console.locator("#case-state")).to_contain_text("esolved")
            steps = console.locator("tr.step").evaluate_all("rows => rows.map(r => r.dataset.action)")
            assert steps == ["report", "contain", "unlock", "activation-code", "resolve"], steps

            # 3. The student activates with the code, sets a new password and is signed in.
            password = "күзгү токой жана тоо " + secrets.token_hex(6)
            laptop.goto(f"{server.url}/activate")
            laptop.fill("#login", student.login)
            laptop.fill("#code", code_text)
            laptop.fill("#password", password)
            laptop.fill("#confirm", password)
            laptop.click("button.primary")
            laptop.wait_for_load_state()
            assert "/activate" not in laptop.url, laptop.locator("body").inner_text()
            laptop.goto(server.url + "/")
            expect(laptop.locator("h1")).to_contain_text("Бакыт Сыдыков")
            assert len(server.services.sessions.list(student.id)) == 1
            # The old password no longer works; the new one does (on the phone).
            phone.goto(server.url + "/login")
            phone.locator("#login").fill(student.login)
            phone.locator("#password").fill(student.password)
            phone.locator("form:has(#password) button[type=submit]").click()
            phone.wait_for_load_state()
            assert "/login" in phone.url and phone.locator(".error").count() == 1
            phone.goto(server.url + "/login")
            phone.locator("#login").fill(student.login)
            phone.locator("#password").fill(password)
            phone.locator("form:has(#password) button[type=submit]").click()
            phone.wait_for_url(server.url + "/")
            assert server_errors == []
        finally:
            browser.close()
    with server.services.db.transaction() as session:
        case = session.get(BreachCase, case_id)
        assert case is not None and (case.state, case.outcome) == ("resolved", "confirmed")
        user = session.get(User, student.id)
        assert user is not None and not user.locked and not user.must_change_password
