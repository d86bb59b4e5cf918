"""The durable outbox: ``enqueue`` stores a rendered message in the caller's transaction,
``deliver_due`` (run by the worker) hands due messages to a mail transport with retries.

Delivery is at-least-once with a stable Message-ID: a message is claimed atomically, so two
workers never send the same row; only a worker that dies between the SMTP server's "250"
and marking the row sent leaves a message that is sent again (after ``CLAIM_LEASE``), with
the same Message-ID so mail systems can recognise the duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateNotFound
from sqlalchemy.orm import Session

from connectors.mail import MailPermanentError, MailTemporaryError, MailTransport
from idp.delivery_queue import claim, due_ids, naive_utc, reclaim_stale, retry_delay, settle
from idp.notify.models import OutboxMessage

log = logging.getLogger("darbaza.outbox")

TEMPLATES_DIR = Path(__file__).parent / "templates"
# The messages Darbaza sends and the context each needs (``school_name`` comes from the
# Outbox's defaults). Each has ``<name>.<locale>.txt`` in TEMPLATES_DIR for every locale.
# ``method`` is "totp" or "webauthn"; times and URLs come preformatted from the caller.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "password_changed": ("display_name", "changed_at"),
    "mfa_added": ("display_name", "method", "changed_at"),
    "mfa_removed": ("display_name", "method", "changed_at"),
    "recovery_codes_new": ("display_name", "changed_at"),
    # ``login`` too: siblings may share a parent's address, each gets their own link.
    "password_reset_link": ("display_name", "login", "reset_url", "expires_minutes"),
    # Instead of a link, for an account whose password the school directory manages.
    "password_reset_directory": ("display_name", "login"),
    # To the address being verified (new or current) and, on a change, to the old one.
    "email_verify": ("display_name", "login", "verify_url", "expires_hours"),
    "email_change_notice": ("display_name", "new_email", "changed_at"),
    "new_device_notice": ("display_name", "device", "ip", "signed_in_at", "report_url"),
    # Breach reports (idp/breach/service.py): the reporter's confirmation, tech support's
    # notice of a new case, and the reporter's notice that the case is resolved. Optional
    # flags: ``locked`` and (support) ``account_found``, ``late``; ``outcome`` (resolved).
    "breach_report_received": ("display_name", "case_number", "reported_at", "deadline"),
    "breach_case_new": ("case_number", "login", "door", "category", "reported_at", "noticed_at", "deadline",
                        "contact", "sessions_ended"),
    "breach_case_resolved": ("display_name", "case_number", "resolved_at"),
    # To the security officer (idp/breach/jobs.py): a case at 75% of its time, or overdue.
    "breach_escalation_75": ("case_number", "account", "reported_at", "deadline_at", "hours_left", "case_url"),
    "breach_escalation_overdue": ("case_number", "account", "reported_at", "deadline_at", "case_url"),
}
LOCALES = ("ky", "ru", "en")

# Retries back off as idp.delivery_queue.retry_delay says (30 s doubling, at most 1 h);
# a row left in 'sending' past its lease (CLAIM_LEASE there) is sent again.
BATCH_SIZE = 100
ERROR_TEXT_LIMIT = 2000


class OutboxError(ValueError):
    """A message cannot be queued as asked (unknown template, unsafe header, bad address)."""


class UnsafeHeaderError(OutboxError):
    """A header value holds a line break: it could add headers of its own (header injection)."""


def _single_line(name: str, value: str) -> str:
    if any(ch in value for ch in "\r\n\0"):
        raise UnsafeHeaderError(f"{name} must be a single line (it contains a line break)")
    return value


def _check_address(value: str) -> str:
    _single_line("recipient address", value)
    value = value.strip()
    _, addr = parseaddr(value)
    # Exactly one plain mailbox: no display-name tricks, lists or groups.
    if not addr or addr != value or addr.count("@") != 1 or any(c in addr for c in " ,;<>\"()"):
        raise OutboxError(f"not a single e-mail address: {value!r}")
    local, domain = addr.split("@")
    if not local or "." not in domain:
        raise OutboxError(f"not a single e-mail address: {value!r}")
    return addr


@dataclass(frozen=True)
class RenderedMessage:
    subject: str
    body: str


@dataclass
class DeliveryReport:
    """What one ``deliver_due`` pass did."""

    sent: int = 0
    retried: int = 0
    failed: int = 0
    reclaimed: int = 0


class Outbox:
    """Queues and delivers the e-mail Darbaza sends (policy 5.2.3: notices must not be lost)."""

    def __init__(
        self,
        *,
        mail_from: str,
        max_attempts: int = 20,
        default_locale: str = "ky",
        defaults: Mapping[str, Any] | None = None,
        templates_dir: Path = TEMPLATES_DIR,
    ) -> None:
        self.mail_from = _single_line("sender address", mail_from)
        self.max_attempts = max(1, max_attempts)
        self.default_locale = default_locale if default_locale in LOCALES else "ky"
        # Values every template may use (the school's name), below the caller's context.
        self.defaults = dict(defaults or {})
        # Plain text, not HTML: no autoescape. StrictUndefined: a missing value is a bug
        # in the caller, found while its transaction can still roll back.
        self._env = Environment(
            loader=FileSystemLoader(str(templates_dir)),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,  # noqa: S701 - plain-text mail, never HTML
        )
        self._domain = parseaddr(mail_from)[1].rpartition("@")[2] or "darbaza.invalid"

    # --- enqueue ------------------------------------------------------------------
    def locale_for(self, locale: str | None) -> str:
        base = (locale or "").split("-")[0].split("_")[0].lower()
        return base if base in LOCALES else self.default_locale

    def render(self, template: str, locale: str, context: Mapping[str, Any]) -> RenderedMessage:
        """Render ``<template>.<locale>.txt``: a ``Subject:`` line, a blank line, the body."""
        if template not in TEMPLATES:
            raise OutboxError(f"unknown mail template {template!r}")
        missing = [name for name in TEMPLATES[template] if name not in context]
        if missing:
            raise OutboxError(f"mail template {template!r} needs {', '.join(missing)}")
        name = f"{template}.{locale}.txt"
        try:
            source, _, _ = self._env.loader.get_source(self._env, name)  # type: ignore[union-attr]
        except TemplateNotFound as exc:
            raise OutboxError(f"mail template {template!r} has no {locale!r} version") from exc
        head, sep, body_source = source.partition("\n\n")
        if not sep or not head.startswith("Subject:") or "\n" in head:
            raise OutboxError(f"mail template {name} must start with one 'Subject:' line and a blank line")
        # Subject and body are rendered apart, so a line break coming from the context
        # shows up inside the subject (and is refused) instead of moving the split.
        values = {**self.defaults, **context}
        subject = self._env.from_string(head.removeprefix("Subject:")).render(values).strip(" ")
        subject = _single_line("subject", subject)
        body = self._env.from_string(body_source).render(values)
        return RenderedMessage(subject=subject, body=body.strip("\n") + "\n")

    def enqueue(
        self,
        session: Session,
        *,
        template: str,
        to: str,
        locale: str | None,
        context: Mapping[str, Any],
    ) -> OutboxMessage:
        """Render the message and add it to ``session``; it exists only if the caller commits."""
        address = _check_address(to)
        chosen = self.locale_for(locale)
        rendered = self.render(template, chosen, context)
        if len(rendered.subject) > 255:
            raise OutboxError("subject is longer than 255 characters")
        row = OutboxMessage(
            template=template,
            locale=chosen,
            to_address=address,
            subject=rendered.subject,
            body_text=rendered.body,
            status="pending",
            attempts=0,
            next_attempt_at=naive_utc(),
            message_id=make_msgid(domain=self._domain),
        )
        session.add(row)
        return row

    # --- deliver ------------------------------------------------------------------
    def build_email(self, row: OutboxMessage) -> EmailMessage:
        """The message exactly as it is sent at every attempt (same Message-ID and Date)."""
        message = EmailMessage()
        # set_content first: it drops every Content-* header set before it.
        message.set_content(row.body_text, charset="utf-8")
        message["From"] = self.mail_from
        message["To"] = Address(addr_spec=row.to_address)
        message["Subject"] = row.subject
        message["Date"] = format_datetime(row.created_at.replace(tzinfo=UTC))
        message["Message-ID"] = row.message_id
        message["Content-Language"] = row.locale
        # RFC 3834: machine-made mail; auto-responders should not answer it.
        message["Auto-Submitted"] = "auto-generated"
        return message

    def deliver_due(
        self,
        session_factory: Callable[[], Session],
        transport: MailTransport,
        now: datetime | None = None,
        *,
        limit: int = BATCH_SIZE,
    ) -> DeliveryReport:
        """Send the messages that are due at ``now``; safe to run in several workers at once."""
        now = naive_utc(now)
        report = DeliveryReport()
        report.reclaimed = reclaim_stale(session_factory, OutboxMessage, now)
        if report.reclaimed:
            log.warning("returned %d message(s) abandoned in 'sending' to the outbox", report.reclaimed)
        for message_id in due_ids(session_factory, OutboxMessage, due_by=now, limit=limit):
            row = claim(session_factory, OutboxMessage, message_id, due_by=now, now=now)
            if row is None:
                continue  # another worker took it first
            self._send_one(session_factory, transport, row, now, report)
        return report

    def _send_one(
        self,
        session_factory: Callable[[], Session],
        transport: MailTransport,
        row: OutboxMessage,
        now: datetime,
        report: DeliveryReport,
    ) -> None:
        values: dict[str, Any]
        try:
            transport.send(self.build_email(row))
        except MailPermanentError as exc:
            log.warning("message %s to the outbox failed for good: %s", row.message_id, exc)
            values = {"status": "failed", "last_error": str(exc)[:ERROR_TEXT_LIMIT]}
            report.failed += 1
        except MailTemporaryError as exc:
            if row.attempts >= self.max_attempts:
                log.warning("message %s failed after %d attempts: %s", row.message_id, row.attempts, exc)
                values = {"status": "failed", "last_error": str(exc)[:ERROR_TEXT_LIMIT]}
                report.failed += 1
            else:
                values = {
                    "status": "pending",
                    "last_error": str(exc)[:ERROR_TEXT_LIMIT],
                    "next_attempt_at": now + retry_delay(row.attempts),
                }
                report.retried += 1
        else:
            values = {"status": "sent", "sent_at": naive_utc(), "last_error": None}
            report.sent += 1
        # Only our own claim is updated: if the lease ran out and another worker
        # reclaimed the row meanwhile, its outcome wins.
        settle(session_factory, OutboxMessage, row, values)
