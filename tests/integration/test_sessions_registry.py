"""The session registry end to end (issue 5; ASVS 7.2.x, 7.3.1/7.3.2, 7.4.x, 7.5.2;
NIST 800-63B-4 N24/N25; policy 5.2.1): each sign-in records where it comes from; "My
sessions" lists the account's browsers and ends one or all others; support ends one
with a reason; every end — by the person, by support, by timeout — signs the browser
out, fails its refresh token, makes introspection and userinfo refuse its access token
and queues back-channel logout; a second provider process (a real ``darbaza serve``)
sharing the database and Redis refuses an ended session at once; and 20 parallel
sign-ins never hold more sessions than the account's limit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import delete, select

from idp.access.models import Restriction
from idp.audit.models import AuditEvent
from idp.breach.new_device import SEEN_TTL, seen_key
from idp.oidc.models import AccessToken, BackchannelLogoutDelivery, RefreshToken
from idp.sessions.records import DEADLINES, apps_key, deadline
from tests.conftest import TEST_SECRET_KEY, LiveServer, free_port, wait_healthy
from tests.helpers import Browser, ClientInfo, UserInfo, form_fields

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
SAFARI_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Mobile/15E148 Safari/604.1"
)
FIREFOX_UBUNTU = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
REPO = Path(__file__).resolve().parents[2]


# --- helpers -------------------------------------------------------------------------------
def browser_as(base_url: str, user_agent: str) -> Browser:
    browser = Browser(base_url)
    browser.http.headers["User-Agent"] = user_agent
    browser.http.headers["Accept-Language"] = "en"
    return browser


def signed_in_browser(server: LiveServer, person: UserInfo, user_agent: str = CHROME_WINDOWS) -> Browser:
    browser = browser_as(server.url, user_agent)
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303 and response.headers["Location"] == "/", response.text[:300]
    return browser


def session_key_of(browser: Browser) -> str:
    token = browser.http.cookies.get("darbaza")
    assert token, "the browser holds no session cookie"
    return "sess:" + hashlib.sha256(token.encode()).hexdigest()


def session_data(server: LiveServer, browser: Browser) -> dict[str, Any] | None:
    raw = server.services.redis.get(session_key_of(browser))
    return json.loads(raw) if raw else None


def rewrite_session(server: LiveServer, browser: Browser, **changes: Any) -> None:
    """Change a stored session the way time would (its clocks in the past), with its
    deadline in the sweep's set as the provider writes it."""
    key = session_key_of(browser)
    redis = server.services.redis
    data = json.loads(redis.get(key))
    data.update(changes)
    redis.set(key, json.dumps(data), keepttl=True)
    settings = server.services.settings
    ends, _kind = deadline(data, idle_default=settings.session_idle_timeout,
                           absolute_default=settings.session_absolute_timeout, now=time.time())
    redis.zadd(DEADLINES, {f"{data['uid']}:{data['sid']}": ends})


def is_signed_in(browser: Browser) -> bool:
    response = browser.get("/")
    if response.status_code == 200:
        return True
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    return False


def app_client(make_client: Any, **kwargs: Any) -> ClientInfo:
    return make_client(trusted=True, grant_types=["authorization_code", "refresh_token"],
                       scopes=["openid", "profile", "offline_access"], **kwargs)


def tokens_via(browser: Browser, client: ClientInfo, person: UserInfo, token_base: str | None = None) -> dict[str, Any]:
    """The portal app's sign-in through ``browser`` (already signed in or not); the
    token response from ``token_base`` (default: the browser's provider)."""
    params, verifier, response = browser.authorize(client, person, scope="openid profile offline_access")
    assert "code" in params, response.text[:500]
    answer = requests.post(
        (token_base or browser.base) + "/token",
        data={"grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
              "code_verifier": verifier},
        auth=(client.client_id, client.client_secret or ""),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def refresh(base: str, client: ClientInfo, refresh_token: str) -> requests.Response:
    return requests.post(base + "/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                         auth=(client.client_id, client.client_secret or ""), timeout=30)


def introspect(base: str, client: ClientInfo, token: str) -> dict[str, Any]:
    answer = requests.post(base + "/introspect", data={"token": token},
                           auth=(client.client_id, client.client_secret or ""), timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def userinfo_status(base: str, access_token: str) -> int:
    return requests.get(base + "/userinfo", headers={"Authorization": f"Bearer {access_token}"}, timeout=30).status_code


def events(server: LiveServer, user_id: int, action: str) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(
            select(AuditEvent).where(AuditEvent.subject == f"user:{user_id}", AuditEvent.action == action)
            .order_by(AuditEvent.seq)
        ))
        for row in rows:
            session.expunge(row)
        return rows


def deliveries(server: LiveServer, sid: str) -> list[str]:
    with server.services.db.transaction() as session:
        return list(session.scalars(select(BackchannelLogoutDelivery.client_id)
                                    .where(BackchannelLogoutDelivery.sid == sid)))


def live_tokens(server: LiveServer, sid: str) -> int:
    with server.services.db.transaction() as session:
        return sum(
            len(session.scalars(select(model.id if model is RefreshToken else model.jti)
                                .where(model.sid == sid, model.revoked_at.is_(None))).all())
            for model in (RefreshToken, AccessToken)
        )


def end_session_form(page: requests.Response, sid: str) -> dict[str, str]:
    """The "End this session" form of the session ``sid`` on My sessions."""
    import re

    for match in re.finditer(r'<li class="session[^"]*" data-sid="([^"]+)">(.*?)</li>', page.text, re.S):
        if match.group(1) == sid:
            token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"',
                              match.group(2))
            assert token, match.group(2)
            return {"csrf_token": token.group(1) or token.group(2), "sid": sid}
    raise AssertionError(f"no session {sid} on the page")


def listed_sids(page: requests.Response) -> list[str]:
    import re

    return re.findall(r'<li class="session[^"]*" data-sid="([^"]+)">', page.text)


def this_device_sids(page: requests.Response) -> list[str]:
    import re

    return re.findall(r'<li class="session this-device" data-sid="([^"]+)">', page.text)


def add_restriction(server: LiveServer, user_id: int, **fields: Any) -> int:
    with server.services.db.transaction() as session:
        row = Restriction(user_id=user_id, description="test", created_by="test", **fields)
        session.add(row)
        session.flush()
        return int(row.id)


def drop_restriction(server: LiveServer, restriction_id: int) -> None:
    with server.services.db.transaction() as session:
        session.execute(delete(Restriction).where(Restriction.id == restriction_id))


# --- what a sign-in records ----------------------------------------------------------------
def test_a_sign_in_records_device_place_times_methods_and_its_own_timeouts(server, make_user):
    person = make_user()
    before = time.time()
    browser = signed_in_browser(server, person, CHROME_WINDOWS)
    data = session_data(server, browser)
    assert data is not None and data["uid"] == person.id
    assert data["ip"] == "127.0.0.1"
    assert "ua" not in data  # the raw User-Agent is not kept, only the device label
    assert data["device"] == "Chrome 126, Windows 10"
    # The default named network holds loopback (IDP_NETWORKS: {"school": [127.0.0.0/8, ::1]}).
    assert data["network"] == "school"
    # Timeouts equal to the settings' defaults are not stored (the readers fall back to
    # them), nor flask-login's "_id"/"_fresh" or the acr (derived from amr): bytes per
    # session in Redis (docs/capacity.md).
    assert "idle_timeout" not in data and "absolute_timeout" not in data
    assert not {"_id", "_fresh", "acr"} & set(data)
    assert isinstance(data["last_seen"], int)
    raw = server.services.redis.get(session_key_of(browser))
    assert b'", "' not in raw and b'": ' not in raw  # compact JSON
    # The devices known for the new-device notice are forgotten 400 days after the last
    # sign-in (no key of an account lives for ever).
    assert SEEN_TTL - 60 <= server.services.redis.ttl(seen_key(person.id)) <= SEEN_TTL == 400 * 86400
    assert data["amr"] == ["pwd"]
    assert before - 1 <= data["auth_time"] <= time.time() and before - 1 <= data["last_seen"] <= time.time() + 1
    # The registry lists the same, and the sweep knows when the session times out.
    [info] = server.services.sessions.list(person.id)
    assert (info.sid, info.device, info.network, info.ip) == (data["sid"], data["device"], "school", "127.0.0.1")
    assert info.idle_timeout == server.services.settings.session_idle_timeout
    assert info.absolute_timeout == server.services.settings.session_absolute_timeout
    score = server.services.redis.zscore(DEADLINES, f"{person.id}:{data['sid']}")
    assert score is not None and abs(score - (data["last_seen"] + info.idle_timeout)) < 2


def test_a_restriction_gives_the_session_its_own_timeouts(server, make_user):
    person = make_user()
    rid = add_restriction(server, person.id, idle_timeout_seconds=600, absolute_timeout_seconds=1800)
    try:
        data = session_data(server, signed_in_browser(server, person))
        assert data is not None and (data["idle_timeout"], data["absolute_timeout"]) == (600, 1800)
        ttl = server.services.redis.ttl(session_key_of(signed_in_browser(server, person)))
        assert 0 < ttl <= 600
    finally:
        drop_restriction(server, rid)


def test_the_apps_used_from_a_session_are_listed(server, make_user, make_client):
    person = make_user()
    client = app_client(make_client, name="E-journal")
    browser = signed_in_browser(server, person)
    tokens_via(browser, client, person)
    [info] = server.services.sessions.list(person.id)
    assert info.apps == [client.client_id]
    page = browser.get("/account/sessions")
    assert page.status_code == 200 and "E-journal" in page.text
    # A note of the format before issue 8 (a plain set) is read, and added to, all the same.
    sid = info.sid
    assert sid is not None
    other = app_client(make_client, name="Library")
    redis = server.services.redis
    redis.delete(apps_key(sid))
    redis.sadd(apps_key(sid), client.client_id)
    tokens_via(browser, other, person)
    assert redis.type(apps_key(sid)) == b"set"
    [info] = server.services.sessions.list(person.id)
    assert info.apps == sorted([client.client_id, other.client_id])


def test_the_apps_note_goes_with_the_session_after_its_logouts_are_queued(server, make_user, make_client):
    """An app that only got a code (no token in the database to find it by) is known from
    ``sid-apps:{sid}`` alone: it is still told at sign-out, and the note is deleted then."""
    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    browser = signed_in_browser(server, person)
    params, _verifier, response = browser.authorize(client, person, scope="openid profile offline_access")
    assert "code" in params, response.text[:500]
    sid = session_data(server, browser)["sid"]  # type: ignore[index]
    redis = server.services.redis
    assert {a.decode() for a in redis.zrange(apps_key(sid), 0, -1)} == {client.client_id}
    assert live_tokens(server, sid) == 0
    page = browser.get("/")
    assert browser.submit(page, "/logout").status_code == 200
    assert deliveries(server, sid) == [client.client_id]
    assert not redis.exists(apps_key(sid))


# --- My sessions ---------------------------------------------------------------------------
def test_my_sessions_lists_both_browsers_and_marks_this_device(server, make_user):
    person = make_user()
    laptop = signed_in_browser(server, person, CHROME_WINDOWS)
    phone = signed_in_browser(server, person, SAFARI_IPHONE)
    laptop_sid = session_data(server, laptop)["sid"]  # type: ignore[index]
    phone_sid = session_data(server, phone)["sid"]  # type: ignore[index]
    account = laptop.get("/")
    assert 'href="/account/sessions"' in account.text
    page = laptop.get("/account/sessions")
    assert page.status_code == 200
    assert sorted(listed_sids(page)) == sorted([laptop_sid, phone_sid])
    assert this_device_sids(page) == [laptop_sid]
    assert "Chrome 126, Windows 10" in page.text and "Mobile Safari 17, iOS 17.5, iPhone" in page.text
    assert "School network" in page.text and "127.0.0.1" in page.text and "password" in page.text
    # The other browser sees the same two, with itself marked.
    assert this_device_sids(phone.get("/account/sessions")) == [phone_sid]
    # Signed out: no list.
    anonymous = browser_as(server.url, CHROME_WINDOWS).get("/account/sessions")
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]


def test_ending_the_other_session_signs_it_out_and_ends_its_tokens(server, make_user, make_client):
    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    laptop = signed_in_browser(server, person, CHROME_WINDOWS)
    phone = signed_in_browser(server, person, SAFARI_IPHONE)
    tokens = tokens_via(phone, client, person)
    phone_sid = session_data(server, phone)["sid"]  # type: ignore[index]
    assert introspect(server.url, client, tokens["access_token"])["active"] is True
    assert userinfo_status(server.url, tokens["access_token"]) == 200

    page = laptop.get("/account/sessions")
    done = laptop.post("/account/sessions/end", data=end_session_form(page, phone_sid))
    assert done.status_code == 303 and done.headers["Location"] == "/account/sessions"
    after = laptop.get("/account/sessions")
    assert "was ended" in after.text and listed_sids(after) == this_device_sids(after)

    # The phone is signed out: its cookie leads to the sign-in page (ASVS 7.4.1) ...
    assert not is_signed_in(phone)
    # ... its refresh token fails, its access token is refused (deny by the token rows) ...
    refused = refresh(server.url, client, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert introspect(server.url, client, tokens["access_token"]) == {"active": False}
    assert userinfo_status(server.url, tokens["access_token"]) == 401
    assert live_tokens(server, phone_sid) == 0
    # ... and the app used there is told (back-channel logout queued for the worker).
    assert deliveries(server, phone_sid) == [client.client_id]
    # The laptop goes on.
    assert is_signed_in(laptop)
    [event] = events(server, person.id, "account:session:end")
    assert event.details["sid"] == phone_sid and event.reason == "ended-by-user"
    assert event.actor == f"user:{person.id}"


def test_sign_out_ends_the_session_the_same_way(server, make_user, make_client):
    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    browser = signed_in_browser(server, person)
    tokens = tokens_via(browser, client, person)
    sid = session_data(server, browser)["sid"]  # type: ignore[index]
    page = browser.get("/")
    assert browser.submit(page, "/logout").status_code == 200
    assert server.services.sessions.list(person.id) == []
    assert refresh(server.url, client, tokens["refresh_token"]).json()["error"] == "invalid_grant"
    assert introspect(server.url, client, tokens["access_token"]) == {"active": False}
    assert deliveries(server, sid) == [client.client_id]


def test_ending_needs_a_recent_authentication(server, make_user):
    person = make_user()
    laptop = signed_in_browser(server, person)
    phone = signed_in_browser(server, person, SAFARI_IPHONE)
    phone_sid = session_data(server, phone)["sid"]  # type: ignore[index]
    page = laptop.get("/account/sessions")
    form = end_session_form(page, phone_sid)
    # ASVS 7.5.2: the last authentication is older than reauth_max_age_seconds.
    rewrite_session(server, laptop, authenticated_at=time.time() - 3600)
    asked = laptop.post("/account/sessions/end", data=form)
    assert asked.status_code == 303 and asked.headers["Location"].startswith("/login/reauth")
    assert is_signed_in(phone)
    again = laptop.post("/account/sessions/end-others", data={"csrf_token": form["csrf_token"]})
    assert again.status_code == 303 and again.headers["Location"].startswith("/login/reauth")
    assert is_signed_in(phone)
    # After confirming with the password the same click works.
    reauth = laptop.get(asked.headers["Location"])
    back = laptop.submit(reauth, "/login/reauth", password=person.password)
    assert back.status_code == 303 and back.headers["Location"] == "/account/sessions"
    page = laptop.get("/account/sessions")
    assert laptop.post("/account/sessions/end", data=end_session_form(page, phone_sid)).status_code == 303
    assert not is_signed_in(phone)


def test_end_all_other_sessions_keeps_only_this_one(server, make_user, make_client):
    person = make_user()
    client = app_client(make_client)
    laptop = signed_in_browser(server, person, CHROME_WINDOWS)
    others = [signed_in_browser(server, person, ua) for ua in (SAFARI_IPHONE, FIREFOX_UBUNTU)]
    other_tokens = tokens_via(others[0], client, person)
    own_tokens = tokens_via(laptop, client, person)
    page = laptop.get("/account/sessions")
    assert len(listed_sids(page)) == 3
    done = laptop.submit(page, "/account/sessions/end-others")
    assert done.status_code == 303
    assert [is_signed_in(b) for b in others] == [False, False]
    assert is_signed_in(laptop)
    assert len(server.services.sessions.list(person.id)) == 1
    assert refresh(server.url, client, other_tokens["refresh_token"]).status_code == 400
    # This device's own app tokens go on.
    assert refresh(server.url, client, own_tokens["refresh_token"]).status_code == 200
    [event] = events(server, person.id, "account:sessions:end")
    assert event.details["sessions_ended"] == 2


def test_a_session_of_another_account_cannot_be_ended(server, make_user):
    mallory, victim = make_user(), make_user()
    attacker = signed_in_browser(server, mallory)
    target = signed_in_browser(server, victim)
    victim_sid = session_data(server, target)["sid"]  # type: ignore[index]
    _action, fields = form_fields(attacker.get("/").text, "/logout")
    answer = attacker.post("/account/sessions/end", data={"csrf_token": fields["csrf_token"], "sid": victim_sid})
    assert answer.status_code == 303
    assert is_signed_in(target)
    assert "already ended" in attacker.get("/account/sessions").text


def test_an_ended_session_is_not_brought_back_by_its_own_request_in_flight(server, make_user):
    """The write-back of a request that read the session before it was ended elsewhere
    must not recreate it (the store writes a signed-in session only if it still exists)."""
    person = make_user()
    browser = signed_in_browser(server, person)
    key = session_key_of(browser)
    data = session_data(server, browser)
    app = server.app
    cookie = browser.http.cookies.get("darbaza")
    with app.test_request_context("/", headers={"Cookie": f"darbaza={cookie}"}):
        from flask import request

        interface = app.session_interface
        in_flight = interface.open_session(app, request)
        assert in_flight.get("sid") == data["sid"]  # type: ignore[index]
        in_flight["last_seen"] = time.time()  # the request changes the session ...
        svc = server.services
        with svc.db.transaction() as db:  # ... while it is ended elsewhere
            assert svc.sessions.end(db, person.id, data["sid"], reason="test", actor="test")  # type: ignore[index]
        response = app.response_class()
        interface.save_session(app, in_flight, response)
    assert server.services.redis.get(key) is None
    assert not is_signed_in(browser)


# --- the console -----------------------------------------------------------------------------
def console_browser(server: LiveServer, make_user: Any, role: str) -> Browser:
    staff = make_user(roles=(role,))
    browser = browser_as(server.url, FIREFOX_UBUNTU)
    assert browser.sign_in(staff.login, staff.password).status_code == 303
    return browser


def test_support_sees_the_sessions_and_ends_one_with_a_reason(server, make_user, make_client):
    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    laptop = signed_in_browser(server, person, CHROME_WINDOWS)
    phone = signed_in_browser(server, person, SAFARI_IPHONE)
    tokens = tokens_via(phone, client, person)
    phone_sid = session_data(server, phone)["sid"]  # type: ignore[index]
    support = console_browser(server, make_user, "tech_support")
    page = support.get(f"/admin/accounts/{person.id}")
    assert page.status_code == 200
    assert "Chrome 126, Windows 10" in page.text and "Mobile Safari 17, iOS 17.5, iPhone" in page.text
    end_url = f"/admin/accounts/{person.id}/sessions/{phone_sid}/end"
    assert end_url in page.text
    confirm = support.get(end_url)
    assert confirm.status_code == 200
    # A reason is required.
    missing = support.submit(confirm, end_url, confirm_login=person.login, reason="")
    assert missing.status_code == 400 and is_signed_in(phone)
    done = support.submit(confirm, end_url, confirm_login=person.login, reason="Phone reported stolen")
    assert done.status_code == 303 and done.headers["Location"] == f"/admin/accounts/{person.id}"
    assert not is_signed_in(phone) and is_signed_in(laptop)
    assert refresh(server.url, client, tokens["refresh_token"]).status_code == 400
    assert deliveries(server, phone_sid) == [client.client_id]
    [event] = events(server, person.id, "account:session:end")
    assert event.reason == "Phone reported stolen" and event.details["sid"] == phone_sid
    assert event.actor.startswith("user:") and event.actor != f"user:{person.id}"
    # The same link again: the session is gone.
    again = support.get(end_url)
    assert again.status_code == 303


def test_ending_a_session_in_the_console_needs_the_permission(server, make_user):
    person = make_user()
    phone = signed_in_browser(server, person, SAFARI_IPHONE)
    phone_sid = session_data(server, phone)["sid"]  # type: ignore[index]
    admin = console_browser(server, make_user, "school_admin")  # reads accounts, may not end sessions
    page = admin.get(f"/admin/accounts/{person.id}")
    assert page.status_code == 200 and "Mobile Safari 17" in page.text
    assert f"/sessions/{phone_sid}/end" not in page.text
    end_url = f"/admin/accounts/{person.id}/sessions/{phone_sid}/end"
    assert admin.get(end_url).status_code == 403
    csrf = admin.get("/admin/accounts").text.split('name="csrf_token" value="')[-1].split('"')[0]
    assert admin.post(end_url, data={"csrf_token": csrf, "confirm_login": person.login,
                                     "reason": "x"}).status_code == 403
    assert is_signed_in(phone)


def test_the_console_end_all_uses_the_registry(server, make_user, make_client):
    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    phone = signed_in_browser(server, person, SAFARI_IPHONE)
    tokens_via(phone, client, person)
    sid = session_data(server, phone)["sid"]  # type: ignore[index]
    support = console_browser(server, make_user, "tech_support")
    url = f"/admin/accounts/{person.id}/sessions/end"
    done = support.submit(support.get(url), url, confirm_login=person.login, reason="asked by the parent")
    assert done.status_code == 303
    assert not is_signed_in(phone)
    assert deliveries(server, sid) == [client.client_id]


# --- timeouts --------------------------------------------------------------------------------
def sweep(server: LiveServer) -> int:
    svc = server.services
    with svc.db.transaction() as db:
        return svc.sessions.sweep_expired(db, journal=svc.journal)


def test_the_idle_timeout_of_the_session_itself_is_enforced(server, make_user, make_client):
    """N24 / ASVS 7.3.1: the session's own idle timeout (here 30 s, far below the
    default hour) ends it at the next request and at the next refresh; the sweep then
    revokes its tokens and tells its apps."""
    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    browser = signed_in_browser(server, person)
    tokens = tokens_via(browser, client, person)
    sid = session_data(server, browser)["sid"]  # type: ignore[index]
    rewrite_session(server, browser, idle_timeout=30, last_seen=time.time() - 20)
    assert is_signed_in(browser)  # 20 s idle of 30: still fine (and the idle clock restarts)
    rewrite_session(server, browser, idle_timeout=30, last_seen=time.time() - 31)
    answer = refresh(server.url, client, tokens["refresh_token"])
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
    assert "inactivity" in answer.json()["error_description"]
    assert not is_signed_in(browser)
    # The refresh already revoked the session's tokens; the sweep tells the app and journals.
    assert introspect(server.url, client, tokens["access_token"]) == {"active": False}
    assert sweep(server) >= 1
    assert deliveries(server, sid) == [client.client_id]
    [event] = events(server, person.id, "account:session:expire")
    assert event.details["sid"] == sid and event.actor == "system"
    assert server.services.redis.zscore(DEADLINES, f"{person.id}:{sid}") is None


def test_the_absolute_timeout_of_the_session_itself_is_enforced(server, make_user, make_client):
    """ASVS 7.3.2: however active, the session ends at its own absolute lifetime."""
    person = make_user()
    client = app_client(make_client)
    browser = signed_in_browser(server, person)
    tokens = tokens_via(browser, client, person)
    now = time.time()
    # Active a second ago, but signed in two minutes ago with a one-minute lifetime.
    rewrite_session(server, browser, absolute_timeout=60, auth_time=int(now - 120), authenticated_at=now - 120,
                    last_seen=now - 1)
    answer = refresh(server.url, client, tokens["refresh_token"])
    assert answer.status_code == 400 and "maximum lifetime" in answer.json()["error_description"]
    assert not is_signed_in(browser)


def test_a_timed_out_session_is_ended_by_the_sweep_alone(server, make_user, make_client):
    """No request, no refresh: the worker's sweep finds the deadline and ends the
    session the normal way (tokens revoked, apps told, journal)."""
    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    browser = signed_in_browser(server, person)
    tokens = tokens_via(browser, client, person)
    sid = session_data(server, browser)["sid"]  # type: ignore[index]
    assert sweep(server) == 0 or server.services.sessions.get(person.id, sid) is not None
    svc = server.services
    # The session timed out a minute ago (its key expired in Redis as well).
    svc.redis.delete(session_key_of(browser))
    svc.redis.zadd(DEADLINES, {f"{person.id}:{sid}": time.time() - 60})
    assert introspect(server.url, client, tokens["access_token"])["active"] is True
    assert sweep(server) >= 1
    assert introspect(server.url, client, tokens["access_token"]) == {"active": False}
    assert live_tokens(server, sid) == 0
    assert deliveries(server, sid) == [client.client_id]
    assert not svc.redis.exists(apps_key(sid))  # gone with the session
    assert events(server, person.id, "account:session:expire")[0].details["sid"] == sid


def test_a_refresh_is_activity_that_restarts_the_idle_clock(server, make_user, make_client):
    """A person working in a portal app is using the session: the app's refresh restarts
    the idle clock (as in Keycloak), never the absolute one."""
    person = make_user()
    client = app_client(make_client)
    browser = signed_in_browser(server, person)
    tokens = tokens_via(browser, client, person)
    signed_in_at = time.time() - 700
    rewrite_session(server, browser, last_seen=time.time() - 600, authenticated_at=signed_in_at)
    assert refresh(server.url, client, tokens["refresh_token"]).status_code == 200
    data = session_data(server, browser)
    assert data is not None and time.time() - data["last_seen"] < 5
    assert server.services.redis.ttl(session_key_of(browser)) > server.services.settings.session_idle_timeout - 10
    assert data["authenticated_at"] == signed_in_at  # the absolute clock goes on


def test_activity_moves_the_deadline_and_the_sweep_leaves_a_used_session_alone(server, make_user):
    person = make_user()
    browser = signed_in_browser(server, person)
    sid = session_data(server, browser)["sid"]  # type: ignore[index]
    # The deadline in the set is stale (the session was used since): moved, not ended.
    server.services.redis.zadd(DEADLINES, {f"{person.id}:{sid}": time.time() - 5})
    sweep(server)
    assert is_signed_in(browser)
    assert server.services.redis.zscore(DEADLINES, f"{person.id}:{sid}") > time.time()


def provider_env(server: LiveServer, database_url: str, redis_url: str) -> dict[str, str]:
    """The environment of another provider process (server or worker) of this test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDP_")}
    env.update({
        "IDP_ISSUER": server.url,
        "IDP_DATABASE_URL": database_url,
        "IDP_REDIS_URL": redis_url,
        "IDP_SECRET_KEY": TEST_SECRET_KEY,
        "IDP_ARGON2_TIME_COST": "1",
        "IDP_ARGON2_MEMORY_COST": "8192",
        "IDP_ARGON2_PARALLELISM": "1",
        "IDP_TESTING": "1",
        "IDP_LOGIN_IP_FREE_FAILURES": "1000000",
        "IDP_MAIL_TRANSPORT": "null",
    })
    return env


def old_format_index(server: LiveServer, user_id: int, *browsers: Browser) -> str:
    """The account's index as it was written before issue 8: a plain set of session keys."""
    redis = server.services.redis
    index = f"usess:{user_id}"
    redis.delete(index)
    redis.sadd(index, *[session_key_of(b) for b in browsers])
    redis.expire(index, 3600)
    return index


def test_an_index_of_the_old_format_is_read_and_converted(server, make_user):
    """``usess:{uid}`` is a sorted set of sids since issue 8; sessions signed in before a
    deploy (a plain set of session keys) are listed, counted, swept and ended all the same."""
    person = make_user()
    laptop = signed_in_browser(server, person, CHROME_WINDOWS)
    phone = signed_in_browser(server, person, SAFARI_IPHONE)
    redis = server.services.redis
    laptop_sid, phone_sid = session_data(server, laptop)["sid"], session_data(server, phone)["sid"]  # type: ignore[index]
    index = f"usess:{person.id}"
    assert redis.type(index) == b"zset" and {s.decode() for s in redis.zrange(index, 0, -1)} == {laptop_sid, phone_sid}
    # Listed (My sessions): read and converted, expiry kept.
    old_format_index(server, person.id, laptop, phone)
    assert {i.sid for i in server.services.sessions.list(person.id)} == {laptop_sid, phone_sid}
    assert redis.type(index) == b"zset" and redis.zcard(index) == 2 and 0 < redis.ttl(index) <= 3600
    # Swept: the timed-out phone leaves the converted index.
    rewrite_session(server, phone, last_seen=time.time() - 4000)
    old_format_index(server, person.id, laptop, phone)
    assert sweep(server) >= 1 and not is_signed_in(phone)
    assert [s.decode() for s in redis.zrange(index, 0, -1)] == [laptop_sid]
    # A request of the laptop writes its session (seen again after two minutes) back
    # into an old-format index ...
    rewrite_session(server, laptop, last_seen=int(time.time()) - 120)
    old_format_index(server, person.id, laptop)
    assert is_signed_in(laptop)
    assert redis.type(index) == b"zset" and [s.decode() for s in redis.zrange(index, 0, -1)] == [laptop_sid]
    assert time.time() - session_data(server, laptop)["last_seen"] < 5  # type: ignore[index]
    # ... and a sign-in counts the sessions of an old-format index (limit 1: refused).
    old_format_index(server, person.id, laptop)
    restriction = add_restriction(server, person.id, max_sessions=1, at_session_limit="refuse")
    try:
        refused = browser_as(server.url, FIREFOX_UBUNTU).sign_in(person.login, person.password)
        assert refused.status_code == 403
    finally:
        drop_restriction(server, restriction)
    assert [i.sid for i in server.services.sessions.list(person.id)] == [laptop_sid]
    assert redis.type(index) == b"zset"


def test_the_worker_sweeps_timed_out_sessions(server, make_user, make_client, database_url, redis_url):
    """``darbaza worker`` queues the sweep (once a minute) and its job ends the session
    that timed out with nobody using it."""
    from idp.worker import SWEEP_SCHEDULE_KEY

    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    browser = signed_in_browser(server, person)
    tokens = tokens_via(browser, client, person)
    sid = session_data(server, browser)["sid"]  # type: ignore[index]
    redis = server.services.redis
    redis.delete(session_key_of(browser))
    redis.zadd(DEADLINES, {f"{person.id}:{sid}": time.time() - 1})
    redis.delete(SWEEP_SCHEDULE_KEY)
    darbaza = Path(sys.executable).with_name("darbaza")
    done = subprocess.run(  # noqa: S603 - fixed argv
        [str(darbaza), "worker", "--burst"], cwd=REPO, env=provider_env(server, database_url, redis_url),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert introspect(server.url, client, tokens["access_token"]) == {"active": False}
    assert live_tokens(server, sid) == 0
    assert events(server, person.id, "account:session:expire")[0].details["sid"] == sid
    with server.services.db.transaction() as session:
        assert session.scalars(select(BackchannelLogoutDelivery).where(BackchannelLogoutDelivery.sid == sid)).all()


# --- two server processes ---------------------------------------------------------------------
@pytest.fixture
def second_process(server: LiveServer, database_url: str, redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A second provider process: ``darbaza serve`` (gunicorn) on another loopback port,
    with the same database, Redis, keys and issuer (as behind one load balancer)."""
    port = free_port()
    env = provider_env(server, database_url, redis_url)
    darbaza = Path(sys.executable).with_name("darbaza")
    log = (tmp_path / "second.log").open("w")
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [str(darbaza), "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], (tmp_path / "second.log").read_text, "the second process")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def test_a_session_ended_in_one_process_is_refused_by_the_other_at_once(server, make_user, make_client,
                                                                        second_process):
    person = make_user()
    client = app_client(make_client)
    # The phone signs in and gets its app's tokens through the second process ...
    phone = browser_as(second_process, SAFARI_IPHONE)
    assert phone.sign_in(person.login, person.password).status_code == 303
    tokens = tokens_via(phone, client, person)
    assert phone.get("/").status_code == 200
    first = refresh(second_process, client, tokens["refresh_token"])
    assert first.status_code == 200, first.text
    tokens = first.json()
    phone_sid = session_data(server, phone)["sid"]  # type: ignore[index]
    # ... and the laptop ends it through the first.
    laptop = signed_in_browser(server, person, CHROME_WINDOWS)
    page = laptop.get("/account/sessions")
    assert phone_sid in listed_sids(page)
    assert laptop.post("/account/sessions/end", data=end_session_form(page, phone_sid)).status_code == 303
    # At once, in the second process: the cookie, the refresh token, the access token.
    assert phone.get("/").status_code == 302
    refused = refresh(second_process, client, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert introspect(second_process, client, tokens["access_token"]) == {"active": False}
    assert userinfo_status(second_process, tokens["access_token"]) == 401


# --- the concurrent-session limit -----------------------------------------------------------------
def parallel_sign_ins(server: LiveServer, person: UserInfo, count: int) -> list[requests.Response]:
    def one(i: int) -> requests.Response:
        browser = browser_as(server.url, f"{FIREFOX_UBUNTU} run/{i}")
        return browser.sign_in(person.login, person.password)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_twenty_parallel_sign_ins_never_hold_more_sessions_than_the_limit(server, make_user):
    person = make_user()
    rid = add_restriction(server, person.id, max_sessions=3, at_session_limit="refuse")
    try:
        answers = parallel_sign_ins(server, person, 20)
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [303] * 3 + [403] * 17, statuses
        assert len(server.services.sessions.list(person.id)) == 3
        refusal = next(a for a in answers if a.status_code == 403)
        assert "at most 3 devices" in refusal.text and "technical support" in refusal.text
        assert person.login not in refusal.text
        refused = events(server, person.id, "account:login:refused")
        assert len(refused) == 17 and {e.reason for e in refused} == {"session-limit"}
    finally:
        drop_restriction(server, rid)


def test_at_the_limit_end_oldest_ends_the_oldest_session_the_normal_way(server, make_user, make_client):
    person = make_user()
    client = app_client(make_client, backchannel_logout_uri="http://127.0.0.1:9/backchannel")
    rid = add_restriction(server, person.id, max_sessions=2, at_session_limit="end_oldest")
    try:
        oldest = signed_in_browser(server, person, CHROME_WINDOWS)
        tokens = tokens_via(oldest, client, person)
        oldest_sid = session_data(server, oldest)["sid"]  # type: ignore[index]
        time.sleep(1.1)  # auth_time has whole seconds
        middle = signed_in_browser(server, person, SAFARI_IPHONE)
        time.sleep(1.1)
        newest = signed_in_browser(server, person, FIREFOX_UBUNTU)
        assert [is_signed_in(b) for b in (oldest, middle, newest)] == [False, True, True]
        assert refresh(server.url, client, tokens["refresh_token"]).status_code == 400
        assert deliveries(server, oldest_sid) == [client.client_id]
        [event] = events(server, person.id, "account:session:end")
        assert event.reason == "session-limit" and event.details["sid"] == oldest_sid

        # Under 20 parallel sign-ins as well: never more than the limit.
        answers = parallel_sign_ins(server, person, 20)
        assert all(a.status_code == 303 for a in answers), sorted(a.status_code for a in answers)
        assert len(server.services.sessions.list(person.id)) == 2
    finally:
        drop_restriction(server, rid)


def test_the_limit_counts_only_live_sessions(server, make_user):
    person = make_user()
    rid = add_restriction(server, person.id, max_sessions=1, at_session_limit="refuse")
    try:
        first = signed_in_browser(server, person)
        refused = browser_as(server.url, SAFARI_IPHONE).sign_in(person.login, person.password)
        assert refused.status_code == 403
        page = first.get("/")
        assert first.submit(page, "/logout").status_code == 200
        # Signed out there: a new sign-in fits again, and the same browser signing in
        # again replaces its own session rather than adding one.
        phone = signed_in_browser(server, person, SAFARI_IPHONE)
        assert phone.sign_in(person.login, person.password).status_code == 303
        assert len(server.services.sessions.list(person.id)) == 1
    finally:
        drop_restriction(server, rid)


def test_a_browser_signing_in_again_replaces_its_own_session(server, make_user, make_client):
    person = make_user()
    client = app_client(make_client)
    browser = signed_in_browser(server, person)
    tokens = tokens_via(browser, client, person)
    first_sid = session_data(server, browser)["sid"]  # type: ignore[index]
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303
    second_sid = session_data(server, browser)["sid"]  # type: ignore[index]
    assert second_sid != first_sid
    assert [s.sid for s in server.services.sessions.list(person.id)] == [second_sid]
    # The replaced session's tokens ended with it.
    assert refresh(server.url, client, tokens["refresh_token"]).status_code == 400
