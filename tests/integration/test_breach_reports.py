"""Breach reports (policy 5.2.3; issue 6) end to end through HTTP, for each of the three
doors: the case is stored with its support deadline from the working calendar and the
reporter's late flag, the account is contained in the same request (its sessions and
tokens stop working at once, back-channel logout is queued for the apps used, a new
password is required, the account is locked when someone else controls it), the
reporter and tech support are mailed through the outbox and the mail reaches a real SMTP
server on loopback; the sign-in-page form answers the same whether or not the account
exists and is rate-limited; the "This wasn't me" link comes with a sign-in from a new
device, works once and for 7 days. No report is lost: with the mail server down the case
is stored and its mail waits in the outbox until the server is back."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from connectors.mail import SmtpTransport
from idp.accounts.models import User
from idp.audit.models import AuditEvent
from idp.breach.models import BreachCase, BreachCaseStep
from idp.breach.new_device import LINK_TTL, SEEN_TTL, not_me_links, seen_key
from idp.breach.service import step
from idp.breach.views import PUBLIC_FREE_REPORTS, _public_throttle
from idp.notify.models import OutboxMessage
from idp.oidc.models import BackchannelLogoutDelivery
from idp.workdays.calendar import is_late, load_calendar, to_naive_utc
from tests.conftest import LiveServer, free_port
from tests.helpers import Browser, UserInfo
from tests.integration.test_backchannel_logout import LogoutReceiver, verified_logout_token
from tests.integration.test_backchannel_logout import deliver as deliver_logouts
from tests.integration.test_outbox import SmtpServer
from tests.integration.test_sessions_registry import (
    CHROME_WINDOWS,
    FIREFOX_UBUNTU,
    SAFARI_IPHONE,
    app_client,
    browser_as,
    is_signed_in,
    refresh,
    signed_in_browser,
    tokens_via,
    userinfo_status,
)

BISHKEK = ZoneInfo("Asia/Bishkek")
SUPPORT = "support@school.example"


# --- helpers -----------------------------------------------------------------------------------
def local_input(moment: datetime) -> str:
    """A moment as a datetime-local input holds it (Bishkek wall time)."""
    return moment.astimezone(BISHKEK).strftime("%Y-%m-%dT%H:%M")


def person_with_mail(make_user: Any) -> tuple[UserInfo, str]:
    address = f"pupil-{time.time_ns()}@school.example"
    return make_user(email=address), address


def case_of(server: LiveServer, **where: Any) -> BreachCase:
    with server.services.db.transaction() as session:
        query = select(BreachCase).order_by(BreachCase.id.desc())
        for name, value in where.items():
            query = query.where(getattr(BreachCase, name) == value)
        case = session.scalars(query).first()
        assert case is not None, where
        session.expunge(case)
        return case


def account(server: LiveServer, user_id: int) -> User:
    with server.services.db.transaction() as session:
        user = session.get(User, user_id)
        assert user is not None
        session.expunge(user)
        return user


def mails(server: LiveServer, template: str, to: str) -> list[OutboxMessage]:
    with server.services.db.transaction() as session:
        rows = list(session.scalars(select(OutboxMessage).where(OutboxMessage.template == template,
                                                                OutboxMessage.to_address == to)
                                    .order_by(OutboxMessage.id)))
        for row in rows:
            session.expunge(row)
        return rows


def journal_actions(server: LiveServer, case: BreachCase) -> list[str]:
    with server.services.db.transaction() as session:
        return [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.action.like("breach:%"))
                                                  .order_by(AuditEvent.seq))
                if (e.details or {}).get("case") == case.number]


def steps(server: LiveServer, case: BreachCase) -> list[str]:
    with server.services.db.transaction() as session:
        return list(session.scalars(select(BreachCaseStep.action).where(BreachCaseStep.case_id == case.id)
                                    .order_by(BreachCaseStep.id)))


def expected_deadline(server: LiveServer, case: BreachCase) -> datetime:
    with server.services.db.transaction() as session:
        calendar = load_calendar(session, server.services.settings)
        return to_naive_utc(calendar.deadline(case.reported_at.replace(tzinfo=UTC)))


def signed_in_with_app(server: LiveServer, make_client: Any, person: UserInfo, user_agent: str = CHROME_WINDOWS,
                       logout_uri: str | None = None) -> tuple[Browser, Any, dict[str, Any]]:
    """A browser signed in to the provider and to a portal app with a back-channel logout
    URI (so ending the session queues a logout token), and the app's tokens."""
    client = app_client(make_client, backchannel_logout_uri=logout_uri or f"http://127.0.0.1:{free_port()}/bc")
    browser = signed_in_browser(server, person, user_agent)
    tokens = tokens_via(browser, client, person)
    assert userinfo_status(server.url, tokens["access_token"]) == 200
    return browser, client, tokens


def assert_contained(server: LiveServer, person: UserInfo, browsers: list[Browser], client: Any,
                     tokens: dict[str, Any]) -> None:
    """Every session and token of the account stopped working, and the app was told."""
    for browser in browsers:
        assert not is_signed_in(browser)
    assert userinfo_status(server.url, tokens["access_token"]) == 401
    refused = refresh(server.url, client, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    with server.services.db.transaction() as session:
        queued = list(session.scalars(select(BackchannelLogoutDelivery.client_id)
                                      .where(BackchannelLogoutDelivery.client_id == client.client_id)))
    assert queued == [client.client_id]
    assert server.services.sessions.list(person.id) == []
    assert account(server, person.id).must_change_password is True


def report_form(browser: Browser, path: str, **fields: str) -> Any:
    page = browser.get(path)
    assert page.status_code == 200, page.text[:300]
    return browser.submit(page, path, **fields)


def without_form_tokens(text: str) -> str:
    return re.sub(r'name="csrf_token" value="[^"]*"', 'name="csrf_token" value=""', text)


@pytest.fixture(autouse=True)
def fresh_report_allowance(server: LiveServer) -> Any:
    """The sign-in-page form's per-IP allowance is this test's own, and so are its
    back-channel logouts."""
    with server.app.app_context():
        throttle = _public_throttle()
    throttle.reset("127.0.0.1")
    yield
    throttle.reset("127.0.0.1")
    # This test's undelivered logout tokens must not reach another test's app (should it
    # get the same port).
    with server.services.db.transaction() as session:
        session.execute(update(BackchannelLogoutDelivery)
                        .where(BackchannelLogoutDelivery.status.in_(["pending", "sending"]))
                        .values(status="failed", last_error="left over by a test"))


@pytest.fixture
def smtp() -> Any:
    mail_server = SmtpServer()
    mail_server.start()
    yield mail_server
    mail_server.stop()


def deliver(server: LiveServer, port: int, now: datetime | None = None) -> Any:
    svc = server.services
    return svc.outbox.deliver_due(svc.db.factory, SmtpTransport(host="127.0.0.1", port=port, timeout=5), now=now)


# --- door 1: signed in ----------------------------------------------------------------------------
def test_account_page_report_contains_at_once_and_mails_reporter_and_support(server, make_user, make_client, smtp):
    person, address = person_with_mail(make_user)
    app = LogoutReceiver().start()
    try:
        browser, client, tokens = signed_in_with_app(server, make_client, person, logout_uri=app.url)
        report_and_check(server, person, address, browser, client, tokens, smtp, app)
    finally:
        app.stop()


def report_and_check(server: LiveServer, person: UserInfo, address: str, browser: Browser,
                     client: Any, tokens: dict[str, Any], smtp: SmtpServer, app: LogoutReceiver) -> None:
    other = signed_in_browser(server, person, SAFARI_IPHONE)
    account_page = browser.get("/")
    assert "/account/report-problem" in account_page.text
    noticed = datetime.now(UTC) - timedelta(hours=1)

    answer = report_form(browser, "/account/report-problem", category="unknown-activity",
                         noticed=local_input(noticed), description="Messages I did not send")

    # The confirmation page is the answer to the same request, with the case number.
    assert answer.status_code == 200
    case = case_of(server, user_id=person.id)
    assert case.number in answer.text and case.number.startswith("BR-")
    assert (case.door, case.category, case.state) == ("account", "unknown-activity", "contained")
    assert case.description == "Messages I did not send" and case.late is False
    assert case.deadline_at == expected_deadline(server, case) and case.deadline_at > case.reported_at
    assert abs(case.noticed_at - noticed.replace(tzinfo=None, second=0, microsecond=0)) < timedelta(minutes=1)
    assert case.contained_at is not None and case.containment["sessions_ended"] == 2
    # "Activity I don't recognise": someone else uses the account -> locked.
    assert case.containment["locked"] is True and account(server, person.id).locked is True
    assert_contained(server, person, [browser, other], client, tokens)
    # The portal app receives a valid back-channel logout token (the worker delivers it).
    deliver_logouts(server)
    [received] = app.received
    _header, claims = verified_logout_token(server, received, client.client_id)
    assert claims["sub"] == person.subject or claims.get("sid")
    assert steps(server, case) == ["report", "contain"]
    assert journal_actions(server, case) == ["breach:case:report", "breach:case:contain"]

    [confirmation] = mails(server, "breach_report_received", address)
    assert case.number in confirmation.subject and case.number in confirmation.body_text
    [notice] = mails(server, "breach_case_new", SUPPORT)[-1:]
    assert case.number in notice.body_text and person.login in notice.body_text
    # Delivered through a real SMTP server on loopback.
    deliver(server, smtp.port)
    received = {(str(m["To"]), str(m["Subject"])) for m in smtp.handler.messages}
    assert (address, confirmation.subject) in received and (SUPPORT, notice.subject) in received


def test_account_report_needs_a_sign_in_a_past_moment_and_a_short_description(server, make_user):
    person = make_user()
    anonymous = Browser(server.url).get("/account/report-problem")
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]
    browser = signed_in_browser(server, person)
    future = local_input(datetime.now(UTC) + timedelta(days=1))
    refused = report_form(browser, "/account/report-problem", category="other", noticed=future, description="")
    assert refused.status_code == 400 and "future" in refused.text
    too_long = report_form(browser, "/account/report-problem", category="other",
                           noticed=local_input(datetime.now(UTC)), description="x" * 2001)
    assert too_long.status_code == 400
    page = browser.get("/account/report-problem")
    token = re.search(r'name="csrf_token" value="([^"]*)"', page.text).group(1)  # type: ignore[union-attr]
    no_category = browser.post("/account/report-problem",
                               data={"csrf_token": token, "noticed": local_input(datetime.now(UTC))})
    assert no_category.status_code == 400 and "Choose what happened" in no_category.text
    # Nothing was reported or contained.
    assert is_signed_in(browser)
    with server.services.db.transaction() as session:
        assert session.scalar(select(BreachCase.id).where(BreachCase.user_id == person.id)) is None


def test_shared_password_is_contained_without_a_lock_and_a_late_report_is_marked(server, make_user):
    person = make_user()
    browser = signed_in_browser(server, person)
    noticed = datetime.now(UTC) - timedelta(days=10)
    answer = report_form(browser, "/account/report-problem", category="shared-password",
                         noticed=local_input(noticed), description="")
    assert answer.status_code == 200
    case = case_of(server, user_id=person.id)
    with server.services.db.transaction() as session:
        calendar = load_calendar(session, server.services.settings)
    assert case.late is True == is_late(calendar, case.noticed_at.replace(tzinfo=UTC),
                                        case.reported_at.replace(tzinfo=UTC))
    user = account(server, person.id)
    assert user.locked is False and user.must_change_password is True
    assert not is_signed_in(browser)
    # The next sign-in must set a new password first.
    again = Browser(server.url).sign_in(person.login, person.password)
    assert again.status_code == 303 and "password" in again.headers["Location"]


# --- door 2: the sign-in page ------------------------------------------------------------------------
def test_sign_in_page_report_contains_and_answers_the_same_for_an_unknown_login(server, make_user, make_client):
    person, address = person_with_mail(make_user)
    browser, client, tokens = signed_in_with_app(server, make_client, person)
    assert "/report-problem" in Browser(server.url).get("/login").text
    noticed = local_input(datetime.now(UTC) - timedelta(minutes=30))
    contact = f"parent-{time.time_ns()}@example.org"
    fields = {"category": "lost-device", "noticed": noticed, "description": "Phone stolen", "contact": contact}

    known = report_form(Browser(server.url), "/report-problem", login=person.login.upper(), **fields)
    unknown_login = f"nobody-{time.time_ns()}"
    unknown = report_form(Browser(server.url), "/report-problem", login=unknown_login, **fields)

    # The same status and body whether or not the account exists.
    assert known.status_code == unknown.status_code == 200
    assert without_form_tokens(known.text) == without_form_tokens(unknown.text)
    # The account was contained at once: lost device -> locked.
    case = case_of(server, user_id=person.id)
    assert (case.door, case.category, case.contact, case.login_given) == (
        "sign-in-page", "lost-device", contact, person.login)
    assert case.deadline_at == expected_deadline(server, case)
    assert account(server, person.id).locked is True
    assert_contained(server, person, [browser], client, tokens)
    # The unknown login is a case too (no account, nothing contained) for support to follow up.
    stray = case_of(server, login_given=unknown_login)
    assert stray.user_id is None and stray.state == "reported" and stray.containment == {"account": "unknown"}
    assert journal_actions(server, stray) == ["breach:case:report"]
    # The contact gets the same kind of confirmation in both cases (with its own case
    # number); the account's own address too; no name from the account goes to the contact.
    to_contact = mails(server, "breach_report_received", contact)
    assert len(to_contact) == 2
    assert {case.number, stray.number} == {re.search(r"BR-\d{6}", m.subject).group(0) for m in to_contact}  # type: ignore[union-attr]
    assert all("Test User" not in m.body_text for m in to_contact)
    assert len(mails(server, "breach_report_received", address)) == 1


def test_sign_in_page_form_is_rate_limited_per_ip(server):
    phone = f"+996 {time.time_ns() % 10**9:09d}"
    fields = {"category": "other", "noticed": local_input(datetime.now(UTC)), "description": "", "contact": phone}
    browser = Browser(server.url)
    for _ in range(PUBLIC_FREE_REPORTS):
        assert report_form(browser, "/report-problem", login=f"x-{time.time_ns()}", **fields).status_code == 200
    limited = report_form(browser, "/report-problem", login=f"x-{time.time_ns()}", **fields)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    # Refused before anything is looked up or stored: only the allowed reports are cases.
    with server.services.db.transaction() as session:
        stored = list(session.scalars(select(BreachCase.id).where(BreachCase.contact == phone)))
    assert len(stored) == PUBLIC_FREE_REPORTS
    bad_contact = report_form(Browser(server.url), "/report-problem", login="someone",
                              **{**fields, "contact": "not a contact"})
    assert bad_contact.status_code == 429  # the limit holds for every request from the IP


def test_sign_in_page_form_refuses_a_contact_that_is_neither_mail_nor_phone(server):
    fields = {"category": "other", "noticed": local_input(datetime.now(UTC)), "description": ""}
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    refused = report_form(browser, "/report-problem", login="someone", contact="call me", **fields)
    assert refused.status_code == 400 and "phone" in refused.text.lower()


# --- door 3: "This wasn't me" --------------------------------------------------------------------------
def not_me_link(server: LiveServer, address: str) -> str:
    [notice] = mails(server, "new_device_notice", address)[-1:]
    match = re.search(r"(http://\S+/report/not-me/(\S+))", notice.body_text)
    assert match, notice.body_text
    return match.group(1)


def test_new_device_sign_in_sends_a_notice_whose_link_contains_once(server, make_user, make_client):
    person, address = person_with_mail(make_user)
    server.services.redis.delete(seen_key(person.id))
    signed_in_browser(server, person, CHROME_WINDOWS)          # the first ever sign-in: no notice
    signed_in_browser(server, person, CHROME_WINDOWS)          # a known device: no notice
    assert mails(server, "new_device_notice", address) == []
    intruder, client, tokens = signed_in_with_app(server, make_client, person, FIREFOX_UBUNTU)
    [notice] = mails(server, "new_device_notice", address)
    assert "Firefox" in notice.body_text and "127.0.0.1" in notice.body_text
    url = not_me_link(server, address)
    token = url.rsplit("/", 1)[1]
    assert LINK_TTL - 60 <= not_me_links(server.services.redis).ttl(token) <= LINK_TTL == 7 * 86400

    owner = browser_as(server.url, SAFARI_IPHONE)
    page = owner.get(url)
    assert page.status_code == 200 and "Firefox" in page.text
    assert owner.get(url).status_code == 200  # a GET (a mail scanner) uses nothing up
    assert is_signed_in(intruder)
    answer = owner.submit(page, "/report/not-me/")
    assert answer.status_code == 200
    case = case_of(server, user_id=person.id)
    assert case.number in answer.text
    assert (case.door, case.category, case.state) == ("not-me", "not-me", "contained")
    assert case.deadline_at == expected_deadline(server, case) and case.late is False
    assert case.containment["reported_sign_in"]["device"].startswith("Firefox")
    assert account(server, person.id).locked is True  # someone else signed in
    assert_contained(server, person, [intruder], client, tokens)
    assert journal_actions(server, case) == ["breach:case:report", "breach:case:contain"]
    assert len(mails(server, "breach_report_received", address)) == 1
    # Single use.
    assert owner.get(url).status_code == 400
    assert owner.submit(page, "/report/not-me/").status_code == 400
    with server.services.db.transaction() as session:
        assert len(list(session.scalars(select(BreachCase.id).where(BreachCase.user_id == person.id)))) == 1


def test_known_devices_of_the_old_format_stay_known_and_unused_ones_are_forgotten(server, make_user):
    """``seen-devices`` was a plain Redis set before it became a sorted set (device -> last
    sign-in): a set written then is read (its devices stay known) and converted; a device
    unused for 400 days is new again."""
    person, address = person_with_mail(make_user)
    redis = server.services.redis
    key = seen_key(person.id)
    redis.delete(key)
    redis.sadd(key, "Chrome, Windows", "Mobile Safari, iOS, iPhone")  # the old format
    signed_in_browser(server, person, CHROME_WINDOWS)
    assert mails(server, "new_device_notice", address) == []
    assert redis.type(key) == b"zset" and redis.zcard(key) == 2
    assert SEEN_TTL - 60 <= redis.ttl(key) <= SEEN_TTL
    # The iPhone was last used more than 400 days ago: forgotten, so its sign-in is new.
    redis.zadd(key, {"Mobile Safari, iOS, iPhone": time.time() - SEEN_TTL - 60})
    signed_in_browser(server, person, SAFARI_IPHONE)
    assert len(mails(server, "new_device_notice", address)) == 1
    assert redis.zscore(key, "Mobile Safari, iOS, iPhone") > time.time() - 60


def test_not_me_link_expires(server, make_user):
    person, address = person_with_mail(make_user)
    server.services.redis.delete(seen_key(person.id))
    signed_in_browser(server, person, CHROME_WINDOWS)
    signed_in_browser(server, person, SAFARI_IPHONE)
    url = not_me_link(server, address)
    token = url.rsplit("/", 1)[1]
    links = not_me_links(server.services.redis)
    assert Browser(server.url).get(url).status_code == 200
    server.services.redis.pexpire(links._key(token), 1)  # the 7 days have passed
    time.sleep(0.05)
    assert Browser(server.url).get(url).status_code == 400
    assert Browser(server.url).get("/report/not-me/" + "A" * 43).status_code == 400
    assert account(server, person.id).locked is False


# --- the case afterwards, and no report lost -----------------------------------------------------------
def test_resolving_a_case_is_a_journalled_step_and_mails_the_reporter(server, make_user):
    person, address = person_with_mail(make_user)
    browser = signed_in_browser(server, person)
    report_form(browser, "/account/report-problem", category="other", noticed=local_input(datetime.now(UTC)))
    case = case_of(server, user_id=person.id)
    svc = server.services
    with server.app.app_context(), svc.db.transaction() as session:
        live = session.get(BreachCase, case.id)
        assert live is not None
        step(session, live, actor="user:1", action="review", note="calling the pupil", svc=svc, state="in_review")
        with pytest.raises(ValueError):
            step(session, live, actor="user:1", action="resolve", note="", svc=svc, state="resolved")
        step(session, live, actor="user:1", action="resolve", note="the pupil's brother", svc=svc,
             state="resolved", outcome="confirmed")
    done = case_of(server, id=case.id)
    assert (done.state, done.outcome) == ("resolved", "confirmed") and done.resolved_at is not None
    assert steps(server, case) == ["report", "contain", "review", "resolve"]
    assert journal_actions(server, case)[-2:] == ["breach:case:review", "breach:case:resolve"]
    [resolved] = mails(server, "breach_case_resolved", address)
    assert case.number in resolved.body_text


def test_no_report_is_lost_when_the_mail_server_is_down(server, make_user, smtp):
    person, address = person_with_mail(make_user)
    browser = signed_in_browser(server, person)
    smtp.stop()
    answer = report_form(browser, "/account/report-problem", category="lost-device",
                         noticed=local_input(datetime.now(UTC)))
    assert answer.status_code == 200
    case = case_of(server, user_id=person.id)
    assert case.number in answer.text and account(server, person.id).locked is True
    now = datetime.now(UTC)
    report = deliver(server, smtp.port, now=now)
    assert report.sent == 0 and report.retried >= 1
    [waiting] = mails(server, "breach_report_received", address)
    assert waiting.status == "pending" and waiting.last_error
    smtp.start()
    deliver(server, smtp.port, now=now + timedelta(hours=2))
    [sent] = mails(server, "breach_report_received", address)
    assert sent.status == "sent"
    assert any(case.number in str(m["Subject"]) and str(m["To"]) == address for m in smtp.handler.messages)
