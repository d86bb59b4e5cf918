"""No breach report is lost (policy 5.2.3; issue 6): the report, its containment and its
mail are stored in the request's own transaction, so nothing depends on a process that
runs later. With the worker stopped the case and its outbox mails are in the database
after the answer and go out through a real SMTP server on loopback when delivery runs
(``darbaza mail deliver``); with the provider process killed right after the answer,
the case, the containment and the mail are all there and the mail goes out later.

The other two conditions of the issue live in tests/integration/test_breach_reports.py:
the mail server down (``test_no_report_is_lost_when_the_mail_server_is_down``) and the
same answer for an existing and an unknown login
(``test_sign_in_page_report_contains_and_answers_the_same_for_an_unknown_login``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from idp.cli import main
from tests.conftest import LiveServer, free_port, wait_healthy
from tests.integration.test_breach_reports import (
    SUPPORT,
    account,
    case_of,
    deliver,
    local_input,
    mails,
    person_with_mail,
    report_form,
    steps,
)
from tests.integration.test_outbox import SmtpServer
from tests.integration.test_sessions_registry import (
    CHROME_WINDOWS,
    REPO,
    SAFARI_IPHONE,
    browser_as,
    is_signed_in,
    provider_env,
    signed_in_browser,
)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    mail_server = SmtpServer()
    mail_server.start()
    yield mail_server
    mail_server.stop()


def received(smtp: SmtpServer) -> set[tuple[str, str]]:
    return {(str(m["To"]), str(m["Subject"])) for m in smtp.handler.messages}


def mail_deliver(server: LiveServer, smtp: SmtpServer) -> Any:
    """``darbaza mail deliver`` run the way an operator runs it, sending to ``smtp``."""
    settings = server.services.settings
    env = {
        "IDP_DATABASE_URL": settings.database_url,
        "IDP_REDIS_URL": settings.redis_url,
        "IDP_SECRET_KEY": settings.secret_key,
        "IDP_ISSUER": settings.issuer,
        "IDP_MAIL_TRANSPORT": "smtp",
        "IDP_SMTP_HOST": "127.0.0.1",
        "IDP_SMTP_PORT": str(smtp.port),
    }
    return CliRunner().invoke(main, ["mail", "deliver"], env=env, catch_exceptions=False)


# --- (a) the worker stopped ---------------------------------------------------------------------
def test_with_the_worker_stopped_the_report_and_its_mail_wait_in_the_database(server, make_user, smtp):
    """The test server runs no worker: nothing delivers mail until ``darbaza mail deliver``."""
    person, address = person_with_mail(make_user)
    browser = signed_in_browser(server, person)
    answer = report_form(browser, "/account/report-problem", category="lost-device",
                         noticed=local_input(datetime.now(UTC) - timedelta(minutes=20)),
                         description="Phone left on the bus")
    assert answer.status_code == 200
    case = case_of(server, user_id=person.id)
    assert case.number in answer.text and case.state == "contained"
    assert steps(server, case) == ["report", "contain"]
    user = account(server, person.id)
    assert user.locked is True and user.must_change_password is True
    [confirmation] = mails(server, "breach_report_received", address)
    notices = [m for m in mails(server, "breach_case_new", SUPPORT) if case.number in m.body_text]
    assert len(notices) == 1
    # Stored, not sent: no delivery ran.
    assert confirmation.status == "pending" and notices[0].status == "pending"
    time.sleep(0.2)
    assert smtp.handler.messages == []

    # The worker comes back (here: one delivery pass from the command line).
    result = mail_deliver(server, smtp)
    assert result.exit_code == 0 and result.stdout.startswith("sent ")
    assert mails(server, "breach_report_received", address)[0].status == "sent"
    assert [m.status for m in mails(server, "breach_case_new", SUPPORT) if m.id == notices[0].id] == ["sent"]
    assert (address, confirmation.subject) in received(smtp)
    assert (SUPPORT, notices[0].subject) in received(smtp)
    # Sent once: a second pass sends neither again.
    mail_deliver(server, smtp)
    subjects = [str(m["Subject"]) for m in smtp.handler.messages]
    assert subjects.count(confirmation.subject) == 1 and subjects.count(notices[0].subject) == 1


# --- (b) the provider process killed right after the answer ----------------------------------------
@dataclass
class Provider:
    url: str
    proc: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL to gunicorn's master and its workers: no shutdown code runs."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def provider(server: LiveServer, database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Provider]:
    """A second provider process (``darbaza serve``, gunicorn) on a free loopback port, with
    the same database, Redis, keys and issuer as the test server, in its own process group."""
    port = free_port()
    env = provider_env(server, database_url, redis_url)
    darbaza = Path(sys.executable).with_name("darbaza")
    log_path = tmp_path / "provider.log"
    log = log_path.open("w")
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [str(darbaza), "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], log_path.read_text, "the provider")
        yield Provider(url, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()


def test_a_report_survives_the_provider_killed_right_after_its_answer(server, make_user, provider, smtp):
    person, address = person_with_mail(make_user)
    # Signed in through the provider process, and on a phone through the test server.
    laptop = browser_as(provider.url, CHROME_WINDOWS)
    assert laptop.sign_in(person.login, person.password).status_code == 303
    phone = signed_in_browser(server, person, SAFARI_IPHONE)
    assert len(server.services.sessions.list(person.id)) == 2

    answer = report_form(laptop, "/account/report-problem", category="unknown-activity",
                         noticed=local_input(datetime.now(UTC) - timedelta(hours=2)),
                         description="Marks changed that I did not change")
    provider.kill()
    assert answer.status_code == 200
    with pytest.raises(requests.RequestException):
        requests.get(provider.url + "/healthz", timeout=2)

    # Everything the answer promised is in the database and Redis.
    case = case_of(server, user_id=person.id)
    assert case.number in answer.text
    assert (case.door, case.category, case.state) == ("account", "unknown-activity", "contained")
    assert case.contained_at is not None and case.deadline_at is not None
    assert case.containment["sessions_ended"] == 2 and case.containment["locked"] is True
    assert steps(server, case) == ["report", "contain"]
    assert server.services.sessions.list(person.id) == []
    assert not is_signed_in(phone)
    user = account(server, person.id)
    assert user.must_change_password is True and user.locked is True
    [confirmation] = mails(server, "breach_report_received", address)
    [notice] = [m for m in mails(server, "breach_case_new", SUPPORT) if case.number in m.body_text]
    assert confirmation.status == notice.status == "pending"

    # Delivery runs later (the worker, or any process with the outbox) and sends both.
    deliver(server, smtp.port)
    assert mails(server, "breach_report_received", address)[0].status == "sent"
    assert (address, confirmation.subject) in received(smtp) and (SUPPORT, notice.subject) in received(smtp)
