"""A real browser through the sign-in cards of a class (issue 7): a teacher signs in
with two factors, opens her class and prints its sign-in cards; a student of the class,
in a browser of his own, opens the activation page the card points to (the printed
address, which the card's QR code encodes), types the code from the card, chooses his
password and signs in to the demo portal app."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pyotp
import pytest
from sqlalchemy import select

from idp.accounts.admin import AccountAdmin, Actor
from idp.accounts.models import ActivationCode, User
from idp.mfa.qr import qr_svg
from tests.e2e.test_browser_signin import TIMEOUT_MS, _launch_chromium, demo_portal  # noqa: F401

pytestmark = pytest.mark.browser

SCHOOL_ADMIN = Actor(ref="cli:test", permissions={"admin:users:write", "admin:roles:assign"})
STUDENT_PASSWORD = "тоо дарыя өрүк чырак"
PATH_DATA = re.compile(r'<path[^>]*\bd="([^"]+)"')


def _class_with_teacher_and_student(server: Any, teacher_id: int) -> tuple[int, str, str]:
    """A new class taught by the teacher, with one student created as the console and the
    roster create accounts: no password, waiting for an activation code."""
    svc = server.services
    name = "C" + secrets.token_hex(3).upper()
    login = f"student-{secrets.token_hex(4)}"
    with svc.db.transaction() as session:
        admin = AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)
        school_class = admin.create_class(SCHOOL_ADMIN, name)
        admin.set_classes(SCHOOL_ADMIN, session.get(User, teacher_id), [name])
        student = admin.create(SCHOOL_ADMIN, login=login, display_name="Бакыт Осмонов", email=None, locale="ky",
                               roles=["student"], classes=[name])
        assert student.password_hash is None
        return school_class.id, name, login


def test_a_student_activates_with_a_printed_card_and_signs_in_to_the_demo_app(
    server: Any, make_user: Any, demo_portal: Any, tmp_path: Any  # noqa: F811
) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    teacher = make_user(roles=("teacher",), display_name="Нургүл Сатыбалдиева")
    assert teacher.totp_secret  # the teacher role requires 2FA: make_user enrolled an app
    class_id, class_name, student_login = _class_with_teacher_and_student(server, teacher.id)

    with sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            server_errors: list[str] = []

            def new_page() -> Any:
                context = browser.new_context(locale="en-US")
                context.set_default_timeout(TIMEOUT_MS)
                page = context.new_page()
                page.on("response", lambda r: server_errors.append(f"{r.status} {r.url}") if r.status >= 500 else None)
                return page

            # 1. The teacher signs in (password and authenticator app) and opens her class.
            page = new_page()
            page.goto(server.url + "/login?next=/teacher")
            page.locator("#login").fill(teacher.login)
            page.locator("#password").fill(teacher.password)
            page.locator("form:has(#password) button[type=submit]").click()
            page.wait_for_url(server.url + "/login/second-factor")
            page.locator("#code").fill(pyotp.TOTP(teacher.totp_secret).now())
            page.locator("form:has(#code) button[type=submit]").click()
            page.wait_for_url(server.url + "/teacher")
            page.locator("a.teacher-class", has_text=class_name).click()
            page.wait_for_url(f"{server.url}/teacher/classes/{class_id}")
            row = page.locator(f'tr.student[data-login="{student_login}"]')
            expect(row.locator("td.activated")).to_have_text("no")

            # 2. She prints the class's sign-in cards.
            page.get_by_role("button", name="Print sign-in cards for the class").click()
            page.wait_for_url(f"{server.url}/teacher/classes/{class_id}/cards")
            card = page.locator("section.card", has=page.locator(".card-login", has_text=student_login))
            expect(card).to_have_count(1)
            expect(card.locator(".card-name")).to_have_text("Бакыт Осмонов")
            code = card.locator(".card-code").inner_text().strip()
            assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}", code), code
            printed = re.search(r"(https?://\S+/activate\?login=[^\s,]+)", card.inner_text())
            assert printed is not None, card.inner_text()
            activation_url = printed.group(1)
            assert activation_url == f"{server.url}/activate?login={student_login}"
            # The QR code on the card encodes the same address (segno draws one path per code).
            drawn = PATH_DATA.search(card.locator(".qr-box").inner_html())
            expected = PATH_DATA.search(qr_svg(activation_url, title="-"))
            assert drawn is not None and expected is not None and drawn.group(1) == expected.group(1)
            page.screenshot(path=str(tmp_path / "sign-in-cards.png"), full_page=True)
            page.context.close()

            # 3. The student, in a browser of his own, opens the card's address and activates.
            student = new_page()
            student.goto(activation_url)
            expect(student.locator("#login")).to_have_value(student_login)
            student.locator("#code").fill(code.lower())  # as typed from the card, any case
            student.locator("#password").fill(STUDENT_PASSWORD)
            student.locator("#confirm").fill(STUDENT_PASSWORD)
            student.locator("form:has(#code) button[type=submit]").click()
            student.wait_for_url(server.url + "/")
            expect(student.locator("h1")).to_contain_text("Бакыт Осмонов")

            # 4. He signs in to the demo portal app: already signed in at the provider,
            #    he only approves the app's access once.
            student.goto(demo_portal.url + "/")
            student.locator("#signin").click()
            student.locator("button[name='approve'], #signed-in").first.wait_for(state="visible")
            if student.url.startswith(server.url):
                student.locator("button[name='approve']").click()
            student.wait_for_url(demo_portal.url + "/")
            expect(student.locator("#signed-in")).to_be_visible()
            expect(student.locator("#user-name")).to_have_text("Бакыт Осмонов")
            student.screenshot(path=str(tmp_path / "student-in-demo-app.png"), full_page=True)
            assert server_errors == []
        finally:
            browser.close()

    with server.services.db.transaction() as session:
        user = session.scalar(select(User).where(User.login == student_login))
        assert user is not None
        assert server.services.passwords.verify(user.password_hash, STUDENT_PASSWORD)
        codes = session.scalars(select(ActivationCode).where(ActivationCode.user_id == user.id)).all()
        assert len(codes) == 1 and codes[0].used_at is not None and codes[0].created_by == f"user:{teacher.id}"
