"""The who-has-access report (policy 3): per active app, the roles allowed, the personal
data it receives and the accounts that may use it; CSV export safe for spreadsheets."""

from __future__ import annotations

import csv
import io
import re
import secrets

import pytest
import requests
from sqlalchemy import func, select

from idp.access.roles import create_role
from idp.accounts.models import User
from idp.audit.models import AuditEvent
from idp.oidc.models import Client
from tests.helpers import Browser


def console(server, make_user, *roles: str) -> Browser:
    user = make_user(roles=roles)
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    assert browser.sign_in(user.login, user.password).status_code in (302, 303)
    return browser


def limit_client(server, client_id: str, *, allowed_roles: list[str] | None = None, name: str | None = None,
                 active: bool = True) -> None:
    with server.services.db.transaction() as session:
        client = session.scalar(select(Client).where(Client.client_id == client_id))
        client.allowed_roles = allowed_roles or []
        client.active = active
        if name is not None:
            client.name = name


def new_role(server) -> str:
    name = "club_" + secrets.token_hex(3)
    with server.services.db.transaction() as session:
        create_role(session, name=name, description="", permissions=set())
    return name


def report_row(page: requests.Response, client_id: str) -> str:
    match = re.search(rf'<tr id="app-{re.escape(client_id)}">(.*?)</tr>', page.text, re.S)
    assert match, f"{client_id} not in the report"
    return match.group(1)


def csv_rows(response: requests.Response) -> list[list[str]]:
    assert response.content.startswith(b"\xef\xbb\xbf"), response.content[:20]
    return list(csv.reader(io.StringIO(response.content.decode("utf-8-sig"))))


@pytest.fixture
def officer(server, make_user) -> Browser:
    return console(server, make_user, "security_officer")


def test_report_shows_roles_personal_data_and_accounts_per_app(server, officer, make_user, make_client):
    club = new_role(server)
    members = [make_user(roles=(club,), display_name=f"Member {i}") for i in range(2)]
    outsider = make_user(roles=("student",), display_name="Not a member")
    limited = make_client(name="Club app", scopes=["openid", "email"])
    limit_client(server, limited.client_id, allowed_roles=[club])
    open_app = make_client(name="Open app", scopes=["openid", "profile"])

    page = officer.get("/admin/reports/access")
    assert page.status_code == 200

    row = report_row(page, limited.client_id)
    assert club in row and "everyone" not in row
    assert "email" in row and "sub" in row and "groups" not in row
    assert '<span class="count">2</span>' in row
    for member in members:
        assert member.login in row
    assert outsider.login not in row

    row = report_row(page, open_app.client_id)
    assert "everyone" in row and "groups" in row
    with server.services.db.transaction() as session:
        active_accounts = session.scalar(select(func.count(User.id)).where(User.active.is_(True)))
    assert f'<span class="count">{active_accounts}</span>' in row
    assert outsider.login in row


def test_switched_off_apps_are_not_in_the_report(server, officer, make_client):
    client = make_client(name="Retired app")
    limit_client(server, client.client_id, active=False)
    page = officer.get("/admin/reports/access")
    assert f'id="app-{client.client_id}"' not in page.text
    assert client.client_id not in officer.get("/admin/reports/access.csv").content.decode("utf-8-sig")


def test_csv_has_one_row_per_app_and_account(server, officer, make_user, make_client):
    club = new_role(server)
    first = make_user(roles=(club, "teacher"), display_name="Айбек Асанов")
    second = make_user(roles=(club,), display_name="Second Member")
    client = make_client(name="Кружок", scopes=["openid", "profile"])
    limit_client(server, client.client_id, allowed_roles=[club])

    response = officer.get("/admin/reports/access.csv")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    assert "charset=utf-8" in response.headers["Content-Type"]
    assert response.headers["Content-Disposition"].startswith("attachment")
    assert "no-store" in response.headers["Cache-Control"]
    rows = csv_rows(response)
    assert len(rows[0]) == 6
    mine = sorted((r for r in rows[1:] if r[1] == client.client_id), key=lambda r: r[2])
    assert [r[2] for r in mine] == sorted([first.login, second.login])
    by_login = {r[2]: r for r in mine}
    assert by_login[first.login][0] == "Кружок"
    assert by_login[first.login][3] == "Айбек Асанов"
    assert by_login[first.login][4].split() == sorted([club, "teacher"])
    assert "name" in by_login[first.login][5].split() and "sub" in by_login[first.login][5].split()

    # Who took the export is journaled.
    with server.services.db.transaction() as session:
        exports = session.scalar(select(func.count(AuditEvent.id)).where(AuditEvent.action == "report:access:export"))
    assert exports >= 1


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@"])
def test_csv_cells_that_look_like_formulas_are_quoted(server, officer, make_user, make_client, prefix):
    club = new_role(server)
    user = make_user(roles=(club,), display_name=prefix + "HYPERLINK(\"http://evil.example\",\"x\")")
    client = make_client(name=prefix + "cmd|' /C calc'!A0")
    limit_client(server, client.client_id, allowed_roles=[club])

    rows = csv_rows(officer.get("/admin/reports/access.csv"))
    (row,) = [r for r in rows if r[1] == client.client_id]
    assert row[0] == "'" + prefix + "cmd|' /C calc'!A0"
    assert row[2] == user.login
    assert row[3] == "'" + prefix + "HYPERLINK(\"http://evil.example\",\"x\")"
    # Ordinary cells are left alone.
    assert row[1] == client.client_id


def test_report_permissions(server, make_user):
    for role, expected in (("teacher", 403), ("tech_support", 403), ("security_officer", 200), ("school_admin", 200)):
        browser = console(server, make_user, role)
        for url in ("/admin/reports/access", "/admin/reports/access.csv"):
            assert browser.get(url).status_code == expected, (role, url)
    assert Browser(server.url).get("/admin/reports/access.csv").status_code == 302
