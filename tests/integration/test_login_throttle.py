"""Guessing and lockout (NIST 800-63B-4 §3.2.2 N12-N14, checklist §6 item 4): growing
delays per login and per client IP answered with 429 + Retry-After, one answer for
known and unknown logins, and a password disabled after 100 consecutive failures until
tech support re-enables it in the console.

These tests run their own servers with strict limits (the shared server allows any
number of failures per IP, because every test signs in from 127.0.0.1). The servers
share the test database but keep their Redis state in database 1, emptied before each
test."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis as redis_lib
import requests
from sqlalchemy import select, update

from idp.accounts.models import User
from idp.app import create_app
from idp.audit.models import AuditEvent
from idp.login.throttle import PASSWORD, Throttled, record_credential_failure
from tests.conftest import LiveServer, free_port, make_settings
from tests.helpers import Browser

WRONG = "not the password at all"
ACCOUNT_FREE = 5
IP_FREE = 12


def _strict_server(database_url: str, redis_url: str, **overrides: object) -> LiveServer:
    port = free_port()
    settings = make_settings(
        database_url,
        redis_url,
        f"http://127.0.0.1:{port}",
        login_account_free_failures=ACCOUNT_FREE,
        login_ip_free_failures=IP_FREE,
        **overrides,
    )
    live = LiveServer(create_app(settings), port)
    live.start()
    return live


def _stop(live: LiveServer) -> None:
    live.stop()
    live.services.db.remove()
    live.services.db.dispose()
    live.services.redis.close()


@pytest.fixture(scope="module")
def strict_redis_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + "/1"


@pytest.fixture(scope="module")
def strict(server: LiveServer, database_url: str, strict_redis_url: str) -> Iterator[LiveServer]:
    """No trusted proxy: the client IP is the TCP peer, X-Forwarded-For is ignored."""
    live = _strict_server(database_url, strict_redis_url)
    yield live
    _stop(live)


@pytest.fixture(scope="module")
def behind_proxy(server: LiveServer, database_url: str, strict_redis_url: str) -> Iterator[LiveServer]:
    """One trusted proxy in front: its X-Forwarded-For names the client."""
    live = _strict_server(database_url, strict_redis_url, trusted_proxies=1)
    yield live
    _stop(live)


@pytest.fixture(autouse=True)
def clean_counters(strict_redis_url: str) -> Iterator[None]:
    # Only these tests' servers use Redis database 1 (each xdist worker has its own Redis).
    client = redis_lib.Redis.from_url(strict_redis_url)
    client.flushdb()
    yield
    client.close()


def english(live: LiveServer, **headers: str) -> Browser:
    browser = Browser(live.url)
    browser.http.headers["Accept-Language"] = "en"
    browser.http.headers.update(headers)
    return browser


def attempt(browser: Browser, login: str, password: str) -> requests.Response:
    return browser.submit(browser.get("/login"), "/login", login=login, password=password)


def shape(response: requests.Response) -> str:
    """The page with what legitimately differs removed: typed values, tokens, numbers."""
    text = re.sub(r'(value|nonce)="[^"]*"', r'\1=""', response.text)
    return re.sub(r"\d+", "N", text)


def user_row(live: LiveServer, user_id: int) -> User:
    with live.services.db.transaction() as session:
        user = session.get(User, user_id)
        session.expunge(user)
        return user


def set_failures(live: LiveServer, user_id: int, failures: int) -> None:
    with live.services.db.transaction() as session:
        session.execute(update(User).where(User.id == user_id).values(password_failures=failures))


def events(live: LiveServer, action: str, user_id: int) -> list[AuditEvent]:
    with live.services.db.transaction() as session:
        rows = list(session.scalars(
            select(AuditEvent).where(AuditEvent.action == action, AuditEvent.subject == f"user:{user_id}").order_by(AuditEvent.seq)
        ))
        for row in rows:
            session.expunge(row)
        return rows


# --- per login --------------------------------------------------------------------------------
def test_failures_beyond_the_free_ones_get_429_with_retry_after(strict, make_user):
    user = make_user()
    browser = english(strict)
    for _ in range(ACCOUNT_FREE + 1):
        assert attempt(browser, user.login, WRONG).status_code == 401
    # The sixth failure costs 5 s: even the right password must wait.
    limited = attempt(browser, user.login, user.password)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 5
    assert "Too many failed sign-in attempts. Try again in" in limited.text
    assert "seconds" in limited.text and "Traceback" not in limited.text
    # Other logins from the same address are not held up by this one.
    other = make_user()
    assert attempt(browser, other.login, other.password).status_code == 303


def test_the_429_page_is_translated(strict, make_user):
    user = make_user()
    browser = Browser(strict.url)  # Kyrgyz
    for _ in range(ACCOUNT_FREE + 1):
        attempt(browser, user.login, WRONG)
    limited = attempt(browser, user.login, WRONG)
    assert limited.status_code == 429
    assert "Too many" not in limited.text and "seconds" not in limited.text
    assert "секунд" in limited.text


def test_the_delay_ends_and_then_grows(strict, make_user):
    user = make_user()
    browser = english(strict)
    for _ in range(ACCOUNT_FREE + 1):
        attempt(browser, user.login, WRONG)
    wait = int(attempt(browser, user.login, WRONG).headers["Retry-After"])
    time.sleep(wait + 0.2)
    # The next failure costs 15 s.
    assert attempt(browser, user.login, WRONG).status_code == 401
    again = attempt(browser, user.login, user.password)
    assert again.status_code == 429 and 5 < int(again.headers["Retry-After"]) <= 15


def test_a_successful_sign_in_resets_the_login_counter(strict, make_user):
    user = make_user()
    browser = english(strict)
    for _ in range(ACCOUNT_FREE):
        assert attempt(browser, user.login, WRONG).status_code == 401
    assert attempt(english(strict), user.login, user.password).status_code == 303
    assert user_row(strict, user.id).password_failures == 0
    # A fresh allowance: five more failures, and the sixth answers 401, not 429.
    for _ in range(ACCOUNT_FREE + 1):
        assert attempt(browser, user.login, WRONG).status_code == 401
    assert attempt(browser, user.login, WRONG).status_code == 429


def test_unknown_and_known_logins_answer_alike_at_every_stage(strict, make_user):
    user = make_user()
    unknown = "nobody-" + secrets.token_hex(5)
    known_browser, unknown_browser = english(strict), english(strict)
    for _ in range(ACCOUNT_FREE + 3):
        known = attempt(known_browser, user.login, WRONG)
        other = attempt(unknown_browser, unknown, WRONG)
        assert known.status_code == other.status_code
        assert known.headers.get("Retry-After") is not None or other.headers.get("Retry-After") is None
        assert shape(known) == shape(other)
    assert known.status_code == other.status_code == 429


# --- per client IP ------------------------------------------------------------------------------
def test_the_ip_limit_spans_many_logins(strict, make_user):
    browser = english(strict)
    for _ in range(IP_FREE + 1):
        assert attempt(browser, "guess-" + secrets.token_hex(4), WRONG).status_code == 401
    limited = attempt(browser, "guess-" + secrets.token_hex(4), WRONG)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    # The whole address waits, even for a right password of an untouched account.
    user = make_user()
    assert attempt(english(strict), user.login, user.password).status_code == 429
    # Spoofing X-Forwarded-For does not help: no proxy is trusted on this server.
    spoofed = english(strict, **{"X-Forwarded-For": "203.0.113." + str(secrets.randbelow(250))})
    assert attempt(spoofed, user.login, user.password).status_code == 429
    # /activate shares the address's sign-in throttle.
    page = browser.get("/activate")
    activation = browser.submit(page, "/activate", login=user.login, code="ABCD-EFGH-JKMN",
                                password="river mountain apricot lamp", confirm="river mountain apricot lamp")
    assert activation.status_code == 429 and "Retry-After" in activation.headers


def test_protocol_endpoints_are_not_throttled_by_sign_in_failures(strict):
    browser = english(strict)
    for _ in range(IP_FREE + 1):
        attempt(browser, "guess-" + secrets.token_hex(4), WRONG)
    assert attempt(browser, "guess-x", WRONG).status_code == 429
    token = requests.post(strict.url + "/token", data={"grant_type": "client_credentials"},
                          auth=("no-such-client", "x"), timeout=10)
    assert token.status_code == 401 and token.json()["error"] == "invalid_client"
    assert requests.get(strict.url + "/.well-known/openid-configuration", timeout=10).status_code == 200
    api = requests.get(strict.url + "/admin/api/v1/users", timeout=10)
    assert api.status_code in (401, 403) and api.headers["Content-Type"].startswith("application/json")


def test_a_trusted_proxy_names_the_client(behind_proxy, make_user):
    blocked = {"X-Forwarded-For": "198.51.100.7"}
    for _ in range(IP_FREE + 1):
        assert attempt(english(behind_proxy, **blocked), "guess-" + secrets.token_hex(4), WRONG).status_code == 401
    user = make_user()
    assert attempt(english(behind_proxy, **blocked), user.login, user.password).status_code == 429
    # Another client behind the same proxy is not held up.
    other = english(behind_proxy, **{"X-Forwarded-For": "198.51.100.8"})
    assert attempt(other, user.login, user.password).status_code == 303


# --- 100 consecutive failures (N12, N13) -------------------------------------------------------
def test_the_hundredth_failure_disables_the_password_until_support_re_enables_it(strict, make_user):
    user = make_user()
    set_failures(strict, user.id, 99)
    browser = english(strict)
    wrong = attempt(browser, user.login, WRONG)
    assert wrong.status_code == 401
    row = user_row(strict, user.id)
    assert row.password_failures == 100 and row.password_disabled_at is not None
    disabled = events(strict, "account:credential:disabled", user.id)
    assert len(disabled) == 1 and disabled[0].details["credential"] == "password"

    # The right password is refused with the wrong password's answer, and journalled.
    right = attempt(browser, user.login, user.password)
    assert right.status_code == 401 and shape(right) == shape(wrong)
    refused = events(strict, "account:login:refused", user.id)
    assert [e.reason for e in refused] == ["credential-disabled"]
    # Keep guessing until the login is also delayed: re-enabling clears that too.
    for _ in range(ACCOUNT_FREE):
        attempt(browser, user.login, WRONG)
    assert attempt(browser, user.login, user.password).status_code == 429

    support = english(strict)
    agent = make_user(roles=("tech_support",))
    assert support.sign_in(agent.login, agent.password).status_code == 303
    page = support.get(f"/admin/accounts/{user.id}")
    assert "failed sign-in attempts in a row" in page.text and "Re-enable the password" in page.text
    form = support.get(f"/admin/accounts/{user.id}/password/reenable")
    assert form.status_code == 200
    # The typed confirmation and the reason are required.
    refused_form = support.submit(form, "/password/reenable", confirm_login="someone-else", reason="")
    assert refused_form.status_code == 400
    assert user_row(strict, user.id).password_disabled_at is not None
    done = support.submit(form, "/password/reenable", confirm_login=user.login,
                          reason="The pupil came in person with the class teacher")
    assert done.status_code == 303
    enabled = events(strict, "account:credential:enable", user.id)
    assert len(enabled) == 1 and enabled[0].actor == f"user:{agent.id}" and enabled[0].reason
    row = user_row(strict, user.id)
    assert row.password_failures == 0 and row.password_disabled_at is None

    assert attempt(english(strict), user.login, user.password).status_code == 303


def test_re_enabling_needs_the_lock_permission(strict, make_user):
    user = make_user()
    set_failures(strict, user.id, 99)
    attempt(english(strict), user.login, WRONG)
    reader = english(strict)
    admin = make_user(roles=("school_admin",))
    reader.sign_in(admin.login, admin.password)
    assert reader.get(f"/admin/accounts/{user.id}/password/reenable").status_code == 403


def test_a_success_between_failures_starts_the_count_again(strict, make_user):
    user = make_user()
    set_failures(strict, user.id, 99)
    assert attempt(english(strict), user.login, user.password).status_code == 303
    assert user_row(strict, user.id).password_failures == 0
    # 99 more failures: 98 counted directly (faster than 98 delayed requests), one over HTTP.
    with strict.services.db.transaction() as session:
        for _ in range(98):
            assert record_credential_failure(session, user.id, PASSWORD, limit=100) is False
    assert attempt(english(strict), user.login, WRONG).status_code == 401
    row = user_row(strict, user.id)
    assert row.password_failures == 99 and row.password_disabled_at is None
    assert attempt(english(strict), user.login, user.password).status_code == 303


# --- the limiter itself ----------------------------------------------------------------------------
def test_a_protocol_client_gets_a_json_429(strict):
    app = strict.app
    with app.test_request_context("/token", method="POST"):
        response = app.make_response(app.handle_user_exception(Throttled(7, "test")))
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert response.get_json()["error"] == "too_many_requests"
    assert response.headers["Cache-Control"] == "no-store"


def test_parallel_failures_are_all_counted(strict):
    throttle = strict.services.login_account_throttle
    key = "parallel-" + secrets.token_hex(4)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _n: throttle.fail(key), range(40)))
    assert throttle.failures(key) == 40
    # The longest delay reached holds: a later, shorter step never shortens it.
    assert throttle.check(key) is not None and throttle.check(key) > 60
    assert strict.services.redis.ttl(throttle._keys(key)[0]) > 0  # the counter expires
    throttle.reset(key)
    assert throttle.check(key) is None and throttle.failures(key) == 0
