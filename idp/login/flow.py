"""Completing and ending a browser sign-in: one place that rotates the session id,
records what was done (amr/acr) and revokes what a sign-out must end."""

from __future__ import annotations

import secrets
import time

from flask import session
from flask_login import login_user, logout_user

from idp.accounts.models import User
from idp.services import services

ACR_SINGLE_FACTOR = "urn:darbaza:loa:1"
ACR_MULTI_FACTOR = "urn:darbaza:loa:2"


def acr_for(amr: list[str]) -> str:
    # N26: the acr says what was really done. "mfa" is added only by the pending chain
    # (idp/login/pending.py) when a second factor was verified, or by a passkey with
    # user verification (possession plus the device's PIN or biometric).
    return ACR_MULTI_FACTOR if "mfa" in amr else ACR_SINGLE_FACTOR


def complete_sign_in(user: User, amr: list[str]) -> None:
    """Start a fresh authenticated session (ASVS 7.2.4: new id at every authentication)."""
    previous_sid = session.get("sid")
    keep = {k: session[k] for k in ("lang", "ui_locales") if k in session}
    session.clear()
    session.regenerate()  # type: ignore[attr-defined]
    if previous_sid:
        services().redis.delete(f"sid:{previous_sid}")
    now = time.time()
    session.update(keep)
    session["uid"] = user.id
    session["sid"] = secrets.token_urlsafe(24)
    session["auth_time"] = int(now)
    session["authenticated_at"] = now
    session["last_seen"] = now
    session["amr"] = amr
    session["acr"] = acr_for(amr)
    login_user(user)


def sign_out() -> None:
    """End the browser session and revoke the tokens that were bound to it."""
    sid = session.get("sid")
    if sid:
        svc = services()
        svc.tokens.revoke_session(svc.db.session, sid)
        svc.db.session.commit()
    logout_user()
    session.destroy()  # type: ignore[attr-defined]
