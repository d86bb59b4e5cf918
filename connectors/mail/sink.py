"""A local SMTP sink for development (``darbaza mail sink``): every message it receives is
printed, decoded, and kept as an ``.eml`` file, so a person running the demo can read it."""

from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


def describe(message: EmailMessage) -> str:
    """From, To, Subject and the plain-text body, decoded, for a console."""
    part = message.get_body(preferencelist=("plain",))
    body = part.get_content() if part is not None else ""
    return (
        f"From:    {message['From']}\n"
        f"To:      {message['To']}\n"
        f"Subject: {message['Subject']}\n"
        f"Message-ID: {message['Message-ID']}\n\n"
        f"{body.rstrip()}\n"
    )


class SinkHandler:
    """aiosmtpd handler: parse, keep as ``.eml``, and pass the message on to ``on_message``."""

    def __init__(self, out_dir: Path | None, on_message: Callable[[EmailMessage], None]) -> None:
        self.out_dir = out_dir
        self.on_message = on_message
        self._lock = threading.Lock()
        self._count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        raw: bytes = envelope.original_content or envelope.content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        if self.out_dir is not None:
            with self._lock:
                self._count += 1
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
                path = self.out_dir / f"{stamp}-{self._count:04d}.eml"
            path.write_bytes(raw)
        self.on_message(message)
        return "250 Message accepted for delivery"


def start_sink(port: int, out_dir: Path | None, on_message: Callable[[EmailMessage], None]) -> Controller:
    """Start the sink on 127.0.0.1 only (it accepts anything, so never on a public address)."""
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    controller = Controller(SinkHandler(out_dir, on_message), hostname="127.0.0.1", port=port)
    controller.start()
    return controller
