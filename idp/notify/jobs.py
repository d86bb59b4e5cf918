"""Wiring the outbox to settings, and the background job the worker runs."""

from __future__ import annotations

import logging
from dataclasses import asdict

from connectors.mail import MailTransport, NullTransport, SmtpTransport
from idp.config import Settings
from idp.db import Database
from idp.notify.outbox import Outbox

log = logging.getLogger("darbaza.outbox")


def build_mail_transport(settings: Settings) -> MailTransport:
    """The transport ``IDP_MAIL_TRANSPORT`` names: ``smtp`` or ``null``."""
    if settings.mail_transport == "null":
        return NullTransport()
    if settings.mail_transport != "smtp":
        raise ValueError(f"IDP_MAIL_TRANSPORT must be 'smtp' or 'null', not {settings.mail_transport!r}")
    return SmtpTransport(
        host=settings.smtp_host,
        port=settings.smtp_port,
        security=settings.smtp_security,
        username=settings.smtp_username,
        password=settings.smtp_password,
        timeout=settings.smtp_timeout,
    )


def build_outbox(settings: Settings) -> Outbox:
    return Outbox(
        mail_from=settings.mail_from,
        max_attempts=settings.mail_max_attempts,
        default_locale=settings.default_locale,
        defaults={"school_name": settings.school_name},
    )


def deliver_outbox() -> dict[str, int]:
    """RQ job: one delivery pass with the settings of the environment.

    RQ runs each job in a fresh forked process, so the job builds its own database
    engine (a pooled connection must not cross a fork) and disposes of it at the end.
    """
    settings = Settings.from_env()
    database = Database(settings.database_url, pool_size=1)
    try:
        report = build_outbox(settings).deliver_due(database.factory, build_mail_transport(settings))
    finally:
        database.dispose()
    if report.sent or report.retried or report.failed:
        log.info("outbox pass: %s", asdict(report))
    return asdict(report)
