"""Restrictions at every door, through real requests (policy 5.1, 4.2.5; DESIGN
"Restrictions"): sign-in, authorization, token issue and every refresh, with the
provider's clock fixed and the client address set by a trusted proxy header; the
console's restriction area and "why can't this person sign in?"; ``darbaza access
explain``."""

from __future__ import annotations

import html
import json
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from click.testing import CliRunner
from flask_babel import force_locale
from sqlalchemy import select

from idp.access import decision as d
from idp.access.messages import reason_message
from idp.access.models import Restriction
from idp.access.roles import create_role
from idp.accounts.models import Role
from idp.app import create_app
from idp.audit.models import AuditEvent
from idp.cli import main as cli
from idp.clock import fixed, utc_now
from tests.conftest import LiveServer, free_port, make_settings
from tests.helpers import Browser, ClientInfo, UserInfo, callback_params, form_fields

BISHKEK = ZoneInfo("Asia/Bishkek")
NETWORKS = {"school": ["10.0.0.0/8", "fd00:5c::/32"], "lab": ["10.20.0.0/16"]}
INSIDE = "10.1.2.3"
OUTSIDE = "203.0.113.7"
# 2025-03-04 is a Tuesday.
TUESDAY, WEDNESDAY, SATURDAY = 4, 5, 8


def bishkek(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2025, 3, day, hour, minute, tzinfo=BISHKEK).astimezone(UTC)


@pytest.fixture(scope="module")
def gate(server: LiveServer, database_url: str, redis_url: str) -> Iterator[LiveServer]:
    """A provider behind one trusted proxy (the client address comes from
    X-Forwarded-For) with the school's networks; tests set its clock."""
    port = free_port()
    settings = make_settings(database_url, redis_url, f"http://127.0.0.1:{port}", trusted_proxies=1,
                             networks=NETWORKS, shared_networks=["lab"])
    live = LiveServer(create_app(settings), port)
    live.start()
    yield live
    live.stop()
    live.services.db.remove()
    live.services.db.dispose()
    live.services.redis.close()


@pytest.fixture
def clock(gate: LiveServer) -> Iterator[Any]:
    def set_to(moment: datetime) -> None:
        gate.services.clock = fixed(moment)

    yield set_to
    gate.services.clock = utc_now


def person(gate: LiveServer, ip: str | None = None, lang: str = "en") -> Browser:
    browser = Browser(gate.url)
    browser.http.headers["Accept-Language"] = lang
    if ip is not None:
        browser.http.headers["X-Forwarded-For"] = ip
    return browser


def restrict(gate: LiveServer, *, user: UserInfo | None = None, role: str | None = None, **fields: Any) -> int:
    with gate.services.db.transaction() as session:
        role_id = session.scalar(select(Role.id).where(Role.name == role)) if role else None
        row = Restriction(user_id=user.id if user else None, role_id=role_id, **fields)
        session.add(row)
        session.flush()
        return row.id


def unrestrict(gate: LiveServer, restriction_id: int) -> None:
    with gate.services.db.transaction() as session:
        session.delete(session.get(Restriction, restriction_id))


def events(gate: LiveServer, action: str, subject: str) -> list[AuditEvent]:
    with gate.services.db.transaction() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == action,
                                                             AuditEvent.subject == subject).order_by(AuditEvent.seq)))
        for row in rows:
            session.expunge(row)
        return rows


def reasons(page: requests.Response) -> dict[str, str]:
    return {code: html.unescape(text.strip()) for code, text in
            re.findall(r'<li class="reason" data-code="([^"]+)">(.*?)</li>', page.text, re.S)}


def token_request(gate: LiveServer, client: ClientInfo, data: dict[str, str], ip: str | None = None) -> requests.Response:
    headers = {"X-Forwarded-For": ip} if ip else {}
    if client.client_secret:
        return requests.post(gate.url + "/token", data=data, auth=(client.client_id, client.client_secret),
                             headers=headers, timeout=10)
    return requests.post(gate.url + "/token", data={**data, "client_id": client.client_id}, headers=headers,
                         timeout=10)


def exchange(gate: LiveServer, client: ClientInfo, params: dict[str, str], verifier: str,
             ip: str | None = None) -> requests.Response:
    assert "code" in params, params
    return token_request(gate, client, {"grant_type": "authorization_code", "code": params["code"],
                                        "redirect_uri": client.redirect_uri, "code_verifier": verifier}, ip)


def refresh(gate: LiveServer, client: ClientInfo, token: str, ip: str | None = None) -> requests.Response:
    return token_request(gate, client, {"grant_type": "refresh_token", "refresh_token": token}, ip)


def sign_in(gate: LiveServer, user: UserInfo, ip: str | None = None, lang: str = "en") -> requests.Response:
    """Sign in as ``user`` from ``ip``; a refusal is followed to the page that says why."""
    browser = person(gate, ip=ip, lang=lang)
    response = browser.sign_in(user.login, user.password)
    if response.status_code == 303 and response.headers["Location"].endswith("/login/refused"):
        return browser.get(response.headers["Location"])
    return response


def admitted(response: requests.Response) -> bool:
    return response.status_code == 303 and not response.headers["Location"].endswith("/login/refused")


def expected_message(gate: LiveServer, locale: str, code: str, **params: Any) -> str:
    with gate.app.test_request_context("/"), force_locale(locale):
        return reason_message(d.Reason(code, params))


# --- sign-in -----------------------------------------------------------------------------
def test_sign_in_outside_the_allowed_hours_is_refused_with_the_reason(gate, clock, make_user):
    student = make_user()
    rid = restrict(gate, user=student, hours_start="08:00", hours_end="18:00")

    clock(bishkek(TUESDAY, 7, 30))
    browser = person(gate)
    response = browser.sign_in(student.login, student.password)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/refused")
    page = browser.get("/login/refused")
    assert page.status_code == 403
    assert reasons(page) == {"outside-hours": "Your account can be used only from 08:00 to 18:00 (Bishkek time)."}
    # No session was made, and the page is shown once.
    assert browser.get("/").status_code == 302
    assert browser.get("/login/refused").status_code == 303
    (refused,) = events(gate, "account:login:refused", f"user:{student.id}")
    assert refused.reason == "access-denied"
    assert refused.details["codes"] == ["outside-hours"] and refused.details["restrictions"] == [rid]
    assert not events(gate, "account:login:success", f"user:{student.id}")

    clock(bishkek(TUESDAY, 8, 0))
    assert admitted(browser.sign_in(student.login, student.password))
    assert browser.get("/").status_code == 200


@pytest.mark.parametrize("lang", ["ky", "ru"])
def test_the_refusal_is_in_the_persons_language(gate, clock, make_user, lang):
    student = make_user()
    restrict(gate, user=student, allowed_weekdays=[0, 1, 2, 3, 4])
    clock(bishkek(SATURDAY, 11))
    page = sign_in(gate, student, lang=lang)
    assert page.status_code == 403 and f'lang="{lang}"' in page.text
    assert reasons(page) == {"outside-weekdays": expected_message(gate, lang, "outside-weekdays",
                                                                  weekdays=[0, 1, 2, 3, 4])}
    # Nothing in it names the account's restriction, role or anyone else.
    assert student.login not in page.text and "student" not in page.text.lower().split("<main")[1]


def test_network_rules_use_the_address_the_proxy_reports(gate, make_user):
    student = make_user()
    restrict(gate, user=student, allowed_networks=["school"])
    outside = sign_in(gate, student, ip=OUTSIDE)
    assert outside.status_code == 403
    assert reasons(outside) == {"network-not-allowed":
                                "Your account can be used only from these networks of the school: school."}
    assert "10.0.0.0" not in outside.text  # address blocks are not shown to people
    assert admitted(sign_in(gate, student, ip=INSIDE))
    # A lab nested in the school network is the school too; IPv6 named blocks count.
    assert admitted(sign_in(gate, student, ip="10.20.3.4"))
    assert admitted(sign_in(gate, student, ip="fd00:5c::42"))

    teacher_at_home = make_user()
    restrict(gate, user=teacher_at_home, allowed_networks=["2001:db8:77::/48"])
    assert admitted(sign_in(gate, teacher_at_home, ip="2001:db8:77::9"))
    assert sign_in(gate, teacher_at_home, ip="2001:db8:78::9").status_code == 403


def test_a_graduate_cannot_sign_in_after_the_last_day(gate, clock, make_user):
    graduate = make_user()
    restrict(gate, user=graduate, valid_until=datetime(2025, 3, 4, 18, 0))  # 5 March, 00:00 in Bishkek
    clock(bishkek(TUESDAY, 23, 59))
    assert admitted(sign_in(gate, graduate))
    clock(bishkek(WEDNESDAY, 0, 0))
    page = sign_in(gate, graduate)
    assert page.status_code == 403
    assert reasons(page) == {"expired": "Your account could be used until March 4, 2025."}


def test_a_passwordless_passkey_sign_in_is_refused_the_same_way(gate, clock, make_user):
    from tests.integration.test_passkeys import authenticator, passwordless, register

    student = make_user()
    restrict(gate, user=student, hours_start="08:00", hours_end="18:00")
    clock(bishkek(TUESDAY, 10))
    browser = person(gate)
    assert admitted(browser.sign_in(student.login, student.password))
    auth = authenticator(gate)
    assert register(browser, auth, "Phone").json()["ok"] is True

    clock(bishkek(TUESDAY, 20))
    other = person(gate)
    answer, _options, _assertion = passwordless(other, auth)
    assert answer.status_code == 200 and answer.json()["redirect"].endswith("/login/refused")
    page = other.get(answer.json()["redirect"])
    assert page.status_code == 403 and set(reasons(page)) == {"outside-hours"}
    assert other.get("/").status_code == 302
    refused = events(gate, "account:login:refused", f"user:{student.id}")[-1]
    assert refused.details["amr"] == ["hwk", "user", "mfa"] and refused.details["codes"] == ["outside-hours"]

    clock(bishkek(WEDNESDAY, 9))
    answer, _options, _assertion = passwordless(other, auth)
    assert answer.status_code == 200 and not answer.json()["redirect"].endswith("/login/refused")
    assert other.get("/").status_code == 200


def test_a_restriction_requiring_2fa_has_the_account_set_one_up(gate, make_user):
    student = make_user()
    restrict(gate, user=student, require_2fa=True)
    response = person(gate).sign_in(student.login, student.password)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/enrol-2fa")


def test_a_refused_sign_in_for_an_app_leads_back_to_the_app(gate, clock, make_user, make_client):
    student = make_user()
    client = make_client()
    restrict(gate, user=student, hours_start="08:00", hours_end="18:00")
    clock(bishkek(TUESDAY, 20))
    params, _verifier, page = person(gate).authorize(client, student, extra={"state": "st-1"})
    assert page.status_code == 403 and "outside-hours" in reasons(page)
    back = html.unescape(re.search(r'<a href="([^"]+)" id="back-to-app"', page.text).group(1))
    assert back.startswith(client.redirect_uri)
    got = callback_params(back)
    assert got["error"] == "access_denied" and got["state"] == "st-1" and got["iss"] == gate.services.settings.issuer


# --- authorization -----------------------------------------------------------------------
def test_authorization_outside_the_hours_is_refused_and_the_person_sees_why(gate, clock, make_user, make_client):
    student = make_user()
    client = make_client()
    restrict(gate, user=student, hours_start="08:00", hours_end="18:00")
    clock(bishkek(TUESDAY, 10))
    browser = person(gate)
    params, _verifier, _ = browser.authorize(client, student)
    assert "code" in params

    clock(bishkek(TUESDAY, 18, 30))
    params, _verifier, page = browser.authorize(client, student, extra={"state": "s-2"})
    assert params == {} and page.status_code == 403
    assert set(reasons(page)) == {"outside-hours"}
    back = html.unescape(re.search(r'<a href="([^"]+)" id="back-to-app"', page.text).group(1))
    got = callback_params(back)
    assert got["error"] == "access_denied" and got["state"] == "s-2"
    assert got["error_description"] == "This account may not use this app at this time (outside the allowed hours)."
    (refused,) = events(gate, "access:authorize:refused", f"user:{student.id}")
    assert refused.details["client_id"] == client.client_id and refused.details["codes"] == ["outside-hours"]

    # prompt=none may not show a page: the app gets access_denied at once.
    params, _verifier, response = browser.authorize(client, student, extra={"prompt": "none"})
    assert response.status_code == 302
    assert params["error"] == "access_denied" and params["iss"] == gate.services.settings.issuer
    assert "08:00" not in params["error_description"] and student.login not in params["error_description"]


def test_an_app_outside_the_accounts_list_is_refused(gate, make_user, make_client):
    student = make_user()
    library, journal = make_client(), make_client()
    restrict(gate, user=student, allowed_clients=[library.client_id])
    browser = person(gate)
    params, _verifier, _ = browser.authorize(library, student)
    assert "code" in params
    params, _verifier, page = browser.authorize(journal, student)
    assert page.status_code == 403 and set(reasons(page)) == {"app-not-allowed"}
    assert reasons(page)["app-not-allowed"] == "Your account may not use this portal app."


# --- token issue and refresh ----------------------------------------------------------------
def test_the_code_exchange_checks_the_hours_again(gate, clock, make_user, make_client):
    student = make_user()
    client = make_client()
    restrict(gate, user=student, hours_start="08:00", hours_end="18:00")
    clock(bishkek(TUESDAY, 17, 59))
    params, verifier, _ = person(gate).authorize(client, student)
    clock(bishkek(TUESDAY, 18, 0))
    response = exchange(gate, client, params, verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "allowed hours" in response.json()["error_description"]
    assert events(gate, "access:token:refused", f"user:{student.id}")


def test_a_refresh_outside_the_hours_fails_clearly_and_keeps_the_token(gate, clock, make_user, make_client):
    student = make_user()
    client = make_client()
    restrict(gate, user=student, hours_start="08:00", hours_end="18:00", allowed_weekdays=[0, 1, 2, 3, 4])
    clock(bishkek(TUESDAY, 10))
    params, verifier, _ = person(gate).authorize(client, student)
    tokens = exchange(gate, client, params, verifier).json()

    clock(bishkek(TUESDAY, 19))
    late = refresh(gate, client, tokens["refresh_token"])
    assert late.status_code == 400 and "no-store" in late.headers["Cache-Control"]
    assert late.json() == {"error": "invalid_grant", "error_description":
                           "This account may not use this app at this time (outside the allowed hours)."}
    clock(bishkek(SATURDAY, 10))
    weekend = refresh(gate, client, tokens["refresh_token"])
    assert weekend.json()["error_description"] == "This account may not use this app on this day."
    (first, _second) = events(gate, "access:refresh:refused", f"user:{student.id}")
    assert first.details["codes"] == ["outside-hours"] and first.details["token_kept"] is True

    # The refused refresh did not use the token up: the next morning it works (once).
    clock(bishkek(WEDNESDAY, 9))
    morning = refresh(gate, client, tokens["refresh_token"])
    assert morning.status_code == 200, morning.text
    assert refresh(gate, client, tokens["refresh_token"]).json()["error"] == "invalid_grant"  # rotated
    assert refresh(gate, client, morning.json()["refresh_token"]).status_code == 400  # reuse burnt the family


def test_a_refresh_refused_for_a_lasting_reason_ends_the_grant(gate, make_user, make_client):
    student = make_user()
    client, other = make_client(), make_client()
    params, verifier, _ = person(gate).authorize(client, student)
    tokens = exchange(gate, client, params, verifier).json()
    rid = restrict(gate, user=student, allowed_clients=[other.client_id])
    refused = refresh(gate, client, tokens["refresh_token"])
    assert refused.json() == {"error": "invalid_grant", "error_description": "This account may not use this app."}
    unrestrict(gate, rid)
    # Taking the restriction away does not bring the grant back: the app signs in again.
    assert refresh(gate, client, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_school_only_scopes_are_granted_inside_and_withheld_outside(gate, make_user, make_client):
    student = make_user()
    client = make_client(scopes=["openid", "profile", "school"])
    restrict(gate, user=student, school_only_scopes=["school"])

    params, verifier, _ = person(gate, ip=INSIDE).authorize(client, student, scope="openid profile school")
    inside = exchange(gate, client, params, verifier).json()
    assert set(inside["scope"].split()) == {"openid", "profile", "school"}

    params, verifier, _ = person(gate, ip=OUTSIDE).authorize(client, student, scope="openid profile school")
    outside = exchange(gate, client, params, verifier).json()
    assert set(outside["scope"].split()) == {"openid", "profile"}

    # A confidential app's server refreshes: the person is not seen, so "For official use"
    # access is not renewed (the rest of the grant goes on).
    renewed = refresh(gate, client, inside["refresh_token"])
    assert renewed.status_code == 200 and set(renewed.json()["scope"].split()) == {"openid", "profile"}


def test_a_public_app_refreshing_from_the_person_keeps_school_only_scopes_inside(gate, make_user, make_client):
    student = make_user()
    app = make_client(auth_method="none", scopes=["openid", "school"])
    restrict(gate, user=student, school_only_scopes=["school"])
    params, verifier, _ = person(gate, ip=INSIDE).authorize(app, student, scope="openid school")
    tokens = exchange(gate, app, params, verifier, ip=INSIDE).json()
    assert set(tokens["scope"].split()) == {"openid", "school"}
    at_school = refresh(gate, app, tokens["refresh_token"], ip=INSIDE).json()
    assert set(at_school["scope"].split()) == {"openid", "school"}
    at_home = refresh(gate, app, at_school["refresh_token"], ip=OUTSIDE).json()
    assert at_home["scope"] == "openid"


# --- the console ---------------------------------------------------------------------------
def console(gate: LiveServer, make_user, *roles: str) -> Browser:
    user = make_user(roles=roles)
    browser = person(gate)
    assert browser.sign_in(user.login, user.password).status_code in (302, 303)
    return browser


def post_form(browser: Browser, path: str, fields: list[tuple[str, str]]) -> requests.Response:
    """GET the form at ``path`` and POST exactly ``fields`` with its CSRF token."""
    token = form_fields(browser.get(path).text, path)[1]["csrf_token"]
    return browser.post(path, data=[("csrf_token", token), *fields])


def field_errors(page: requests.Response) -> list[str]:
    return [html.unescape(e) for e in re.findall(r'<p class="error" role="alert">(.*?)</p>', page.text, re.S)]


def new_role(gate: LiveServer) -> str:
    name = "club_" + secrets.token_hex(3)
    with gate.services.db.transaction() as session:
        create_role(session, name=name, description="", permissions=set())
    return name


def restriction_rows(gate: LiveServer, role: str) -> list[Restriction]:
    with gate.services.db.transaction() as session:
        role_id = session.scalar(select(Role.id).where(Role.name == role))
        rows = list(session.scalars(select(Restriction).where(Restriction.role_id == role_id)))
        for row in rows:
            session.expunge(row)
        return rows


@pytest.fixture
def officer(gate, make_user) -> Browser:
    return console(gate, make_user, "security_officer")


@pytest.mark.parametrize(
    ("fields", "field_message"),
    [
        ({"hours_start": "25:00", "hours_end": "18:00"}, "Use HH:MM, for example 08:00."),
        ({"hours_start": "08:00"}, "Give both the start and the end."),
        ({"hours_start": "08:00", "hours_end": "08:00"}, "The end must differ from the start."),
        ({"allowed_networks": "10.0.0.5/8"}, "Each entry must be an address block"),
        ({"allowed_networks": "gym"}, "Each entry must be an address block"),
        ({"allowed_clients": "no-such-app"}, "No portal app has this client id: no-such-app"),
        ({"max_sessions": "0"}, "A whole number from 1 to 100."),
        ({"max_sessions": "many"}, "Not a valid integer value."),
        ({"idle_minutes": "-5"}, "A whole number of minutes from 1 to 10080."),
        ({"valid_from": "2025-13-45"}, "Not a valid date value."),
        ({"valid_from": "2025-06-01", "valid_until": "2025-05-01"}, "The last day cannot be before the first day."),
        ({"target": "account", "login": "nobody-" + secrets.token_hex(3)}, "No account has this login."),
        ({"role": ""}, "Choose a role."),
        ({"allowed_weekdays": "9"}, "not a valid choice"),
        ({"school_only_scopes": "openid"}, "not a valid choice"),
        ({"at_session_limit": "explode"}, "not a valid choice"),
    ],
)
def test_bad_restrictions_are_form_errors(gate, officer, fields, field_message):
    role = new_role(gate)
    data = {"target": "role", "role": role, **fields}
    response = post_form(officer, "/admin/restrictions/new", list(data.items()))
    assert response.status_code == 400
    assert any(field_message.lower() in e.lower() for e in field_errors(response)), field_errors(response)
    assert restriction_rows(gate, role) == []


def test_the_security_officer_creates_edits_and_deletes_a_restriction(gate, officer, make_client):
    role = new_role(gate)
    app = make_client()
    assert officer.get("/admin/restrictions/new").status_code == 200
    fields = {"target": "role", "role": role, "description": "Pupils: school days only",
              "allowed_clients": app.client_id, "hours_start": "08:00", "hours_end": "18:00",
              "allowed_networks": "school\n203.0.113.0/24", "max_sessions": "2", "at_session_limit": "end_oldest",
              "require_2fa": "y", "valid_until": "2025-06-30", "idle_minutes": "30"}
    multi = [("allowed_weekdays", "0"), ("allowed_weekdays", "4"), ("school_only_scopes", "school")]
    response = post_form(officer, "/admin/restrictions/new", [*fields.items(), *multi])
    assert response.status_code == 303, field_errors(response)
    (row,) = restriction_rows(gate, role)
    assert row.allowed_clients == [app.client_id] and row.allowed_weekdays == [0, 4]
    assert (row.hours_start, row.hours_end) == ("08:00", "18:00")
    assert row.allowed_networks == ["school", "203.0.113.0/24"]
    assert (row.max_sessions, row.at_session_limit, row.require_2fa) == (2, "end_oldest", True)
    # The last day is kept as the moment it ends: 1 July 00:00 in Bishkek, in UTC.
    assert row.valid_until == datetime(2025, 6, 30, 18, 0)
    assert row.school_only_scopes == ["school"] and row.idle_timeout_seconds == 1800
    (created,) = events(gate, "restriction:create", f"role:{role}")
    assert created.details["values"]["hours_start"] == "08:00" and created.details["restriction"] == row.id

    listing = officer.get("/admin/restrictions")
    assert f'id="restriction-{row.id}"' in listing.text and "Pupils: school days only" in listing.text

    edit = officer.get(f"/admin/restrictions/{row.id}/edit")
    _action, shown = form_fields(edit.text, f"/admin/restrictions/{row.id}/edit")
    assert shown["valid_until"] == "2025-06-30" and shown["hours_end"] == "18:00" and shown["idle_minutes"] == "30"
    assert "school\n203.0.113.0/24" in html.unescape(edit.text)
    fields.update(hours_end="17:00", max_sessions="")
    response = post_form(officer, f"/admin/restrictions/{row.id}/edit", [*fields.items(), *multi])
    assert response.status_code == 303, field_errors(response)
    (updated,) = events(gate, "restriction:update", f"role:{role}")
    assert updated.details["changed"] == {"hours_end": {"from": "18:00", "to": "17:00"},
                                          "max_sessions": {"from": 2, "to": None}}

    assert post_form(officer, f"/admin/restrictions/{row.id}/delete", []).status_code == 400  # no reason
    assert post_form(officer, f"/admin/restrictions/{row.id}/delete", [("reason", "term is over")]).status_code == 303
    assert restriction_rows(gate, role) == []
    (deleted,) = events(gate, "restriction:delete", f"role:{role}")
    assert deleted.reason == "term is over" and deleted.details["values"]["hours_end"] == "17:00"


def test_restrictions_need_their_permissions(gate, make_user):
    rid = restrict(gate, user=make_user(), description="for the permission test")
    support = console(gate, make_user, "tech_support")  # admin:users:read, not admin:restrictions:write
    assert support.get("/admin/restrictions").status_code == 200
    assert "for the permission test" in support.get("/admin/restrictions").text
    assert support.get("/admin/access/explain").status_code == 200
    for path in ("/admin/restrictions/new", f"/admin/restrictions/{rid}/edit", f"/admin/restrictions/{rid}/delete"):
        assert support.get(path).status_code == 403, path
    page = support.get("/admin/restrictions")
    token = form_fields(page.text)[1].get("csrf_token", "")
    assert support.post(f"/admin/restrictions/{rid}/delete", data={"csrf_token": token, "reason": "x"}).status_code == 403
    with gate.services.db.transaction() as session:
        assert session.get(Restriction, rid) is not None

    pupil = make_user()
    browser = person(gate)
    browser.sign_in(pupil.login, pupil.password)
    assert browser.get("/admin/restrictions").status_code == 403
    assert browser.get("/admin/access/explain").status_code == 403


def test_why_cant_this_person_sign_in(gate, officer, make_user, make_client):
    student = make_user()
    app = make_client(name="Library", scopes=["openid", "school"])
    rid = restrict(gate, user=student, hours_start="08:00", hours_end="18:00", school_only_scopes=["school"])

    account_page = officer.get(f"/admin/accounts/{student.id}")
    assert f'/admin/access/explain?login={student.login}' in html.unescape(account_page.text)

    page = officer.get("/admin/access/explain", params={"login": student.login, "app": app.client_id,
                                                        "at": "2025-03-04T07:30", "ip": OUTSIDE})
    assert page.status_code == 200
    assert 'data-allowed="no"' in page.text
    assert reasons(page).keys() == {"outside-hours", "scopes-school-only"}
    assert f"#restriction-{rid}" in page.text

    page = officer.get("/admin/access/explain", params={"login": student.login, "app": app.client_id,
                                                        "at": "2025-03-04T09:30", "ip": INSIDE})
    assert 'data-allowed="yes"' in page.text and re.search(r'id="granted">openid school<', page.text)

    for params, message in [({"login": "nobody-" + secrets.token_hex(3)}, "No account has this login."),
                            ({"login": student.login, "ip": "10.0.0.999"}, "Not an IP address."),
                            ({"login": student.login, "at": "yesterday"}, "Use the form 2025-09-01T08:30."),
                            ({"login": student.login, "app": "nope"}, "No portal app has this client id: nope")]:
        bad = officer.get("/admin/access/explain", params=params)
        assert bad.status_code == 400 and message in field_errors(bad), params


# --- the command line -------------------------------------------------------------------------
def run_cli(gate: LiveServer, *args: str):  # type: ignore[no-untyped-def]
    settings = gate.services.settings
    env = {
        "IDP_DATABASE_URL": settings.database_url,
        "IDP_REDIS_URL": settings.redis_url,
        "IDP_SECRET_KEY": settings.secret_key,
        "IDP_ISSUER": settings.issuer,
        "IDP_NETWORKS": json.dumps(NETWORKS),
    }
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_access_explain_on_the_command_line(gate, make_user, make_client):
    student = make_user()
    app = make_client(scopes=["openid", "school"])
    restrict(gate, user=student, hours_start="08:00", hours_end="18:00", allowed_networks=["school"],
             school_only_scopes=["school"])

    allowed = run_cli(gate, "access", "explain", student.login, "--app", app.client_id, "--at", "2025-03-04T09:00",
                      "--ip", INSIDE)
    assert allowed.exit_code == 0, allowed.output
    assert f"{student.login}: ALLOWED" in allowed.output and "scopes granted: openid school" in allowed.output

    refused = run_cli(gate, "access", "explain", student.login.upper(), "--app", app.client_id,
                      "--at", "2025-03-04T19:00+06:00", "--ip", OUTSIDE, "--scope", "openid", "--scope", "school")
    assert refused.exit_code == 1, refused.output
    assert "REFUSED" in refused.output
    assert "[outside-hours] Your account can be used only from 08:00 to 18:00 (Bishkek time)." in refused.output
    assert "[network-not-allowed]" in refused.output and "[scopes-school-only]" in refused.output

    for args in ([f"nobody-{secrets.token_hex(3)}"], [student.login, "--at", "tomorrow"],
                 [student.login, "--ip", "300.1.1.1"], [student.login, "--app", "no-such-app"],
                 [student.login, "--scope", "everything"]):
        result = run_cli(gate, "access", "explain", *args)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output
