"""The audit journal console: who may read it, filters and paging, times in
Asia/Bishkek, CSV and JSON exports, the chain check, and bad filter values."""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, text

from admin_ui.audit import school_midnight_utc
from idp.audit.models import AuditEvent
from tests.helpers import Browser, form_fields

BISHKEK = ZoneInfo("Asia/Bishkek")


def sign_in_as(browser, make_user, *roles: str):  # type: ignore[no-untyped-def]
    user = make_user(roles=roles, display_name="Officer " + secrets.token_hex(2))
    browser.sign_in(user.login, user.password)
    return user


def record(server, *, action: str, actor: str = "cli:test", subject: str | None = None,  # type: ignore[no-untyped-def]
           reason: str | None = None, count: int = 1) -> list[int]:
    """Journal rows written the only way rows are written (Journal.record)."""
    seqs = []
    with server.services.db.transaction() as session:
        for i in range(count):
            event = server.services.journal.record(session, actor=actor, action=action, subject=subject,
                                                   reason=reason, details={"i": i})
            seqs.append(event.seq)
    return seqs


def row_seqs(page_text: str) -> list[int]:
    body = page_text.split("<tbody>", 1)[1].split("</tbody>", 1)[0] if "<tbody>" in page_text else ""
    return [int(s) for s in re.findall(r"<tr>\s*<td>(\d+)</td>", body)]


def verify_verdict(page_text: str) -> tuple[str, str]:
    match = re.search(r'id="verify-result" data-ok="(\d)">(.*?)</p>', page_text, re.S)
    assert match, page_text[:3000]
    return match.group(1), match.group(2)


# --- who may read it ---------------------------------------------------------------------------
@pytest.mark.parametrize(("roles", "allowed"), [
    (("student",), False),
    (("tech_support",), False),
    (("school_admin",), False),
    (("security_officer",), True),
])
def test_permission_matrix(server, browser, make_user, roles, allowed):
    sign_in_as(browser, make_user, *roles)
    for path in ("/admin/audit", "/admin/audit/export.csv", "/admin/audit/export.json"):
        response = browser.get(path)
        assert response.status_code == (200 if allowed else 403), path
        assert "Traceback" not in response.text
    token = form_fields(browser.get("/").text, "/logout")[1]["csrf_token"]
    verify = browser.post("/admin/audit/verify", data={"csrf_token": token})
    assert verify.status_code == (200 if allowed else 403)
    if roles != ("student",):  # the others may open the dashboard
        assert ('href="/admin/audit"' in browser.get("/admin/").text) is allowed


def test_signed_out_visitors_go_to_sign_in(server, browser):
    for path in ("/admin/audit", "/admin/audit/export.csv", "/admin/audit/export.json"):
        response = browser.get(path)
        assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_verify_needs_the_form_token(server, browser, make_user):
    sign_in_as(browser, make_user, "security_officer")
    assert browser.post("/admin/audit/verify", data={}).status_code == 400


# --- the list ------------------------------------------------------------------------------------
def test_filters_names_and_bishkek_times(server, browser, make_user):
    person = make_user(display_name="Бактыгүл Осмонова")
    Browser(server.url).sign_in(person.login, person.password)  # journals account:login:success
    other = make_user()
    record(server, action="account:lock", actor=f"user:{other.id}", subject=f"user:{person.id}", reason="test")
    sign_in_as(browser, make_user, "security_officer")

    by_login = browser.get("/admin/audit", params={"actor": person.login})
    assert by_login.status_code == 200
    with server.services.db.transaction() as session:
        mine = list(session.scalars(select(AuditEvent).where(AuditEvent.actor == f"user:{person.id}").order_by(AuditEvent.seq)
                                    .order_by(AuditEvent.seq.desc())))
    assert mine and row_seqs(by_login.text) == [e.seq for e in mine]
    # The person is shown by name and login, not as "user:N".
    assert f'title="user:{person.id}"' in by_login.text and "Бактыгүл Осмонова" in by_login.text
    local = mine[0].occurred_at.replace(tzinfo=UTC).astimezone(BISHKEK).strftime("%Y-%m-%d %H:%M:%S")
    assert local in by_login.text

    about = browser.get("/admin/audit", params={"subject": f"user:{person.id}", "action": "account:lo"})
    actions = re.findall(r"<code>(account:[a-z:-]+)</code>", about.text)
    assert set(actions) == {"account:login:success", "account:lock"}
    only_lock = browser.get("/admin/audit", params={"subject": person.login, "action": "account:lock"})
    assert re.findall(r"<code>(account:[a-z:-]+)</code>", only_lock.text) == ["account:lock"]
    # "_" and "%" in the tag are literal, not wildcards.
    assert row_seqs(browser.get("/admin/audit", params={"action": "account_lo%"}).text) == []

    today = datetime.now(BISHKEK).date()
    assert row_seqs(browser.get("/admin/audit", params={"actor": person.login, "from": today.isoformat(),
                                                         "to": today.isoformat()}).text)
    assert row_seqs(browser.get("/admin/audit", params={"actor": person.login,
                                                         "from": (today + timedelta(days=1)).isoformat()}).text) == []
    assert row_seqs(browser.get("/admin/audit", params={"actor": person.login,
                                                         "to": (today - timedelta(days=1)).isoformat()}).text) == []


def test_days_are_bishkek_days():
    # 00:00 in Bishkek (UTC+6) is 18:00 UTC the evening before.
    assert school_midnight_utc(date(2024, 5, 1)) == datetime(2024, 4, 30, 18, 0)


def test_paging_is_newest_first_and_keeps_the_filters(server, browser, make_user):
    tag = f"test:paging:{secrets.token_hex(3)}"
    seqs = record(server, action=tag, count=55)
    sign_in_as(browser, make_user, "security_officer")
    first = browser.get("/admin/audit", params={"action": tag})
    assert row_seqs(first.text) == sorted(seqs, reverse=True)[:50]
    next_link = re.search(r'href="([^"]*)" rel="next"', first.text)
    assert next_link, first.text[-2000:]
    href = next_link.group(1).replace("&amp;", "&")
    assert "page=2" in href and f"action={tag}" in href.replace("%3A", ":")
    second = browser.get(href)
    assert row_seqs(second.text) == sorted(seqs, reverse=True)[50:]
    assert 'rel="prev"' in second.text and 'rel="next"' not in second.text
    # A page past the end shows the last page.
    assert row_seqs(browser.get("/admin/audit", params={"action": tag, "page": "99"}).text) == row_seqs(second.text)


@pytest.mark.parametrize(("params", "field"), [
    ({"from": "2024-13-01"}, "from"),
    ({"from": "yesterday"}, "from"),
    ({"to": "0001-01-01"}, "to"),
    ({"to": "2024-01-01T10:00"}, "to"),
    ({"from": "2024-05-02", "to": "2024-05-01"}, "to"),
    ({"actor": "x" * 5000}, "actor"),
    ({"subject": "user:\x001"}, "subject"),
    ({"action": "a" * 65}, "action"),
])
def test_bad_filters_are_form_messages(server, browser, make_user, params, field):
    sign_in_as(browser, make_user, "security_officer")
    response = browser.get("/admin/audit", params=params)
    assert response.status_code == 200
    assert f'id="e-{field}"' in response.text and 'aria-invalid="true"' in response.text
    assert "<tbody>" not in response.text
    export = browser.get("/admin/audit/export.csv", params=params)
    assert export.status_code == 303 and "/admin/audit?" in export.headers["Location"]


def test_odd_page_numbers_are_not_errors(server, browser, make_user):
    sign_in_as(browser, make_user, "security_officer")
    for page in ("abc", "-5", "0", "9" * 30):
        assert browser.get("/admin/audit", params={"page": page}).status_code == 200


# --- exports ---------------------------------------------------------------------------------------
def test_csv_export_is_filtered_bom_and_formula_safe(server, browser, make_user):
    tag = f"test:export:{secrets.token_hex(3)}"
    seqs = record(server, action=tag, actor="@attacker", subject="=HYPERLINK(\"http://x\")",
                  reason="+1 -1 =SUM(A1)", count=2)
    officer = sign_in_as(browser, make_user, "security_officer")
    response = browser.get("/admin/audit/export.csv", params={"action": tag})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in response.headers["Content-Disposition"]
    assert response.content.startswith("\ufeff".encode())
    rows = list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert [int(r["seq"]) for r in rows] == seqs  # chain order
    assert {"seq", "occurred_at", "actor", "subject", "action", "reason", "ip", "request_id", "details",
            "prev_hash", "hash"} <= set(rows[0])
    assert rows[0]["actor"] == "'@attacker"
    assert rows[0]["subject"] == "'=HYPERLINK(\"http://x\")"
    assert rows[0]["reason"] == "'+1 -1 =SUM(A1)"
    assert json.loads(rows[1]["details"]) == {"i": 1}
    with server.services.db.transaction() as session:
        stored = session.scalar(select(AuditEvent).where(AuditEvent.seq == seqs[0]).order_by(AuditEvent.seq))
        assert rows[0]["hash"] == stored.hash and rows[0]["prev_hash"] == stored.prev_hash
        # Reading the journal in bulk is journaled.
        exports = list(session.scalars(select(AuditEvent).where(
            AuditEvent.action == "audit:export", AuditEvent.actor == f"user:{officer.id}").order_by(AuditEvent.seq)))
    assert exports and exports[-1].details["filters"] == {"action": tag}


def test_json_export_has_every_field(server, browser, make_user):
    tag = f"test:json:{secrets.token_hex(3)}"
    seqs = record(server, action=tag, actor="cli:root", reason="Кыргызча себеп", count=3)
    sign_in_as(browser, make_user, "security_officer")
    response = browser.get("/admin/audit/export.json", params={"action": tag})
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    rows = response.json()
    assert [r["seq"] for r in rows] == seqs
    assert rows[0]["reason"] == "Кыргызча себеп" and rows[1]["prev_hash"] == rows[0]["hash"]
    assert set(rows[0]) >= {"seq", "occurred_at", "actor", "subject", "action", "reason", "ip",
                            "request_id", "details", "prev_hash", "hash"}
    assert response.headers["Cache-Control"] == "no-store"


# --- the chain check ---------------------------------------------------------------------------------
def test_verify_button_reports_intact_then_the_first_bad_row(server, browser, make_user):
    sign_in_as(browser, make_user, "security_officer")
    page = browser.get("/admin/audit")
    intact = browser.submit(page, "/admin/audit/verify")
    assert intact.status_code == 200
    ok, message = verify_verdict(intact.text)
    with server.services.db.transaction() as session:
        rows = session.scalar(select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(1))
    # Every row but the check's own journal entry, written after the verdict.
    assert ok == "1" and str(rows - 1) in message

    (target,) = record(server, action="test:verify:target", reason="original reason")
    with server.services.db.transaction() as session:
        session.execute(text("UPDATE audit_events SET reason = 'nothing happened' WHERE seq = :s"), {"s": target})
    try:
        broken = browser.submit(browser.get("/admin/audit"), "/admin/audit/verify")
        assert broken.status_code == 200
        ok, message = verify_verdict(broken.text)
        assert ok == "0" and str(target) in message
        assert "nothing happened" in broken.text  # the bad row is shown as stored
    finally:
        with server.services.db.transaction() as session:
            session.execute(text("UPDATE audit_events SET reason = 'original reason' WHERE seq = :s"), {"s": target})
    ok, _message = verify_verdict(browser.submit(browser.get("/admin/audit"), "/admin/audit/verify").text)
    assert ok == "1"
