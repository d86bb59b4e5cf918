"""The console dashboard: who may see it and what it counts."""

from __future__ import annotations


def test_dashboard_needs_sign_in_and_permission(server, browser, make_user):
    assert browser.get("/admin/").status_code == 302
    student = make_user(roles=("student",))
    browser.sign_in(student.login, student.password)
    denied = browser.get("/admin/")
    assert denied.status_code == 403 and "Traceback" not in denied.text


def test_dashboard_counts_sign_ins_and_locked_accounts(server, browser, make_user):
    from idp.accounts.models import User

    admin = make_user(roles=("school_admin",))
    locked = make_user(roles=("student",), display_name="Locked Student")
    with server.services.db.transaction() as session:
        session.get(User, locked.id).locked = True
    browser.sign_in(admin.login, admin.password)
    page = browser.get("/admin/")
    assert page.status_code == 200
    assert "Locked Student" in page.text
    assert "<svg" in page.text
