"""OpenID Connect Back-Channel Logout 1.0 (checklist P12, BC1-BC2): when a browser session
ends, every portal app used from it that registered a ``backchannel_logout_uri`` is sent a
signed logout token.

``remember_app`` notes each app that got a code or tokens for a session (Redis sorted
set ``sid-apps:{sid}``, ``idp/sessions/records.py``). ``queue_for_session`` (called by
the session registry for every session that ends) stores one
``BackchannelLogoutDelivery`` per app in the caller's transaction, so a logout is
queued exactly when the session end is committed; the registry then deletes
``sid-apps:{sid}``.
``deliver_due`` (the worker's job ``deliver_backchannel_logouts``, or ``darbaza logout
deliver``) POSTs the tokens with a short timeout and retries with growing delays, the way
the mail outbox does (idp/delivery_queue.py); a retry sends a freshly minted token, since
a logout token lives two minutes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from redis import Redis
from redis.client import Pipeline
from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.accounts.models import User
from idp.audit.journal import Journal
from idp.config import Settings
from idp.db import Database
from idp.delivery_queue import (
    SessionFactory,
    claim,
    due_ids,
    naive_utc,
    reclaim_stale,
    retry_delay,
    settle,
)
from idp.oidc.clients import is_loopback
from idp.oidc.keys import build_key_service
from idp.oidc.models import BackchannelLogoutDelivery, Client
from idp.oidc.tokens import LOGOUT_TOKEN_LIFETIME, TokenService
from idp.sessions.records import REMEMBER_APP, apps_key

log = logging.getLogger("darbaza.backchannel")

# Few per pass: each POST may take up to the timeout, and a pass must end well within
# the worker's job timeout; the next pass comes a few seconds later.
BATCH_SIZE = 25
ERROR_TEXT_LIMIT = 2000
# A stored token with less time than this left is minted again before it is sent.
MIN_TOKEN_VALIDITY = timedelta(seconds=30)
USER_AGENT = "Darbaza back-channel logout"


def undeliverable_reason(uri: str, *, require_https: bool) -> str | None:
    """Why logout tokens may not be POSTed to ``uri``, or None when they may: an absolute
    http(s) URL without a fragment; https when the issuer is https, except on loopback."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        return "not a URL"
    if parts.scheme not in {"http", "https"} or not host:
        return "not an absolute http(s) URL"
    if parts.fragment or "#" in uri:
        return "the URL has a fragment"
    if require_https and parts.scheme != "https" and not is_loopback(host):
        return "https is required"
    return None


@dataclass
class BackchannelReport:
    """What one ``deliver_due`` pass did."""

    delivered: int = 0
    retried: int = 0
    failed: int = 0
    reclaimed: int = 0


class BackchannelLogout:
    """Queues and delivers logout tokens to the portal apps of an ended session."""

    def __init__(
        self,
        *,
        settings: Settings,
        tokens: TokenService,
        journal: Journal,
        redis: Redis | None = None,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.journal = journal
        # Only ``remember_app`` needs Redis; the worker's delivery job has none.
        self.redis = redis
        self.max_attempts = max(1, settings.backchannel_max_attempts)
        self.timeout = max(1, settings.backchannel_timeout)
        # At least as long as a session can live, so no app of a live session is forgotten.
        self.apps_ttl = max(1, settings.session_absolute_timeout)

    # --- apps used from a session ---------------------------------------------------
    def remember_app(self, sid: str | None, client_id: str, *, pipe: Pipeline | None = None) -> None:
        """Note that ``client_id`` got a code or tokens for the browser session ``sid``
        (in ``pipe`` when given: sent with the caller's other commands)."""
        target = pipe if pipe is not None else self.redis
        if not sid or target is None:
            return
        target.eval(REMEMBER_APP, 1, apps_key(sid), client_id, int(time.time()), self.apps_ttl)

    # --- queueing -------------------------------------------------------------------
    def queue_for_session(
        self, db: Session, *, user_id: int, sid: str | None, client_ids: Iterable[str]
    ) -> int:
        """Add a delivery for each active app among ``client_ids`` with a back-channel
        logout URI; returns how many. Nothing is sent before the caller commits."""
        wanted = sorted({c for c in client_ids if c})
        if not wanted:
            return 0
        user = db.get(User, user_id)
        subject = user.subject if user is not None else None
        if not subject and not sid:
            return 0
        clients = db.scalars(
            select(Client).where(
                Client.client_id.in_(wanted),
                Client.active.is_(True),
                Client.backchannel_logout_uri.is_not(None),
            )
        )
        queued = 0
        for client in clients:
            uri = client.backchannel_logout_uri or ""
            problem = undeliverable_reason(uri, require_https=self.settings.is_https)
            if problem:
                log.warning("no back-channel logout to %s: %s", client.client_id, problem)
                continue
            if client.backchannel_logout_session_required and not sid:
                # §2.2: such an app must get a sid, and this session has none.
                log.warning("no back-channel logout to %s: it requires a sid", client.client_id)
                continue
            db.add(
                BackchannelLogoutDelivery(
                    client_id=client.client_id,
                    uri=uri,
                    sid=sid,
                    subject=subject or "",
                    logout_token=self.tokens.logout_token(client_id=client.client_id, subject=subject, sid=sid),
                    status="pending",
                    attempts=0,
                    next_attempt_at=naive_utc(),
                )
            )
            queued += 1
        return queued

    # --- delivering -----------------------------------------------------------------
    def deliver_due(
        self,
        session_factory: SessionFactory,
        now: datetime | None = None,
        *,
        retry_waiting: bool = False,
        limit: int = BATCH_SIZE,
    ) -> BackchannelReport:
        """POST the logout tokens that are due at ``now`` (with ``retry_waiting``, also those
        waiting for a later retry); safe to run in several workers at once."""
        now = naive_utc(now)
        report = BackchannelReport()
        report.reclaimed = reclaim_stale(session_factory, BackchannelLogoutDelivery, now)
        due_by = None if retry_waiting else now
        for row_id in due_ids(session_factory, BackchannelLogoutDelivery, due_by=due_by, limit=limit):
            row = claim(session_factory, BackchannelLogoutDelivery, row_id, due_by=due_by, now=now)
            if row is None:
                continue  # another worker took it first
            self._deliver_one(session_factory, row, now, report)
        return report

    def _token_for(self, row: BackchannelLogoutDelivery) -> str | None:
        """The token to send: the stored one on a first, prompt try; else a fresh one (the
        stored one may have expired, and the app may have seen its jti already)."""
        fresh_until = row.created_at + timedelta(seconds=LOGOUT_TOKEN_LIFETIME) - MIN_TOKEN_VALIDITY
        if row.attempts <= 1 and naive_utc() < fresh_until:
            return None
        return self.tokens.logout_token(client_id=row.client_id, subject=row.subject or None, sid=row.sid)

    def _post(self, uri: str, token: str) -> str | None:
        """POST the token (§2.5); None when the app answered 2xx, else what went wrong."""
        try:
            # No redirects: the token goes to the registered URI only.
            with requests.post(
                uri,
                data={"logout_token": token},
                headers={"User-Agent": USER_AGENT},
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                if 200 <= response.status_code < 300:
                    return None
                # §2.8: an app may explain a refusal in a small JSON body.
                body = response.raw.read(500, decode_content=True) or b""
                return f"HTTP {response.status_code}: {body.decode('utf-8', 'replace')}".strip()
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"

    def _deliver_one(
        self, session_factory: SessionFactory, row: BackchannelLogoutDelivery, now: datetime, report: BackchannelReport
    ) -> None:
        values: dict[str, Any] = {}
        error = undeliverable_reason(row.uri, require_https=self.settings.is_https)
        final = error is not None
        if error is None:
            fresh = self._token_for(row)
            if fresh is not None:
                values["logout_token"] = fresh
            error = self._post(row.uri, fresh or row.logout_token)
        if error is None:
            values.update(status="delivered", delivered_at=naive_utc(), last_error=None)
            if settle(session_factory, BackchannelLogoutDelivery, row, values):
                report.delivered += 1
            return
        error = error[:ERROR_TEXT_LIMIT]
        if final or row.attempts >= self.max_attempts:
            log.warning("back-channel logout %s to %s failed after %d attempts: %s",
                        row.id, row.client_id, row.attempts, error)
            values.update(status="failed", last_error=error)

            def journal_failure(session: Session) -> None:
                user_id = session.scalar(select(User.id).where(User.subject == row.subject)) if row.subject else None
                self.journal.record(
                    session,
                    actor="system",
                    action="oidc:backchannel:failed",
                    subject=f"user:{user_id}" if user_id else None,
                    reason=error,
                    details={"client_id": row.client_id, "uri": row.uri, "attempts": row.attempts},
                )

            if settle(session_factory, BackchannelLogoutDelivery, row, values, then=journal_failure):
                report.failed += 1
            return
        values.update(status="pending", last_error=error, next_attempt_at=now + retry_delay(row.attempts))
        if settle(session_factory, BackchannelLogoutDelivery, row, values):
            report.retried += 1


def build_backchannel(settings: Settings, session_factory: SessionFactory, redis: Redis | None = None) -> BackchannelLogout:
    """A ``BackchannelLogout`` with its own key service (for worker jobs)."""
    tokens = TokenService(settings=settings, keys=build_key_service(settings, session_factory))
    return BackchannelLogout(settings=settings, tokens=tokens, journal=Journal(), redis=redis)


def deliver_backchannel_logouts() -> dict[str, int]:
    """RQ job: one delivery pass with the settings of the environment. Like the outbox
    job (idp/notify/jobs.py), it builds its own database engine in RQ's forked process."""
    settings = Settings.from_env()
    database = Database(settings.database_url, pool_size=1)
    try:
        report = build_backchannel(settings, database.factory).deliver_due(database.factory)
    finally:
        database.dispose()
    if report.delivered or report.retried or report.failed:
        log.info("back-channel logout pass: %s", asdict(report))
    return asdict(report)
