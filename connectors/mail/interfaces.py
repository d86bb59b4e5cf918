"""The contract every mail transport keeps, and the two ways a send can fail."""

from __future__ import annotations

from email.message import EmailMessage
from typing import Protocol


class MailError(Exception):
    """A message could not be handed to the mail system."""


class MailTemporaryError(MailError):
    """Worth trying again later: the server is down, busy or answered 4xx."""


class MailPermanentError(MailError):
    """Trying again cannot help: the server refused this message with a 5xx answer."""


class MailTransport(Protocol):
    """Hands one finished message to the mail system, or raises one of the errors above."""

    def send(self, message: EmailMessage) -> None: ...
