"""The Null twin: a deployment without mail (or a test that does not look at it)."""

from __future__ import annotations

import logging
from email.message import EmailMessage

log = logging.getLogger("darbaza.mail")


class NullTransport:
    """Accepts every message and drops it; the log says so at debug level."""

    def send(self, message: EmailMessage) -> None:
        # Only the Message-ID: the body may hold a reset link, which must not reach logs.
        log.debug("mail transport is off; dropped message %s", message.get("Message-ID"))
