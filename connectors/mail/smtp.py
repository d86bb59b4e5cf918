"""Sending through an SMTP server with ``smtplib``."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from enum import StrEnum

from connectors.mail.interfaces import MailPermanentError, MailTemporaryError


class SmtpSecurity(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    SSL = "ssl"


def _classify(code: int, text: str) -> MailTemporaryError | MailPermanentError:
    # RFC 5321 4.2.1: 4yz is a transient failure, 5yz a permanent one.
    if 500 <= code < 600:
        return MailPermanentError(f"SMTP {code}: {text}")
    return MailTemporaryError(f"SMTP {code}: {text}")


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


class SmtpTransport:
    """One SMTP connection per message: the worker sends rarely, so no pool is kept."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: SmtpSecurity | str = SmtpSecurity.NONE,
        username: str = "",
        password: str = "",
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.security = SmtpSecurity(security)
        self.username = username
        self.password = password
        self.timeout = timeout
        self._ssl_context = ssl_context

    def _connect(self) -> smtplib.SMTP:
        context = self._ssl_context or ssl.create_default_context()
        if self.security is SmtpSecurity.SSL:
            return smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        if self.security is SmtpSecurity.STARTTLS:
            client.starttls(context=context)
        return client

    def send(self, message: EmailMessage) -> None:
        try:
            with self._connect() as client:
                if self.username:
                    client.login(self.username, self.password)
                client.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            # One recipient per message: its answer decides.
            code, text = next(iter(exc.recipients.values()))
            raise _classify(code, _text(text)) from exc
        except (smtplib.SMTPAuthenticationError, smtplib.SMTPNotSupportedError) as exc:
            # Wrong credentials or a server without STARTTLS are the operator's to fix;
            # the message itself is fine and must go out once they have, so: temporary.
            raise MailTemporaryError(f"SMTP configuration problem: {exc}") from exc
        except smtplib.SMTPResponseException as exc:
            raise _classify(exc.smtp_code, _text(exc.smtp_error)) from exc
        except (smtplib.SMTPException, OSError) as exc:
            # Refused connection, timeout, dropped connection, TLS failure.
            raise MailTemporaryError(f"SMTP server {self.host}:{self.port} unreachable: {exc.__class__.__name__}: {exc}") from exc
