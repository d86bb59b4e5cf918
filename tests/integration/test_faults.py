"""Faults (issue 9), each with the real component on loopback: Redis stopped in the middle
of traffic and started again, the SQLite database locked by another writer, and the SMTP
server down for an hour. The process killed in the middle of writes is
tests/integration/test_faults_kill.py; parallel replays are test_concurrency.py.

What a person should see: a clear 503 (a page for pages, JSON for the protocol), never a
500 or a trace; nothing half done (a sign-in, a breach report, a console change happen
whole or not at all; the audit chain verifies); and when the component is back, the
service carries on by itself, with no restart — signed-in sessions too, since Redis keeps
them on disk (``appendonly yes``, README "Running in production")."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from connectors.mail import SmtpTransport
from idp import db as db_module
from idp.accounts.models import User
from idp.accounts.service import create_user
from idp.audit.models import AuditEvent
from idp.breach.models import BreachCase
from idp.migrate import upgrade
from idp.notify.models import OutboxMessage
from idp.oidc.clients import create_client
from tests.conftest import LiveServer, free_port, start_redis
from tests.helpers import SECOND_FACTORS, Browser, ClientInfo, UserInfo
from tests.integration.test_breach_reports import local_input
from tests.integration.test_outbox import SmtpServer
from tests.integration.test_password_reset import person_with
from tests.integration.test_rfc9700 import get_tokens, refresh

SQLITE = os.environ.get("DARBAZA_TEST_DB", "sqlite") == "sqlite"
REPO = Path(__file__).resolve().parents[2]
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))


# --- components -------------------------------------------------------------------------------
class RedisProcess:
    """A redis-server of this test's own (as tests/conftest.py starts one), which keeps its
    data on disk like production's (append-only file), so that it can be stopped and
    started again on the same port with the same data."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_redis(self.port, self.workdir, appendonly=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def english(base: str) -> Browser:
    browser = Browser(base)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def signed_in(base: str, person: UserInfo) -> Browser:
    browser = english(base)
    response = browser.sign_in(person.login, person.password)
    assert response.status_code == 303 and response.headers["Location"] == "/", response.text[:300]
    return browser


def assert_clear_503(response: requests.Response, *, json: bool = False) -> None:
    assert response.status_code == 503, (response.request.url, response.status_code, response.text[:300])
    assert "Traceback" not in response.text
    if json:
        assert response.headers["Content-Type"].startswith("application/json"), response.headers["Content-Type"]
        assert response.json()["error"]
    else:
        assert "text/html" in response.headers["Content-Type"]


def audit_ok(live: LiveServer) -> int:
    with live.services.db.transaction() as session:
        result = live.services.journal.verify(session)
    assert result.ok, result
    return result.checked


# --- Redis stopped during traffic ----------------------------------------------------------------
@pytest.fixture
def redis_fault(database_url: str, server: LiveServer, tmp_path: Path) -> Iterator[tuple[LiveServer, RedisProcess]]:
    """A provider on a Redis of its own (the shared ``server`` made the signing key)."""
    redis = RedisProcess(tmp_path)
    redis.start()
    live = LiveServer.serve(database_url, redis.url)
    yield live, redis
    live.close()
    redis.stop()


def test_redis_stopped_during_traffic_is_a_clear_503_and_the_service_resumes_by_itself(
        redis_fault, make_user, make_client):
    live, redis = redis_fault
    person, teacher = make_user(), make_user(roles=("teacher",))
    client = make_client(trusted=True)
    browser = signed_in(live.url, person)
    tokens = get_tokens(live, browser, client, person)
    # A teacher in the middle of a sign-in: the password was right, the code is asked for.
    midway = english(live.url)
    answer = midway.submit(midway.get("/login"), "/login", login=teacher.login, password=teacher.password)
    assert answer.headers.get("Location", "").endswith("/login/second-factor"), answer.status_code
    code_page = midway.get("/login/second-factor")
    assert code_page.status_code == 200

    redis.stop()
    # Pages: the signed-in person, the one half way through, and a newcomer (whose
    # account page is only the way to the sign-in page, which is a 503).
    for who in (browser, midway):
        for path in ("/login", "/", "/account/sessions", "/password/forgot"):
            assert_clear_503(who.get(path, headers={"Accept": "text/html"}))
    newcomer = english(live.url)
    assert newcomer.get("/").headers["Location"] == "/login"
    for path in ("/login", "/password/forgot", "/report-problem"):
        assert_clear_503(newcomer.get(path, headers={"Accept": "text/html"}))
    # The sign-in in progress fails cleanly (no session is made of it).
    assert_clear_503(midway.submit(code_page, "/login/second-factor", code=SECOND_FACTORS.code_for(teacher.login)))
    assert_clear_503(browser.get("/authorize", params={"client_id": client.client_id, "response_type": "code",
                                                       "redirect_uri": client.redirect_uri, "scope": "openid"}))
    # The protocol: JSON 503 where Redis is needed; what needs only the database still works.
    assert_clear_503(refresh(live, client, tokens["refresh_token"]), json=True)
    statuses = {}
    for path, headers in (("/userinfo", {"Authorization": "Bearer " + tokens["access_token"]}),
                          ("/.well-known/openid-configuration", {}), ("/jwks.json", {})):
        response = requests.get(live.url + path, headers=headers, timeout=10)
        statuses[path] = response.status_code
        if response.status_code != 200:
            assert_clear_503(response, json=True)
    print("during the Redis outage:", statuses)  # noqa: T201 - shown with -s, for the record
    assert requests.get(live.url + "/healthz", timeout=10).status_code == 200
    ready = requests.get(live.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["redis"] == "unavailable"

    redis.start()  # the same port, the same data; the provider is not restarted
    assert requests.get(live.url + "/readyz", timeout=10).status_code == 200
    # The signed-in person still is (the session was on Redis's disk), and the refresh
    # token refused during the outage was not spent by it.
    account = browser.get("/")
    assert account.status_code == 200 and person.login in account.text
    rotated = refresh(live, client, tokens["refresh_token"])
    assert rotated.status_code == 200, rotated.text
    assert requests.get(live.url + "/userinfo", headers={"Authorization": "Bearer " + rotated.json()["access_token"]},
                        timeout=10).status_code == 200
    # The interrupted sign-in carries on where it stopped (its pending step is kept too).
    done = midway.submit(midway.get("/login/second-factor"), "/login/second-factor",
                         code=SECOND_FACTORS.code_for(teacher.login))
    assert done.status_code == 303 and done.headers["Location"] == "/", (done.status_code, done.text[:300])
    assert teacher.login in midway.get("/").text
    # A newcomer signs in as usual, and every page answers again.
    signed_in(live.url, make_user())
    for path in ("/.well-known/openid-configuration", "/jwks.json", "/login"):
        assert requests.get(live.url + path, timeout=10).status_code == 200, path
    audit_ok(live)


# --- the database locked by another writer -----------------------------------------------------
def counts(live: LiveServer, person_ids: list[int]) -> dict[str, int]:
    subjects = [f"user:{i}" for i in person_ids]
    with live.services.db.transaction() as session:
        return {
            "events": session.scalar(select(func.count()).select_from(AuditEvent)
                                     .where(AuditEvent.subject.in_(subjects))) or 0,
            "cases": session.scalar(select(func.count()).select_from(BreachCase)
                                    .where(BreachCase.user_id.in_(person_ids))) or 0,
        }


def display_name(live: LiveServer, user_id: int) -> str:
    with live.services.db.transaction() as session:
        user = session.get(User, user_id)
        assert user is not None
        return user.display_name


@pytest.mark.skipif(not SQLITE, reason="SQLite's file lock; PostgreSQL has row locks and no file to lock")
def test_a_locked_sqlite_database_is_a_clear_503_and_nothing_is_half_written(
        database_url, redis_url, server, make_user, make_client):
    path = make_url(database_url).database
    assert path
    # The same file with a short wait for the write lock (the URL's ``timeout``; 30 s by default).
    live = LiveServer.serve(database_url + "?timeout=1", redis_url)
    try:
        newcomer, reporter, target = make_user(), make_user(), make_user(display_name="Before the lock")
        admin = make_user(roles=("school_admin",))
        client = make_client(trusted=True)
        people = [newcomer.id, reporter.id, target.id]
        reporting = signed_in(live.url, reporter)
        console = signed_in(live.url, admin)
        tokens = get_tokens(live, reporting, client, reporter)
        newcomer_browser = english(live.url)
        login_page = newcomer_browser.get("/login")
        report_page = reporting.get("/account/report-problem")
        profile_page = console.get(f"/admin/accounts/{target.id}/profile")
        assert report_page.status_code == profile_page.status_code == 200
        report = {"category": "unknown-activity", "noticed": local_input(datetime.now(UTC) - timedelta(hours=1)),
                  "description": "Messages I did not send"}
        profile = {"display_name": "Changed", "email": f"{target.login}@school.test", "locale": "en"}
        before = counts(live, people)

        holder = sqlite3.connect(path, timeout=0, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            assert_clear_503(newcomer_browser.submit(login_page, "/login", login=newcomer.login,
                                                     password=newcomer.password))
            assert_clear_503(reporting.submit(report_page, "/account/report-problem", **report))
            assert_clear_503(console.submit(profile_page, "/profile", **profile))
            assert_clear_503(refresh(live, client, tokens["refresh_token"]), json=True)
            # Each waited about 1 s (?timeout=1) for the lock; shown, not asserted (timing).
            print(f"four refused writes took {time.monotonic() - started:.1f} s")  # noqa: T201 - with -s
        finally:
            holder.rollback()
            holder.close()

        # Nothing of the refused requests was written: no session, case, change or event.
        assert newcomer_browser.get("/").status_code == 302
        assert reporting.get("/").status_code == 200  # the report did not end their sessions
        assert counts(live, people) == before
        assert display_name(live, target.id) == "Before the lock"
        audit_ok(live)
        # The same requests now happen, each whole.
        assert newcomer_browser.submit(newcomer_browser.get("/login"), "/login", login=newcomer.login,
                                       password=newcomer.password).status_code == 303
        assert newcomer_browser.get("/").status_code == 200
        # (The refresh first: the report ends the reporter's sessions and their tokens.)
        assert refresh(live, client, tokens["refresh_token"]).status_code == 200
        assert reporting.submit(reporting.get("/account/report-problem"), "/account/report-problem",
                                **report).status_code == 200
        assert console.submit(console.get(f"/admin/accounts/{target.id}/profile"), "/profile",
                              **profile).status_code == 303
        after = counts(live, people)
        assert after["cases"] == before["cases"] + 1 and after["events"] > before["events"]
        assert display_name(live, target.id) == "Changed"
        audit_ok(live)
    finally:
        live.close()


# --- PostgreSQL stopped ------------------------------------------------------------------------------
class PgCluster:
    """A PostgreSQL cluster of this test's own (scripts/pg-test.sh), stopped and started
    again with its data (pg_ctl, as its owner)."""

    def __init__(self) -> None:
        # Under /tmp itself: the server runs as ``postgres`` when the tests run as root.
        self.dir = Path(tempfile.mkdtemp(prefix="darbaza-pg-fault-"))
        self.port = free_port()
        self.url = ""

    def create(self) -> None:
        done = subprocess.run(  # noqa: S603 - fixed argv
            [str(REPO / "scripts" / "pg-test.sh"), "start", str(self.dir), str(self.port)],
            capture_output=True, text=True, timeout=120, check=True,
        )
        self.url = done.stdout.strip().splitlines()[-1]

    def _ctl(self, *args: str) -> None:
        runas = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        subprocess.run([*runas, f"{PG_BIN[-1]}/pg_ctl", "-D", str(self.dir / "data"), "-w", *args],  # noqa: S603
                       capture_output=True, timeout=60, check=True)

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        self._ctl("-l", str(self.dir / "log"), "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def destroy(self) -> None:
        subprocess.run([str(REPO / "scripts" / "pg-test.sh"), "stop", str(self.dir)],  # noqa: S603
                       capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def provider_on_own_postgres(redis_url: str) -> Iterator[tuple[PgCluster, LiveServer, UserInfo, ClientInfo]]:
    """A provider on a PostgreSQL cluster of its own (to stop and start), with a student
    and a trusted portal app."""
    cluster = PgCluster()
    try:
        cluster.create()
        upgrade(cluster.url)
        live = LiveServer.serve(cluster.url, redis_url)
        try:
            svc = live.services
            password = "correct horse battery " + secrets.token_hex(4)
            with svc.db.transaction() as session:
                svc.keys.ensure_key(session)
                login = create_user(session, svc.passwords, login=f"pg-{secrets.token_hex(4)}", display_name="P G",
                                    password=password, roles=["student"]).login
                app, secret = create_client(session, name="App", redirect_uris=["https://rp.example.test/cb"],
                                            client_id="app-" + secrets.token_hex(4), trusted=True)
                client = ClientInfo(app.client_id, secret, "https://rp.example.test/cb", "")
            yield cluster, live, UserInfo(id=0, login=login, password=password, subject=""), client
        finally:
            live.close()
    finally:
        cluster.destroy()


@pytest.mark.skipif(not PG_BIN, reason="no PostgreSQL server binaries on this machine")
def test_postgresql_stopped_is_a_clear_503_and_the_service_resumes_when_it_is_back(redis_url):
    with provider_on_own_postgres(redis_url) as (cluster, live, person, client):
        login, password = person.login, person.password
        browser = signed_in(live.url, person)
        tokens = get_tokens(live, browser, client, person)
        newcomer = english(live.url)
        login_page = newcomer.get("/login")

        cluster.stop()
        assert_clear_503(browser.get("/", headers={"Accept": "text/html"}))
        assert_clear_503(newcomer.submit(login_page, "/login", login=login, password=password))
        assert_clear_503(refresh(live, client, tokens["refresh_token"]), json=True)
        assert_clear_503(requests.get(live.url + "/userinfo", timeout=10,
                                      headers={"Authorization": "Bearer " + tokens["access_token"]}), json=True)
        for path in ("/.well-known/openid-configuration", "/jwks.json"):  # no database needed, or a 503
            response = requests.get(live.url + path, timeout=10)
            if response.status_code != 200:
                assert_clear_503(response, json=True)
        ready = requests.get(live.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["database"] == "unavailable"

        cluster.start()  # the provider is not restarted: its pool finds the database again
        assert requests.get(live.url + "/readyz", timeout=10).status_code == 200
        assert login in browser.get("/").text
        answer = refresh(live, client, tokens["refresh_token"])  # not spent by the refused try
        assert answer.status_code == 200, answer.text
        signed_in(live.url, person)
        audit_ok(live)


@pytest.mark.skipif(not PG_BIN, reason="no PostgreSQL server binaries on this machine")
def test_postgresql_restarted_while_idle_the_next_requests_find_it_at_once(redis_url, monkeypatch):
    """Pooled connections are checked before use only after sitting idle (idp/db.py,
    PING_AFTER_IDLE; no ping per request under load): after a restart of PostgreSQL while
    the provider was idle, the first requests already succeed (no 503 from a dead pooled
    connection)."""
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE", 0.5)
    with provider_on_own_postgres(redis_url) as (cluster, live, person, client):
        tokens = get_tokens(live, signed_in(live.url, person), client, person)
        bearer = {"Authorization": "Bearer " + tokens["access_token"]}
        # Several pooled connections, all alive.
        for _ in range(4):
            assert requests.get(live.url + "/userinfo", timeout=10, headers=bearer).status_code == 200
        cluster.stop()
        cluster.start()
        time.sleep(0.6)
        for _ in range(4):
            answer = requests.get(live.url + "/userinfo", timeout=10, headers=bearer)
            assert answer.status_code == 200, answer.text
        answer = refresh(live, client, tokens["refresh_token"])
        assert answer.status_code == 200, answer.text


# --- SMTP down for an hour --------------------------------------------------------------------------
def test_smtp_down_for_an_hour_mail_waits_in_the_outbox_and_goes_once(server, make_user, browser):
    for key in server.services.redis.scan_iter("throttle:password-reset:*"):
        server.services.redis.delete(key)
    smtp = SmtpServer()
    smtp.start()
    smtp.stop()  # the school's mail server is down
    person, address = person_with(make_user, server)
    answer = browser.submit(browser.get("/password/forgot"), "/password/forgot", login=person.login)
    assert answer.status_code in (200, 303), answer.status_code
    svc = server.services
    transport = SmtpTransport(host="127.0.0.1", port=smtp.port, timeout=5)

    def mine() -> list[OutboxMessage]:
        with svc.db.transaction() as session:
            rows = list(session.scalars(select(OutboxMessage).where(OutboxMessage.to_address == address)))
            for row in rows:
                session.expunge(row)
            return rows

    [queued] = mine()
    # The worker's delivery pass every minute for an hour, on a clock moved on instead of slept.
    start = datetime.now(UTC)
    for minute in range(0, 61):
        svc.outbox.deliver_due(svc.db.factory, transport, now=start + timedelta(minutes=minute))
    [waiting] = mine()
    assert waiting.status == "pending" and waiting.next_attempt_at is not None
    assert waiting.next_attempt_at > (start + timedelta(minutes=60)).replace(tzinfo=None)
    assert 1 < waiting.attempts < svc.settings.mail_max_attempts, waiting.attempts
    assert "unreachable" in (waiting.last_error or "")

    smtp.start()  # back, on the same port
    try:
        later = start + timedelta(hours=3)
        for step in range(3):  # the first pass sends it, two more find nothing to send
            svc.outbox.deliver_due(svc.db.factory, transport, now=later + timedelta(minutes=step))
        received = [m for m in smtp.handler.messages if m["To"] == address]
        assert len(received) == 1
        assert received[0]["Message-ID"] == queued.message_id
        [sent] = mine()
        assert sent.status == "sent" and sent.attempts == waiting.attempts + 1
    finally:
        smtp.stop()
