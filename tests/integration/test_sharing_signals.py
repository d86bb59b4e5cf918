"""Account-sharing signals (policy 5.2.1): sign-ins over HTTP from browsers that differ
in User-Agent and client address raise flags for the security officer — too many
sessions at once, sessions from places far apart at once, many devices in a short
time — once per kind until reviewed; ordinary use raises none. The console lists them
(awaiting review first, in words, Asia/Bishkek time) and marks them reviewed with a
note; nobody without ``audit:read`` sees or reviews them.

The signing-in servers here trust one proxy, so ``X-Forwarded-For`` names the client
address; they share the test database and Redis with the shared server, where the
security officer uses the console."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from datetime import UTC
from zoneinfo import ZoneInfo

import pytest
from babel.dates import format_date, format_time
from sqlalchemy import func, select

from idp.access.models import Restriction, SharingFlag
from idp.accounts.models import User
from idp.app import create_app
from idp.audit.models import AuditEvent
from idp.sessions.registry import SessionInfo
from idp.sessions.signals import after_sign_in
from tests.conftest import LiveServer, free_port, make_settings
from tests.helpers import Browser, form_fields

BISHKEK = ZoneInfo("Asia/Bishkek")
NETWORKS = {
    "school": ["10.0.0.0/8"],
    "lab": ["10.20.0.0/16"],  # the computer lab, inside the school network
    "library": ["192.168.50.0/24"],  # the town library, elsewhere
}
SCHOOL_IP = "10.1.2.3"
LAB_IP = "10.20.7.7"
LIBRARY_IP = "192.168.50.7"
HOME_IP = "203.0.113.7"
UA = {
    "chrome-windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                      "Chrome/120.0.0.0 Safari/537.36",
    "firefox-linux": "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "safari-iphone": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
                     "Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "chrome-android": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                      "Chrome/120.0.6099.144 Mobile Safari/537.36",
    "safari-mac": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
                  "Version/17.1 Safari/605.1.15",
}
LAPTOP = UA["chrome-windows"]
PHONE = UA["chrome-android"]
# The proxied server's thresholds (small, so a few sign-ins show each signal).
MAX_SESSIONS = 2
MAX_DEVICES = 3


def _start(database_url: str, redis_url: str, **overrides: object) -> LiveServer:
    port = free_port()
    settings = make_settings(database_url, redis_url, f"http://127.0.0.1:{port}", trusted_proxies=1,
                             networks=NETWORKS, **overrides)
    live = LiveServer(create_app(settings), port)
    live.start()
    return live


def _stop(live: LiveServer) -> None:
    live.stop()
    live.services.db.remove()
    live.services.db.dispose()
    live.services.redis.close()


@pytest.fixture(scope="module")
def proxied(server: LiveServer, database_url: str, redis_url: str) -> Iterator[LiveServer]:
    live = _start(database_url, redis_url, sharing_max_sessions=MAX_SESSIONS, sharing_max_devices=MAX_DEVICES)
    yield live
    _stop(live)


@pytest.fixture(scope="module")
def short_windows(server: LiveServer, database_url: str, redis_url: str) -> Iterator[LiveServer]:
    """Windows of a few seconds, so that "long ago" is a short sleep away (long enough
    that the sign-ins meant to fall inside one do so on a loaded machine)."""
    live = _start(database_url, redis_url, sharing_concurrent_window_seconds=2, sharing_device_window_seconds=4,
                  sharing_max_devices=2)
    yield live
    _stop(live)


# --- helpers -----------------------------------------------------------------------------------
def device(live: LiveServer, ip: str, user_agent: str = LAPTOP) -> Browser:
    """A browser on a device (User-Agent) at a place (client address)."""
    browser = Browser(live.url)
    browser.http.headers.update({"X-Forwarded-For": ip, "User-Agent": user_agent, "Accept-Language": "en"})
    return browser


def signed_in(live: LiveServer, user, ip: str, user_agent: str = LAPTOP) -> Browser:  # type: ignore[no-untyped-def]
    browser = device(live, ip, user_agent)
    response = browser.sign_in(user.login, user.password)
    assert response.status_code == 303, response.text[:2000]
    assert browser.get("/").status_code == 200
    return browser


def sign_out(browser: Browser) -> None:
    page = browser.get("/")
    assert browser.submit(page, "/logout").status_code == 200
    assert browser.get("/").status_code == 302


def flags(live: LiveServer, user_id: int) -> list[SharingFlag]:
    with live.services.db.transaction() as session:
        rows = list(session.scalars(select(SharingFlag).where(SharingFlag.user_id == user_id)
                                    .order_by(SharingFlag.id)))
        for row in rows:
            session.expunge(row)
        return rows


def journal(live: LiveServer, action: str, user_id: int) -> list[AuditEvent]:
    with live.services.db.transaction() as session:
        rows = list(session.scalars(select(AuditEvent).where(
            AuditEvent.action == action, AuditEvent.subject == f"user:{user_id}").order_by(AuditEvent.seq)))
        for row in rows:
            session.expunge(row)
        return rows


def officer(server: LiveServer, make_user, roles: tuple[str, ...] = ("security_officer",)):  # type: ignore[no-untyped-def]
    user = make_user(roles=roles, display_name="Officer " + secrets.token_hex(2))
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    assert browser.sign_in(user.login, user.password).status_code == 303
    return user, browser


def review(browser: Browser, flag_id: int, note: str):  # type: ignore[no-untyped-def]
    page = browser.get(f"/admin/sharing/{flag_id}")
    assert page.status_code == 200
    return browser.submit(page, f"/admin/sharing/{flag_id}", note=note)


def bishkek_time(moment) -> str:  # type: ignore[no-untyped-def]
    local = moment.replace(tzinfo=UTC).astimezone(BISHKEK)
    return f"{format_date(local.date(), 'medium', locale='en')} {format_time(local, 'short', tzinfo=BISHKEK, locale='en')}"


# --- ordinary use ------------------------------------------------------------------------------
def test_one_person_on_own_devices_at_one_place_raises_nothing(proxied, make_user):
    user = make_user()
    # The same laptop at school, signing in and out through the day.
    for _ in range(MAX_DEVICES + 3):
        sign_out(signed_in(proxied, user, SCHOOL_IP))
    # Laptop and phone at school at once (up to the session threshold).
    signed_in(proxied, user, SCHOOL_IP, LAPTOP)
    signed_in(proxied, user, LAB_IP, PHONE)  # the lab is inside the school network
    assert flags(proxied, user.id) == []
    assert journal(proxied, "account:sharing:flag", user.id) == []


# --- too many sessions -------------------------------------------------------------------------
def test_more_sessions_at_once_than_allowed_are_flagged(proxied, make_user):
    user = make_user()
    for _ in range(MAX_SESSIONS):
        signed_in(proxied, user, SCHOOL_IP)
    assert flags(proxied, user.id) == []
    signed_in(proxied, user, SCHOOL_IP)
    [flag] = flags(proxied, user.id)
    assert flag.kind == "too-many-sessions" and flag.reviewed_at is None
    assert flag.details["sessions"] == MAX_SESSIONS + 1
    assert flag.details["limit"] == MAX_SESSIONS and flag.details["limit_from"] == "settings"
    assert [p["ip"] for p in flag.details["places"]] == [SCHOOL_IP] * (MAX_SESSIONS + 1)
    [event] = journal(proxied, "account:sharing:flag", user.id)
    assert event.actor == "system" and event.reason == "too-many-sessions"
    assert event.details["flag"] == flag.id and event.details["kind"] == "too-many-sessions"
    assert event.ip == SCHOOL_IP


def test_a_kind_is_not_raised_again_until_the_flag_is_reviewed(server, proxied, make_user):
    user = make_user()
    for _ in range(MAX_SESSIONS + 2):
        signed_in(proxied, user, SCHOOL_IP)
    [first] = flags(proxied, user.id)
    assert len(journal(proxied, "account:sharing:flag", user.id)) == 1
    _officer, console = officer(server, make_user)
    assert review(console, first.id, "Spoke to the pupil: a sibling used the account.").status_code == 303
    signed_in(proxied, user, SCHOOL_IP)
    again = flags(proxied, user.id)
    assert [f.kind for f in again] == ["too-many-sessions", "too-many-sessions"]
    assert again[0].reviewed_at is not None and again[1].reviewed_at is None
    assert len(journal(proxied, "account:sharing:flag", user.id)) == 2


def test_a_restrictions_session_limit_takes_the_place_of_the_setting(server, make_user):
    # Sign-ins never exceed a restriction's limit (they are refused or end the oldest),
    # so this checks the rule itself: with a restriction, its limit is the threshold.
    user = make_user()
    svc = server.services
    with svc.db.transaction() as session:
        session.add(Restriction(user_id=user.id, max_sessions=1, at_session_limit="end_oldest"))
    now = time.time()
    sessions = [
        SessionInfo(key=f"k{i}", sid=f"s{i}", auth_time=int(now) - i, last_seen=now, amr=["pwd"],
                    ip=SCHOOL_IP, device="Chrome 120, Windows 10", network="school")
        for i in range(2)
    ]
    with svc.db.transaction() as session:
        account = session.get(User, user.id)
        raised = after_sign_in(session, svc.redis, svc.settings, account, sessions, new_sid="s0", now=now)
        assert [(f.kind, f.details["limit"], f.details["limit_from"]) for f in raised] == [
            ("too-many-sessions", 1, "restriction")
        ]
    [event] = journal(server, "account:sharing:flag", user.id)
    assert event.actor == "system" and event.details["limit_from"] == "restriction"


# --- places far apart ---------------------------------------------------------------------------
@pytest.mark.parametrize(("first_ip", "second_ip", "reason"), [
    (SCHOOL_IP, HOME_IP, "inside-and-outside"),
    (SCHOOL_IP, LIBRARY_IP, "different-networks"),
    ("198.51.100.7", HOME_IP, "different-prefixes"),
    ("2001:db8:1::7", "2001:db9:1::7", "different-prefixes"),
    # One place: the lab is inside the school network; one provider's /16 at home.
    (SCHOOL_IP, LAB_IP, None),
    (HOME_IP, "203.0.200.9", None),
    ("2001:db8:1::7", "2001:db8:ffff::9", None),
])
def test_sessions_at_once_from_places_far_apart_are_flagged(proxied, make_user, first_ip, second_ip, reason):
    user = make_user()
    signed_in(proxied, user, first_ip, LAPTOP)
    signed_in(proxied, user, second_ip, LAPTOP)
    found = flags(proxied, user.id)
    if reason is None:
        assert found == []
        return
    [flag] = found
    assert flag.kind == "distant-networks" and flag.details["reason"] == reason
    assert {p["ip"] for p in flag.details["sessions"]} == {first_ip, second_ip}
    assert flag.details["window_seconds"] == 900
    [event] = journal(proxied, "account:sharing:flag", user.id)
    assert event.actor == "system" and event.details["kind"] == "distant-networks"


def test_a_session_last_seen_before_the_window_does_not_count(short_windows, make_user):
    user = make_user()
    signed_in(short_windows, user, "198.51.100.7")
    time.sleep(2.5)  # longer than the 2 s window: that session is not "at once" any more
    signed_in(short_windows, user, HOME_IP)
    assert flags(short_windows, user.id) == []
    # A third place right after the second is within the window of the second.
    signed_in(short_windows, user, SCHOOL_IP)
    [flag] = flags(short_windows, user.id)
    assert flag.kind == "distant-networks"
    assert {p["ip"] for p in flag.details["sessions"]} == {HOME_IP, SCHOOL_IP}


# --- many devices ------------------------------------------------------------------------------
def test_many_devices_in_a_short_time_are_flagged(proxied, make_user):
    user = make_user()
    agents = list(UA.values())
    for agent in agents[:MAX_DEVICES]:
        sign_out(signed_in(proxied, user, SCHOOL_IP, agent))
    assert flags(proxied, user.id) == []
    sign_out(signed_in(proxied, user, SCHOOL_IP, agents[MAX_DEVICES]))
    [flag] = flags(proxied, user.id)
    assert flag.kind == "many-devices"
    assert flag.details["count"] == MAX_DEVICES + 1 == len(set(flag.details["devices"]))
    assert flag.details["limit"] == MAX_DEVICES and flag.details["window_seconds"] == 86400
    # The labels are the ones "My sessions" shows: a browser and a system each.
    assert any("Firefox" in d for d in flag.details["devices"])
    assert any("Android" in d for d in flag.details["devices"])
    # Yet another device while the flag awaits review: still one flag.
    sign_out(signed_in(proxied, user, SCHOOL_IP, agents[MAX_DEVICES + 1]))
    assert [f.kind for f in flags(proxied, user.id)] == ["many-devices"]
    assert len(journal(proxied, "account:sharing:flag", user.id)) == 1


def test_devices_seen_before_the_window_are_forgotten(short_windows, make_user):
    user = make_user()
    sign_out(signed_in(short_windows, user, SCHOOL_IP, UA["firefox-linux"]))
    firefox_seen = time.monotonic()
    time.sleep(2.0)
    sign_out(signed_in(short_windows, user, SCHOOL_IP, UA["chrome-windows"]))
    # Firefox is now older than the 4 s device window; Chrome (seen 2 s after it) is not.
    time.sleep(max(0.0, firefox_seen + 4.2 - time.monotonic()))
    sign_out(signed_in(short_windows, user, SCHOOL_IP, UA["safari-iphone"]))
    assert flags(short_windows, user.id) == []  # two devices within the window: at the limit
    sign_out(signed_in(short_windows, user, SCHOOL_IP, UA["chrome-android"]))
    [flag] = flags(short_windows, user.id)
    assert flag.kind == "many-devices" and flag.details["count"] == 3
    assert not any("Firefox" in d for d in flag.details["devices"])
    assert any("Chrome 120" in d for d in flag.details["devices"])


# --- the console -------------------------------------------------------------------------------
def _rows(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr class="sharing-flag (awaiting|reviewed)" data-flag="(\d+)">', page)


def test_console_lists_signals_awaiting_review_first_in_words(server, proxied, make_user):
    shared = make_user(display_name="Aibek Shared")
    travelling = make_user(display_name="Nurlan Travelling")
    signed_in(proxied, travelling, SCHOOL_IP)
    signed_in(proxied, travelling, HOME_IP)
    # Flagged after the other one, then reviewed: it is newer, yet listed after it.
    for _ in range(MAX_SESSIONS + 1):
        signed_in(proxied, shared, SCHOOL_IP)
    [too_many] = flags(proxied, shared.id)
    [distant] = flags(proxied, travelling.id)
    _officer, console = officer(server, make_user)
    assert review(console, too_many.id, "Checked with the class teacher.").status_code == 303

    page = console.get("/admin/sharing")
    assert page.status_code == 200
    rows = _rows(page.text)
    states = [state for state, _id in rows]
    assert states == sorted(states)  # every "awaiting" row before every "reviewed" one
    assert ("awaiting", str(distant.id)) in rows
    if ("reviewed", str(too_many.id)) in rows:  # on this page unless many others await review
        assert rows.index(("awaiting", str(distant.id))) < rows.index(("reviewed", str(too_many.id)))
    row = page.text.split(f'data-flag="{distant.id}">', 1)[1].split("</tr>", 1)[0]
    assert f'href="/admin/accounts/{travelling.id}"' in row and "Nurlan Travelling" in row
    assert "Sessions from places far apart" in row
    assert "one in a school network and one from outside" in row
    assert f"address {HOME_IP}" in row and f"address {SCHOOL_IP}" in row
    assert "network “school”" in row and "outside the school networks" in row
    assert bishkek_time(distant.created_at) in row
    assert "Awaiting review" in row

    # The reviewed one says who reviewed it, with the note (on its own page as well).
    shown = console.get(f"/admin/sharing/{too_many.id}")
    assert "Too many sessions at once" in shown.text
    assert f"{MAX_SESSIONS + 1} sessions were signed in at once" in shown.text
    assert f"Reviewed by {_officer.login}" in shown.text
    assert "Checked with the class teacher." in shown.text
    assert 'action="/admin/sharing/' not in shown.text  # nothing left to review


def test_review_needs_a_note_and_the_form_token_and_is_journalled(server, proxied, make_user):
    user = make_user()
    signed_in(proxied, user, SCHOOL_IP)
    signed_in(proxied, user, HOME_IP)
    [flag] = flags(proxied, user.id)
    reviewer, console = officer(server, make_user)
    page = console.get(f"/admin/sharing/{flag.id}")
    action, fields = form_fields(page.text, f"/admin/sharing/{flag.id}")

    empty = console.post(action, data={**fields, "note": "   "})
    assert empty.status_code == 400 and "the note is kept in the audit journal" in empty.text
    forged = console.post(action, data={"note": "no token"})
    assert forged.status_code == 400
    too_long = console.post(action, data={**fields, "note": "x" * 1001})
    assert too_long.status_code == 400 and "At most 1000 characters." in too_long.text
    assert flags(proxied, user.id)[0].reviewed_at is None

    done = console.post(action, data={**fields, "note": "Mother's phone at home; confirmed with the pupil."})
    assert done.status_code == 303 and done.headers["Location"].endswith("/admin/sharing")
    assert "The signal was marked reviewed." in console.get("/admin/sharing").text
    [reviewed] = flags(proxied, user.id)
    assert reviewed.reviewed_at is not None and reviewed.reviewed_by == f"user:{reviewer.id}"
    assert reviewed.review_note == "Mother's phone at home; confirmed with the pupil."
    [event] = journal(proxied, "account:sharing:review", user.id)
    assert event.actor == f"user:{reviewer.id}"
    assert event.reason == "Mother's phone at home; confirmed with the pupil."
    assert event.details == {"flag": flag.id, "kind": "distant-networks"}

    again = console.post(action, data={**fields, "note": "Second opinion."})
    assert again.status_code == 409 and "This signal was already reviewed." in again.text
    assert flags(proxied, user.id)[0].review_note == "Mother's phone at home; confirmed with the pupil."
    assert len(journal(proxied, "account:sharing:review", user.id)) == 1
    assert console.get("/admin/sharing/999999999").status_code == 404


def test_account_page_and_dashboard_show_the_signals(server, proxied, make_user):
    user = make_user()
    quiet = make_user()
    signed_in(proxied, user, SCHOOL_IP)
    signed_in(proxied, user, LIBRARY_IP)
    [flag] = flags(proxied, user.id)
    _officer, console = officer(server, make_user)
    page = console.get(f"/admin/accounts/{user.id}")
    assert page.status_code == 200
    section = page.text.split('id="sharing"', 1)[1].split("<h2", 1)[0]
    assert f'href="/admin/sharing/{flag.id}"' in section
    assert "Sessions from places far apart" in section and "in different school networks" in section
    assert "Awaiting review" in section
    quiet_page = console.get(f"/admin/accounts/{quiet.id}").text
    assert "No sharing signals for this account." in quiet_page

    with server.services.db.transaction() as session:
        awaiting = session.scalar(select(func.count(SharingFlag.id)).where(SharingFlag.reviewed_at.is_(None)))
    assert awaiting and awaiting >= 1
    dashboard = console.get("/admin/")
    assert f'<td id="sharing-awaiting">{awaiting}</td>' in dashboard.text
    assert 'href="/admin/sharing"' in dashboard.text


@pytest.mark.parametrize("roles", [("tech_support",), ("school_admin",), ("student",)])
def test_roles_without_audit_read_neither_see_nor_review_signals(server, proxied, make_user, roles):
    user = make_user()
    signed_in(proxied, user, SCHOOL_IP)
    signed_in(proxied, user, HOME_IP)
    [flag] = flags(proxied, user.id)
    _someone, browser = officer(server, make_user, roles)
    assert browser.get("/admin/sharing").status_code == 403
    assert browser.get(f"/admin/sharing/{flag.id}").status_code == 403
    token = form_fields(browser.get("/").text, "/logout")[1]["csrf_token"]
    refused = browser.post(f"/admin/sharing/{flag.id}", data={"csrf_token": token, "note": "Not mine to review."})
    assert refused.status_code == 403
    assert flags(proxied, user.id)[0].reviewed_at is None
    assert journal(proxied, "account:sharing:review", user.id) == []
    if roles != ("student",):  # they may open the console, without the sharing signals
        assert 'href="/admin/sharing"' not in browser.get("/admin/").text
    if roles == ("tech_support",):  # reads accounts, not their sharing signals
        account = browser.get(f"/admin/accounts/{user.id}")
        assert account.status_code == 200 and 'id="sharing"' not in account.text
