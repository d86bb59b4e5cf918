"""Completing and ending a browser sign-in: one place that rotates the session id,
records what was done (amr/acr) and where from, keeps the account within its
concurrent-session limit, and ends what a sign-out must end."""

from __future__ import annotations

import logging
import math
import secrets
import time
from typing import Any

from flask import g, request, session
from flask_login import login_user, logout_user

from idp.access.decision import session_policy
from idp.access.networks import network_of
from idp.accounts.models import User
from idp.services import services
from idp.sessions.devices import MAX_UA, describe_device
from idp.sessions.registry import SessionLimitReached

log = logging.getLogger("darbaza.login")

ACR_SINGLE_FACTOR = "urn:darbaza:loa:1"
ACR_MULTI_FACTOR = "urn:darbaza:loa:2"

__all__ = ["SessionLimitReached", "acr_for", "complete_sign_in", "end_current_session", "sign_out"]


def acr_for(amr: list[str]) -> str:
    """The acr of what was done; the session keeps only ``amr`` and derives its acr."""
    # N26: the acr says what was really done. "mfa" is added only by the pending chain
    # (idp/login/pending.py) when a second factor was verified, or by a passkey with
    # user verification (possession plus the device's PIN or biometric).
    return ACR_MULTI_FACTOR if "mfa" in amr else ACR_SINGLE_FACTOR


def complete_sign_in(user: User, amr: list[str]) -> None:
    """Start a fresh authenticated session (ASVS 7.2.4: new id at every authentication).

    The session records where it comes from (IP, a device label parsed from the
    User-Agent, the named network) and its own idle and absolute timeouts from the
    session policy (when they differ from the defaults); it is created in Redis here,
    atomically within the account's limit of concurrent sessions. At the limit the
    policy either refuses (``SessionLimitReached`` is raised and nothing changes) or
    ends the oldest session the normal way. Commits."""
    svc = services()
    db = svc.db.session
    now = time.time()
    ip = request.remote_addr
    user_agent = (request.headers.get("User-Agent") or "")[:MAX_UA]
    policy = session_policy(db, user, ip=ip, now=svc.clock(), settings=svc.settings)
    sid = secrets.token_urlsafe(24)
    data: dict[str, Any] = {k: session[k] for k in ("lang", "ui_locales") if k in session}
    # Compact on purpose (Redis bytes per session, docs/capacity.md): whole seconds where
    # a second is precise enough; ``authenticated_at`` to the millisecond, rounded up so
    # that a sign-in is never dated before a flow that started just before it
    # (prompt=login, ``idp/oidc/authorize.py``); no ``acr`` (``acr_for(amr)`` says it);
    # timeouts only when they differ from the settings' defaults (the readers fall back
    # to those, ``idp/sessions/records.py``).
    data.update(
        uid=user.id,
        sid=sid,
        auth_time=int(now),
        authenticated_at=math.ceil(now * 1000) / 1000,
        last_seen=int(now),
        amr=amr,
        ip=ip,
        # The device label only, not the raw User-Agent: the label is what "My sessions",
        # the console, breach cases, sharing signals and the new-device notice show and
        # compare; nothing reads the raw header.
        device=describe_device(user_agent),
        network=network_of(ip, svc.settings.networks),
    )
    if policy.idle_timeout != svc.settings.session_idle_timeout:
        data["idle_timeout"] = policy.idle_timeout
    if policy.absolute_timeout != svc.settings.session_absolute_timeout:
        data["absolute_timeout"] = policy.absolute_timeout
    token = secrets.token_urlsafe(32)
    try:
        evicted, replaced = svc.sessions.create(
            user.id, token, data, max_sessions=policy.max_sessions, at_limit=policy.at_session_limit,
            replaces_token=getattr(session, "token", None),
        )
    except SessionLimitReached as exc:
        exc.user_id = user.id
        raise
    for ended in evicted:
        svc.sessions.finish(db, ended)
        svc.journal.record(
            db, actor="system", action="account:session:end", subject=f"user:{user.id}", reason="session-limit",
            ip=ip, request_id=getattr(g, "request_id", None),
            details={"sid": ended.sid, "device": ended.data.get("device"), "limit": policy.max_sessions,
                     "new_sid": sid},
        )
    if replaced is not None:
        # This browser's earlier signed-in session, replaced by this one.
        svc.sessions.finish(db, replaced)
    session.adopt(token, data)  # type: ignore[attr-defined]
    login_user(user)
    # flask-login's "_id" (a hash of IP and User-Agent) is read only by its session
    # protection, which is off (idp/app.py: the id is rotated and checked server-side),
    # and "_fresh" only by fresh_login_required / login_fresh, which are not used: both
    # would be ~150 bytes of every session in Redis for nothing. "_user_id" stays (the
    # user loader is given it).
    session.pop("_id", None)
    session.pop("_fresh", None)
    db.commit()
    _check_sharing(user, sid)
    _notice_new_device(user, data)


def _notice_new_device(user: User, data: dict[str, Any]) -> None:
    """Issue 6 ("This wasn't me"): a sign-in from a device the account has not used
    before mails the person a notice with a link to report it (idp/breach/new_device.py).
    A failure there must not undo the sign-in; it is logged."""
    from datetime import UTC, datetime

    from flask import url_for

    from idp.breach.new_device import check_new_device

    svc = services()
    db = svc.db.session
    try:
        check_new_device(
            db, svc.redis, svc.outbox, user, device=data.get("device"), ip=data.get("ip"),
            network=data.get("network"), sid=str(data["sid"]),
            signed_in_at=datetime.fromtimestamp(float(data["authenticated_at"]), UTC),
            report_url=lambda token: svc.settings.issuer + url_for("breach.not_me", token=token),
        )
        db.commit()
    except Exception:
        log.exception("new-device notice failed for user %s", user.id)
        db.rollback()


def _check_sharing(user: User, sid: str) -> None:
    """Policy 5.2.1: look for signs that the account is shared (idp/sessions/signals.py).
    A failure there must not undo the sign-in; it is logged."""
    from idp.sessions.signals import after_sign_in

    svc = services()
    db = svc.db.session
    try:
        after_sign_in(db, svc.redis, svc.settings, user, svc.sessions.list(user.id), new_sid=sid,
                      journal=svc.journal, request_id=getattr(g, "request_id", None))
        db.commit()
    except Exception:
        log.exception("account-sharing check failed for user %s", user.id)
        db.rollback()


def end_current_session(reason: str) -> int | None:
    """End this browser's signed-in session the normal way (tokens revoked, portal apps
    told); the account id it belonged to, or None when it was not signed in. Commits;
    the caller clears or destroys the Flask session."""
    uid, sid = session.get("uid"), session.get("sid")
    if uid is None or not sid:
        return None
    svc = services()
    db = svc.db.session
    if not svc.sessions.end(db, int(uid), str(sid), reason=reason, actor=f"user:{uid}"):
        # Already gone (timed out, ended elsewhere): its tokens end all the same.
        svc.tokens.revoke_session(db, str(sid))
    db.commit()
    return int(uid)


def sign_out() -> None:
    """End the browser session and revoke the tokens that were bound to it."""
    end_current_session("sign-out")
    logout_user()
    session.destroy()  # type: ignore[attr-defined]
