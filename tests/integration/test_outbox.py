"""The outbox through a real SMTP server on loopback (aiosmtpd): a message is stored with
the change that causes it, delivered exactly once, waits out an outage, and a refusal
ends it instead of retrying forever."""

from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from sqlalchemy import delete, select

from connectors.mail import SmtpTransport
from idp.cli import main
from idp.db import Database
from idp.notify.models import OutboxMessage
from idp.notify.outbox import Outbox, OutboxError, UnsafeHeaderError
from tests.conftest import free_port

CONTEXT = {"display_name": "Айбек Асанов", "changed_at": "2026-11-25 10:00"}


class Recorder:
    """aiosmtpd handler that keeps what it receives, or refuses with ``reply``."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.reply: str | None = None
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.reply:
            return self.reply
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        with self._lock:
            self.messages.append(message)  # type: ignore[arg-type]
        return "250 OK"

    def ids(self) -> list[str]:
        return [str(m["Message-ID"]) for m in self.messages]


class SmtpServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.handler = Recorder()
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    # The database is shared by this process's tests: start from an empty outbox so a
    # delivery pass sends only what this test queued.
    with database.transaction() as session:
        session.execute(delete(OutboxMessage))
    yield database
    database.dispose()


@pytest.fixture
def outbox() -> Outbox:
    return Outbox(mail_from="Darbaza <no-reply@school.example>", max_attempts=20,
                  defaults={"school_name": "Demo School No. 1"})


def transport(smtp: SmtpServer) -> SmtpTransport:
    return SmtpTransport(host="127.0.0.1", port=smtp.port, timeout=5)


def stored(db: Database) -> list[OutboxMessage]:
    with db.factory() as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def test_rolled_back_change_sends_nothing(db, outbox, smtp):
    with pytest.raises(RuntimeError), db.transaction() as session:
        outbox.enqueue(session, template="password_changed", to="aibek@school.example", locale="ky", context=CONTEXT)
        raise RuntimeError("the change itself failed")
    assert stored(db) == []
    assert outbox.deliver_due(db.factory, transport(smtp)).sent == 0
    assert smtp.handler.messages == []


def test_committed_message_is_delivered_once_in_its_language(db, outbox, smtp):
    with db.transaction() as session:
        row = outbox.enqueue(session, template="password_changed", to="daniyar@school.example", locale="ru",
                             context=CONTEXT)
        message_id = row.message_id
    report = outbox.deliver_due(db.factory, transport(smtp))
    assert report.sent == 1
    # A second pass finds nothing left to send.
    assert outbox.deliver_due(db.factory, transport(smtp)).sent == 0
    [received] = smtp.handler.messages
    assert received["Subject"] == "Ваш пароль изменён"
    assert received["To"] == "daniyar@school.example"
    assert received["Message-ID"] == message_id
    assert received["Content-Language"] == "ru"
    assert "Айбек Асанов" in received.get_body(("plain",)).get_content()
    [row] = stored(db)
    assert (row.status, row.attempts, row.message_id) == ("sent", 1, message_id)
    assert row.sent_at is not None


def test_two_concurrent_passes_send_each_message_once(db, outbox, smtp):
    with db.transaction() as session:
        for n in range(8):
            outbox.enqueue(session, template="mfa_added", to=f"user{n}@school.example", locale="en",
                           context={**CONTEXT, "method": "totp"})
    barrier = threading.Barrier(2)
    reports = []

    def deliver() -> None:
        barrier.wait()
        reports.append(outbox.deliver_due(db.factory, transport(smtp)))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(r.sent for r in reports) == 8
    assert len(smtp.handler.ids()) == 8 == len(set(smtp.handler.ids()))
    assert {r.status for r in stored(db)} == {"sent"}


def test_message_waits_out_an_smtp_outage_then_goes_once(db, outbox, smtp):
    with db.transaction() as session:
        outbox.enqueue(session, template="new_device_notice", to="aigerim@school.example", locale="ky",
                       context={"display_name": "Айгерим", "device": "Firefox, Android", "ip": "192.0.2.7",
                                "signed_in_at": "2026-11-25 10:00", "report_url": "https://idp.example/r/x"})
    smtp.stop()
    now = datetime.now(UTC)
    report = outbox.deliver_due(db.factory, transport(smtp), now=now)
    assert (report.sent, report.retried) == (0, 1)
    [row] = stored(db)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.next_attempt_at > now.replace(tzinfo=None)
    assert "unreachable" in (row.last_error or "")

    smtp.start()
    # Not due yet: the backoff is respected even though the server is back.
    assert outbox.deliver_due(db.factory, transport(smtp), now=now + timedelta(seconds=5)).sent == 0
    assert outbox.deliver_due(db.factory, transport(smtp), now=now + timedelta(seconds=31)).sent == 1
    assert outbox.deliver_due(db.factory, transport(smtp), now=now + timedelta(hours=2)).sent == 0
    [received] = smtp.handler.messages
    assert received["Message-ID"] == row.message_id
    assert received["Subject"] == "Аккаунтуңузга жаңы түзмөктөн кирүү болду"
    [row] = stored(db)
    assert (row.status, row.attempts) == ("sent", 2)


def test_permanent_refusal_fails_without_retrying(db, outbox, smtp):
    smtp.handler.reply = "550 5.1.1 mailbox unavailable"
    with db.transaction() as session:
        outbox.enqueue(session, template="recovery_codes_new", to="nobody@school.example", locale="en",
                       context=CONTEXT)
    now = datetime.now(UTC)
    assert outbox.deliver_due(db.factory, transport(smtp), now=now).failed == 1
    for hours in (1, 5, 48):
        assert outbox.deliver_due(db.factory, transport(smtp), now=now + timedelta(hours=hours)).sent == 0
    [row] = stored(db)
    assert (row.status, row.attempts) == ("failed", 1)
    assert "550" in (row.last_error or "")


def test_temporary_refusals_stop_after_max_attempts(db, smtp):
    outbox = Outbox(mail_from="no-reply@school.example", max_attempts=3, defaults={"school_name": "S"})
    smtp.handler.reply = "451 4.3.0 try again later"
    with db.transaction() as session:
        outbox.enqueue(session, template="password_changed", to="a@school.example", locale="en", context=CONTEXT)
    now = datetime.now(UTC)
    for _ in range(5):
        now += timedelta(hours=2)
        outbox.deliver_due(db.factory, transport(smtp), now=now)
    [row] = stored(db)
    assert (row.status, row.attempts) == ("failed", 3)
    assert "451" in (row.last_error or "")


def test_sending_row_abandoned_by_a_dead_worker_is_sent_again(db, outbox, smtp):
    with db.transaction() as session:
        row = outbox.enqueue(session, template="password_changed", to="a@school.example", locale="en",
                             context=CONTEXT)
        row.status = "sending"
        row.next_attempt_at = datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=10)
    now = datetime.now(UTC)
    assert outbox.deliver_due(db.factory, transport(smtp), now=now).sent == 0
    report = outbox.deliver_due(db.factory, transport(smtp), now=now + timedelta(minutes=11))
    assert (report.reclaimed, report.sent) == (1, 1)


@pytest.mark.parametrize(
    "to",
    ["victim@school.example\r\nBcc: all@school.example", "a@school.example\nX: y", "a@b.example, c@d.example",
     "Evil <a@b.example>", "not-an-address"],
)
def test_unsafe_recipient_is_refused(db, outbox, to):
    with pytest.raises(OutboxError), db.transaction() as session:
        outbox.enqueue(session, template="password_changed", to=to, locale="en", context=CONTEXT)
    assert stored(db) == []


def test_line_break_in_subject_is_refused(db, tmp_path: Path):
    (tmp_path / "password_changed.en.txt").write_text("Subject: Hello {{ display_name }}\n\nBody\n")
    outbox = Outbox(mail_from="no-reply@school.example", templates_dir=tmp_path)
    with pytest.raises(UnsafeHeaderError), db.transaction() as session:
        outbox.enqueue(session, template="password_changed", to="a@school.example", locale="en",
                       context={"display_name": "x\r\nBcc: all@school.example", "changed_at": "now"})
    assert stored(db) == []


def run(server, *args: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    """The CLI as an operator runs it (see tests/integration/test_cli.py), plus ``env``."""
    settings = server.services.settings
    base = {
        "IDP_DATABASE_URL": settings.database_url,
        "IDP_REDIS_URL": settings.redis_url,
        "IDP_SECRET_KEY": settings.secret_key,
        "IDP_ISSUER": settings.issuer,
    }
    return CliRunner().invoke(main, list(args), env={**base, **env}, catch_exceptions=False)


def test_cli_mail_deliver_sends_pending_message(server, smtp):
    svc = server.services
    with svc.db.transaction() as session:
        session.execute(delete(OutboxMessage))
        svc.outbox.enqueue(session, template="password_reset_link", to="bolot@school.example", locale="ky",
                           context={"display_name": "Болот", "login": "bolot", "reset_url": "https://idp.example/reset/abc",
                                    "expires_minutes": 30})
    result = run(server, "mail", "deliver", env={"IDP_SMTP_PORT": str(smtp.port)})
    assert result.exit_code == 0, result.output
    assert "sent 1" in result.output
    [received] = smtp.handler.messages
    assert received["Subject"] == "Сырсөздү калыбына келтирүү"
    assert "https://idp.example/reset/abc" in received.get_body(("plain",)).get_content()
