"""Sending mail: one small interface (``MailTransport``), SMTP behind it, and a Null twin."""

from connectors.mail.interfaces import (
    MailError,
    MailPermanentError,
    MailTemporaryError,
    MailTransport,
)
from connectors.mail.null import NullTransport
from connectors.mail.smtp import SmtpSecurity, SmtpTransport

__all__ = [
    "MailError",
    "MailPermanentError",
    "MailTemporaryError",
    "MailTransport",
    "NullTransport",
    "SmtpSecurity",
    "SmtpTransport",
]
