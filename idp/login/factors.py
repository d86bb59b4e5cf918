"""Checking a factor outside the sign-in page, counted like a sign-in.

Re-authentication (/login/reauth), the password reset's second-factor step and the 2FA
pages check a password or a code of an account whose login is known. Each failure counts
as a failed sign-in: the account's growing delays (``login_account_throttle``) and the
credential's consecutive-failure limit (N12, 100), so that none of these pages is a way
around the limits of /login. Nothing here commits: the caller does, with its own
journal event."""

from __future__ import annotations

from typing import Any

from flask import g, request

from idp.accounts.models import User
from idp.login.password_check import password_matches
from idp.login.throttle import (
    PASSWORD,
    TOTP,
    is_disabled,
    record_credential_failure,
    reset_credential_failures,
)
from idp.mfa import recovery, totp
from idp.services import services

METHOD_TOTP = "totp"
METHOD_RECOVERY_CODE = "recovery-code"


def journal(action: str, user: User, *, reason: str | None = None, details: dict[str, Any] | None = None,
            actor: str | None = None) -> None:
    """One journal event about ``user`` from this request (not committed)."""
    svc = services()
    svc.journal.record(
        svc.db.session, actor=actor or f"user:{user.id}", action=action, subject=f"user:{user.id}", reason=reason,
        ip=request.remote_addr, request_id=getattr(g, "request_id", None), details=details,
    )


def check_password(user: User, password: str) -> bool:
    """True when ``password`` is the account's and the password is not disabled. A
    failure counts against the account's throttle and, when the password was wrong,
    against its consecutive-failure limit (the right password of a disabled password is
    refused the same way, N12, without counting). A directory account's password is
    checked by the directory; ``DirectoryUnavailable`` is raised, counting nothing, when
    it cannot answer."""
    svc = services()
    db = svc.db.session
    right = password_matches(user, password)
    if right and not is_disabled(user, PASSWORD):
        reset_credential_failures(db, user.id, PASSWORD)
        return True
    svc.login_account_throttle.fail(user.login)
    if not right and record_credential_failure(db, user.id, PASSWORD, limit=svc.settings.credential_max_failures):
        journal("account:credential:disabled", user, actor="system", reason="too-many-failures",
                details={"credential": PASSWORD.kind, "failures": svc.settings.credential_max_failures})
    return False


def accepts_code(user: User) -> bool:
    """Whether the account has a code to give: a TOTP app (and with it recovery codes)."""
    return user.has_totp


def check_second_factor(user: User, code: str) -> tuple[bool, str]:
    """Check a TOTP code or a recovery code for ``user``; returns (accepted, method),
    method being ``totp`` or ``recovery-code``. A failure is counted (the account
    throttle; for TOTP also its 100-failure limit) and journalled, not committed."""
    svc = services()
    db = svc.db.session
    if totp.normalise_code(code) is None and recovery.normalise(code) is not None:
        if svc.two_factor.use_recovery_code(db, user.id, code):
            return True, METHOD_RECOVERY_CODE
        svc.login_account_throttle.fail(user.login)
        return False, METHOD_RECOVERY_CODE
    if is_disabled(user, TOTP):
        # N12: a disabled TOTP refuses even a right code, with the same message.
        svc.login_account_throttle.fail(user.login)
        journal("account:login:refused", user, reason="credential-disabled", details={"credential": TOTP.kind})
        return False, METHOD_TOTP
    if svc.two_factor.check_user_totp(user, code):
        reset_credential_failures(db, user.id, TOTP)
        return True, METHOD_TOTP
    svc.login_account_throttle.fail(user.login)
    if record_credential_failure(db, user.id, TOTP, limit=svc.settings.credential_max_failures):
        journal("account:credential:disabled", user, actor="system", reason="too-many-failures",
                details={"credential": TOTP.kind, "failures": svc.settings.credential_max_failures})
    return False, METHOD_TOTP


def amr_for_code(method: str) -> list[str]:
    """The RFC 8176 methods a password plus this code amount to."""
    return ["pwd", "otp", "mfa"] if method == METHOD_TOTP else ["pwd", "mfa"]
