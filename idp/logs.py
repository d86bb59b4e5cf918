"""Logs: one JSON object per line (or plain text), with the request id, and never a secret.

``IDP_LOG_FORMAT`` chooses ``json`` (the default, for every deployment: ``darbaza
serve``, ``darbaza worker``, the Docker image, ``make run``) or ``text`` (for a person
reading a console). Both go to standard error through the same redaction filter.

A JSON line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
``request_id`` of the request being served (and ``client_request_id`` when a client sent
an ``X-Request-ID`` that was not taken, see idp/app.py), ``exc`` for a stack trace, and
the extra fields of the line. Each request ends with one access line (logger
``darbaza.access``): ``method``, ``path`` (never the query string, which carries codes,
states and tokens; path parts that are secrets, such as a reset link's token, are
masked), ``route``, ``status``, ``duration_ms``, ``remote_addr``. gunicorn's own access
log is off (it prints query strings); its error log uses the same formatter
(``GunicornLogger``).

Redaction (``RedactFilter``, on the handlers, so it covers every logger): values of keys
that name a secret (password, secret, token, code, authorization, cookie,
client_assertion, refresh_token, id_token_hint, ...) in ``key=value``, ``key: value`` and
JSON ``"key": "value"`` forms, ``Bearer``/``Basic`` credentials, and anything shaped like
a JWT, are replaced by ``[redacted]`` in the message, the stack trace and string extras."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

MASK = "[redacted]"
SECRET_KEYS = (
    r"password|passwd|new_password|current_password|secret|client_secret|token|access_token|refresh_token"
    r"|id_token|id_token_hint|logout_token|code|code_verifier|otp|totp|recovery_code|authorization|cookie"
    r"|set-cookie|client_assertion|assertion|api_key|apikey|session|csrf_token|private_key"
)
_KEY_VALUE = re.compile(
    rf"""(?ix)
    (?P<key>["']?\b(?:[\w-]*[_-])?(?:{SECRET_KEYS})\b["']?)   # a key naming a secret, maybe quoted
    (?P<sep>\s*[=:]\s*)
    (?P<value>"[^"]*"|'[^']*'|(?:Bearer|Basic)\s+[^\s,;&]+|[^\s,;&'")}}\]]+)"""
)
_AUTH_SCHEME = re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
# Request-line fields that are never secret.
_PLAIN_EXTRAS = ("method", "path", "route", "status", "duration_ms", "remote_addr", "request_id",
                 "client_request_id")
# LogRecord attributes (anything else given as ``extra=`` is logged as a field).
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def redact(text: str) -> str:
    """Mask secrets in free text."""
    if not text:
        return text
    text = _JWT.sub(MASK, text)

    def _mask(match: re.Match[str]) -> str:
        value = match.group("value")
        quote = value[0] if value[:1] in "\"'" else ""
        return f"{match.group('key')}{match.group('sep')}{quote}{MASK}{quote}"

    text = _KEY_VALUE.sub(_mask, text)
    return _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {MASK}", text)


def _is_secret_key(name: str) -> bool:
    return re.fullmatch(rf"(?i)(?:[\w-]*[_-])?(?:{SECRET_KEYS})", name) is not None


class RedactFilter(logging.Filter):
    """Renders the message once, masks secrets in it, its stack trace and its extras."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what was given
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in list(vars(record).items()):
            if key in _RESERVED or key in _PLAIN_EXTRAS:
                continue
            if _is_secret_key(key):
                setattr(record, key, MASK)
            elif isinstance(value, str):
                setattr(record, key, redact(value))
        return True


def _request_ids() -> dict[str, str]:
    try:
        from flask import g, has_request_context
    except ImportError:  # pragma: no cover - Flask is a dependency
        return {}
    if not has_request_context():
        return {}
    ids = {}
    for name in ("request_id", "client_request_id"):
        value = getattr(g, name, None)
        if value:
            ids[name] = str(value)
    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        body.update(_request_ids())
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                body[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            body["exc"] = record.exc_text
        if record.stack_info:
            body["stack"] = record.stack_info
        return json.dumps(body, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _request_ids()
        extras = {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}
        extras.update(ids)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def formatter_for(log_format: str) -> logging.Formatter:
    return TextFormatter() if log_format == "text" else JsonFormatter()


def setup_logging(level: str = "INFO", log_format: str = "json") -> None:
    """Give the root logger our handler on stderr (once per process; later calls only
    change the level and format). Other handlers (pytest's) are left alone."""
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    handler = next((h for h in root.handlers if getattr(h, "_darbaza", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._darbaza = True  # type: ignore[attr-defined]
        handler.addFilter(RedactFilter())
        root.addHandler(handler)
    handler.setFormatter(formatter_for(log_format))
    # Python's warnings become log lines too (one format on stderr).
    logging.captureWarnings(True)


try:  # gunicorn is a dependency, but the module is imported by tools without it too
    from gunicorn.glogging import Logger as _GunicornLogger
except ImportError:  # pragma: no cover
    _GunicornLogger = object  # type: ignore[assignment,misc]


class GunicornLogger(_GunicornLogger):  # type: ignore[misc,valid-type]
    """gunicorn's logger with our formatter and redaction on its error (and, if someone
    turns it on, access) log: ``--logger-class idp.logs.GunicornLogger``."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        log_format = os.environ.get("IDP_LOG_FORMAT", "json").strip().lower()
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(formatter_for(log_format))
                if not any(isinstance(f, RedactFilter) for f in handler.filters):
                    handler.addFilter(RedactFilter())


# --- request ids and the access line ----------------------------------------------------
access_log = logging.getLogger("darbaza.access")


def _safe_path() -> str:
    from flask import request

    path = request.path
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and value and (_is_secret_key(name) or name.endswith(("_token", "flow_id"))):
            path = path.replace(value, MASK)
    return path


def init_app(app: Any, trusted_proxies: int) -> None:
    """Give every request an id (``g.request_id``, echoed as ``X-Request-ID``) and log one
    access line when it ends. Register before other request hooks, so that even a request
    they refuse has its id.

    A client's ``X-Request-ID`` becomes the request id (and goes into the audit journal)
    only behind a trusted proxy (``IDP_TRUSTED_PROXIES`` > 0), which must set or overwrite
    it. Otherwise our own id is used and a plain client value is only logged as
    ``client_request_id``: a client cannot choose the id its actions are journalled under."""
    import time
    import uuid

    from flask import g, request

    @app.before_request
    def _request_id() -> None:
        g.access_started = time.perf_counter()
        incoming = request.headers.get("X-Request-ID", "")
        plain = 8 <= len(incoming) <= 64 and incoming.replace("-", "").isalnum()
        if plain and trusted_proxies > 0:
            g.request_id = incoming
            return
        g.request_id = uuid.uuid4().hex
        if plain:
            g.client_request_id = incoming

    @app.after_request
    def _access_line(response: Any) -> Any:
        if getattr(g, "request_id", None):
            response.headers["X-Request-ID"] = g.request_id
        started = getattr(g, "access_started", None)
        duration = round((time.perf_counter() - started) * 1000, 1) if started is not None else None
        path = _safe_path()
        access_log.info(
            "%s %s %s", request.method, path, response.status_code,
            extra={"method": request.method, "path": path,
                   "route": request.url_rule.rule if request.url_rule is not None else None,
                   "status": response.status_code, "duration_ms": duration, "remote_addr": request.remote_addr},
        )
        return response
