"""The log redaction filter and formatters (idp/logs.py): secrets never reach a log line."""

from __future__ import annotations

import json
import logging

import pytest

from idp.logs import MASK, JsonFormatter, RedactFilter, TextFormatter, redact

JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhYmMiLCJleHAiOjF9.c2lnbmF0dXJlLXZhbHVl"


@pytest.mark.parametrize("text, secret", [
    ("login failed password=hunter2-SECRET-xyz for x", "hunter2-SECRET-xyz"),
    ("POST /token code=AbC123def&state=x", "AbC123def"),
    ('{"client_secret": "s3cr3t-value", "name": "app"}', "s3cr3t-value"),
    ("{'refresh_token': 'rt-Value-1234'}", "rt-Value-1234"),
    ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
    ("header Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    (f"hint {JWT} given", JWT),
    ("id_token_hint=xyz.abc.def", "xyz.abc.def"),
    ("client_assertion: longassertionvalue", "longassertionvalue"),
    ("cookie=__Host-session=abcdef123456", "abcdef123456"),
    ("new_password: correct-horse", "correct-horse"),
])
def test_redact_masks_secrets(text: str, secret: str) -> None:
    masked = redact(text)
    assert secret not in masked and MASK in masked


def test_redact_leaves_ordinary_text() -> None:
    text = "GET /login 200 user:42 took 12 ms (status: ok)"
    assert redact(text) == text


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("darbaza.test", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_filter_masks_arguments_extras_and_tracebacks() -> None:
    try:
        raise ValueError("bad refresh_token=rt-in-exception-999")
    except ValueError:
        import sys

        record = _record("user %s sent password=%s", "bob", "pw-in-args-123",
                         token="extra-token-value", note=f"saw {JWT}", status=401)
        record.exc_info = sys.exc_info()
    assert RedactFilter().filter(record)
    line = JsonFormatter().format(record)
    body = json.loads(line)
    for secret in ("pw-in-args-123", "extra-token-value", JWT, "rt-in-exception-999"):
        assert secret not in line
    assert body["message"] == f"user bob sent password={MASK}"
    assert body["token"] == MASK and body["status"] == 401 and body["logger"] == "darbaza.test"
    assert "ValueError" in body["exc"]
    text = TextFormatter().format(record)
    assert "pw-in-args-123" not in text and "token=" + MASK in text
