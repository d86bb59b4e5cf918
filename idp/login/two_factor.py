"""Two-factor sign-in with TOTP and recovery codes (issue 4).

``/account/2fa``: a signed-in person enrols an authenticator app (QR code and the
secret as text, confirmed by a first code), gets ten recovery codes shown once, makes
new ones, or removes TOTP. Every change asks for the current password on the same form
(re-authentication, ASVS 6.2.3 style), is journalled and, when the account has an
e-mail address, announced by mail through the outbox in the same transaction.

``/login/second-factor``: after ``login()`` verified the password of an account with
TOTP, a short-lived pending sign-in (STYLE 7) waits here for a TOTP code or a recovery
code; only then is the session created (``complete_sign_in``) with
``amr = ["pwd", "otp", "mfa"]`` (TOTP) or ``["pwd", "mfa"]`` (recovery code), which
``acr_for`` turns into ``urn:darbaza:loa:2`` (N26)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from flask import g, make_response, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import InputRequired, Length

from idp.accounts.models import User
from idp.audit.web import audit_event
from idp.login import required
from idp.login.flow import complete_sign_in
from idp.login.throttle import (
    PASSWORD,
    TOTP,
    Throttled,
    is_disabled,
    record_credential_failure,
    reset_credential_failures,
)
from idp.login.views import _after_sign_in, bp, safe_next
from idp.mfa import recovery, totp
from idp.mfa.qr import qr_svg
from idp.services import services

PENDING_KEY = "pending_second_factor"
# How long the password step stays good while the second step is awaited.
PENDING_SECONDS = 300
ENROL_KEY = "totp_enrolment"
ENROL_SECONDS = 600
# Recovery codes wait here between the POST that made them and the one GET that shows them.
SHOW_CODES_KEY = "recovery_codes_to_show"

AMR_TOTP = ["pwd", "otp", "mfa"]
AMR_RECOVERY_CODE = ["pwd", "mfa"]

BISHKEK = ZoneInfo("Asia/Bishkek")


class SecondFactorForm(FlaskForm):
    code = StringField(
        validators=[InputRequired(message=_l("Enter the code.")), Length(max=64, message=_l("At most 64 characters."))]
    )


class CurrentPasswordForm(FlaskForm):
    current_password = PasswordField(
        validators=[InputRequired(message=_l("Enter your current password.")), Length(max=4 * 128)]
    )


class EnrolForm(CurrentPasswordForm):
    code = StringField(
        validators=[
            InputRequired(message=_l("Enter the six-digit code from the app.")),
            Length(max=64, message=_l("At most 64 characters.")),
        ]
    )


class RemoveForm(CurrentPasswordForm):
    code = StringField(
        validators=[
            InputRequired(message=_l("Enter a code from the app or a recovery code.")),
            Length(max=64, message=_l("At most 64 characters.")),
        ]
    )


# --- shared checks ---------------------------------------------------------------------

def _journal(action: str, user: User, *, reason: str | None = None, details: dict[str, Any] | None = None,
             actor: str | None = None) -> None:
    svc = services()
    svc.journal.record(
        svc.db.session, actor=actor or f"user:{user.id}", action=action, subject=f"user:{user.id}", reason=reason,
        ip=request.remote_addr, request_id=getattr(g, "request_id", None), details=details,
    )


def _notify(user: User, template: str, **context: str) -> None:
    """Queue a notice in the current transaction when the account has an e-mail."""
    if not user.email:
        return
    changed_at = datetime.now(UTC).astimezone(BISHKEK).strftime("%Y-%m-%d %H:%M (Asia/Bishkek)")
    services().outbox.enqueue(
        services().db.session, template=template, to=user.email, locale=user.locale,
        context={"display_name": user.display_name, "changed_at": changed_at, **context},
    )


def _current_password_ok(form: CurrentPasswordForm, user: User) -> bool:
    """Re-authentication on the form: a wrong password counts like a failed sign-in
    (account throttle and the password's 100-failure limit). Commits a failure."""
    svc = services()
    db = svc.db.session
    wait = svc.login_account_throttle.check(user.login)
    if wait:
        raise Throttled(wait, "reauthentication")
    if svc.passwords.verify(user.password_hash, form.current_password.data or "") and not is_disabled(user, PASSWORD):
        reset_credential_failures(db, user.id, PASSWORD)
        return True
    svc.login_account_throttle.fail(user.login)
    disabled = record_credential_failure(db, user.id, PASSWORD, limit=svc.settings.credential_max_failures)
    _journal("account:reauth:failure", user, reason="wrong-current-password")
    if disabled:
        _journal("account:credential:disabled", user, actor="system", reason="too-many-failures",
                 details={"credential": PASSWORD.kind, "failures": svc.settings.credential_max_failures})
    db.commit()
    form.current_password.errors = [*form.current_password.errors, _("The current password is incorrect.")]
    return False


def _check_second_factor(user: User, code: str) -> tuple[bool, str]:
    """Check a TOTP code or a recovery code for ``user``; returns (accepted, method),
    method being ``totp`` or ``recovery-code``. A failure is counted (the account
    throttle; for TOTP also its 100-failure limit) and journalled, not committed."""
    svc = services()
    db = svc.db.session
    if totp.normalise_code(code) is None and recovery.normalise(code) is not None:
        if svc.two_factor.use_recovery_code(db, user.id, code):
            return True, "recovery-code"
        svc.login_account_throttle.fail(user.login)
        return False, "recovery-code"
    if is_disabled(user, TOTP):
        # N12: a disabled TOTP refuses even a right code, with the same message.
        svc.login_account_throttle.fail(user.login)
        _journal("account:login:refused", user, reason="credential-disabled", details={"credential": TOTP.kind})
        return False, "totp"
    if svc.two_factor.check_user_totp(user, code):
        reset_credential_failures(db, user.id, TOTP)
        return True, "totp"
    svc.login_account_throttle.fail(user.login)
    if record_credential_failure(db, user.id, TOTP, limit=svc.settings.credential_max_failures):
        _journal("account:credential:disabled", user, actor="system", reason="too-many-failures",
                 details={"credential": TOTP.kind, "failures": svc.settings.credential_max_failures})
    return False, "totp"


def _signed_in_user() -> User | None:
    if not current_user.is_authenticated:
        return None
    return services().db.session.get(User, current_user.id)


def _no_store(response: Any) -> Any:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


# --- the second sign-in step -----------------------------------------------------------

def begin_second_factor(user: User, flow: str | None, next_url: str | None) -> Any:
    """Called once the password was verified for an account with TOTP: remember who,
    how and where to, for five minutes, and ask for the second factor. No session yet."""
    # A new session id, so that a session planted before the password was typed cannot
    # ride on this sign-in (session fixation, ASVS 7.2.4).
    session.regenerate()  # type: ignore[attr-defined]
    now = time.time()
    session[PENDING_KEY] = {
        "uid": user.id,
        "amr": ["pwd"],
        "flow": flow or None,
        "next": safe_next(next_url),
        "created": now,
        "expires": now + PENDING_SECONDS,
    }
    return redirect(url_for("login.second_factor"), code=303)


def _pending_sign_in() -> tuple[dict[str, Any], User] | None:
    pending = session.get(PENDING_KEY)
    if not isinstance(pending, dict) or pending.get("expires", 0) < time.time():
        session.pop(PENDING_KEY, None)
        return None
    user = services().db.session.get(User, pending.get("uid"))
    if user is None or not user.can_sign_in or not user.has_totp:
        session.pop(PENDING_KEY, None)
        return None
    return pending, user


@bp.route("/login/second-factor", methods=["GET", "POST"])
def second_factor() -> Any:
    found = _pending_sign_in()
    if found is None:
        # Expired or never started: sign in again from the password (no detail given).
        return redirect(url_for("login.login"), code=303)
    pending, user = found
    form = SecondFactorForm()
    if request.method == "GET":
        return render_template("login_second_factor.html", form=form)
    if not form.validate_on_submit():
        return render_template("login_second_factor.html", form=form), 400
    svc = services()
    db = svc.db.session
    svc.login_account_throttle.guard(user.login)
    ok, method = _check_second_factor(user, form.code.data or "")
    if not ok:
        _journal("account:login:failure", user, actor="anonymous",
                 details={"login": user.login[:64], "factor": "otp", "method": method})
        db.commit()
        form.code.errors.append(_("The code is incorrect."))
        return render_template("login_second_factor.html", form=form), 401
    # N13: the whole sign-in succeeded; the run of failures ends.
    svc.login_account_throttle.reset(user.login)
    amr = list(AMR_TOTP if method == "totp" else AMR_RECOVERY_CODE)
    details: dict[str, Any] = {"amr": amr}
    if method == "recovery-code":
        remaining = svc.two_factor.unused_recovery_codes(db, user.id)
        totp_disabled = is_disabled(user, TOTP)
        details |= {"recovery_code": True, "recovery_codes_left": remaining, "totp_disabled": totp_disabled}
        # With a disabled TOTP a recovery code is the way back in, to bind a new app.
        _journal("mfa:recovery:use", user, reason="totp-disabled-rebind" if totp_disabled else None,
                 details={"recovery_codes_left": remaining, "totp_disabled": totp_disabled})
    db.commit()
    session.pop(PENDING_KEY, None)
    if user.must_change_password:
        return required.begin_required_password_change(user, pending.get("flow"), pending.get("next"), amr=amr)
    complete_sign_in(user, amr)
    audit_event("account:login:success", actor=f"user:{user.id}", subject=f"user:{user.id}", details=details)
    return _after_sign_in(pending.get("flow"), pending.get("next"))


# --- the account pages -----------------------------------------------------------------

@bp.get("/account/2fa")
def two_factor_status() -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login", next=url_for("login.two_factor_status")), code=302)
    svc = services()
    return render_template(
        "account_2fa.html", user=user, totp_disabled=is_disabled(user, TOTP),
        codes_left=svc.two_factor.unused_recovery_codes(svc.db.session, user.id),
        regenerate_form=CurrentPasswordForm(), remove_form=RemoveForm(),
    )


def _enrolment_secret(user: User) -> str:
    """The sealed seed of this browser's enrolment in progress (a new one when none)."""
    pending = session.get(ENROL_KEY)
    if (not isinstance(pending, dict) or pending.get("uid") != user.id
            or pending.get("expires", 0) < time.time() or not isinstance(pending.get("sealed"), str)):
        # Only the sealed seed goes into the session store (N20: protected at rest).
        pending = {"uid": user.id, "sealed": services().two_factor.new_sealed_secret(),
                   "expires": time.time() + ENROL_SECONDS}
        session[ENROL_KEY] = pending
    return str(pending["sealed"])


def _render_enrolment(user: User, form: EnrolForm, status: int = 200) -> Any:
    svc = services()
    secret = svc.two_factor.open_secret(_enrolment_secret(user))
    uri = svc.two_factor.provisioning_uri(secret, user.login)
    page = render_template(
        "account_2fa_enrol.html", form=form, secret=totp.grouped_secret(secret),
        qr=qr_svg(uri, title=_("QR code for your authenticator app")),
    )
    return _no_store(make_response(page, status))


@bp.route("/account/2fa/totp", methods=["GET", "POST"])
def enrol_totp() -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login", next=url_for("login.enrol_totp")), code=302)
    if user.has_totp:
        return redirect(url_for("login.two_factor_status"), code=303)
    form = EnrolForm()
    if request.method == "GET":
        return _render_enrolment(user, form)
    if not form.validate_on_submit():
        return _render_enrolment(user, form, 400)
    if not _current_password_ok(form, user):
        return _render_enrolment(user, form, 400)
    svc = services()
    db = svc.db.session
    codes = svc.two_factor.enable(db, user, _enrolment_secret(user), form.code.data or "")
    if codes is None:
        db.rollback()
        form.code.errors = [*form.code.errors, _("The code is incorrect. Check the time on your phone and "
                                                 "enter the code the app shows now.")]
        return _render_enrolment(user, form, 400)
    _journal("mfa:totp:enable", user, details={"method": "totp", "recovery_codes": len(codes)})
    _notify(user, "mfa_added", method="totp")
    db.commit()
    session.pop(ENROL_KEY, None)
    session[SHOW_CODES_KEY] = codes
    return redirect(url_for("login.recovery_codes"), code=303)


@bp.get("/account/2fa/recovery-codes")
def recovery_codes() -> Any:
    """Shows new recovery codes once: the session holds them only until this GET."""
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login"), code=302)
    codes = session.pop(SHOW_CODES_KEY, None)
    page = render_template("account_2fa_codes.html", codes=codes if isinstance(codes, list) else None)
    return _no_store(make_response(page, 200))


@bp.post("/account/2fa/recovery-codes/new")
def regenerate_recovery_codes() -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login"), code=302)
    if not user.has_totp:
        return redirect(url_for("login.two_factor_status"), code=303)
    form = CurrentPasswordForm()
    svc = services()
    db = svc.db.session
    if not form.validate_on_submit() or not _current_password_ok(form, user):
        page = render_template(
            "account_2fa.html", user=user, totp_disabled=is_disabled(user, TOTP),
            codes_left=svc.two_factor.unused_recovery_codes(db, user.id),
            regenerate_form=form, remove_form=RemoveForm(formdata=None),
        )
        return page, 400
    codes = svc.two_factor.replace_recovery_codes(db, user)
    _journal("mfa:recovery:regenerate", user, details={"recovery_codes": len(codes)})
    _notify(user, "recovery_codes_new")
    db.commit()
    session[SHOW_CODES_KEY] = codes
    return redirect(url_for("login.recovery_codes"), code=303)


@bp.post("/account/2fa/totp/remove")
def remove_totp() -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login"), code=302)
    if not user.has_totp:
        return redirect(url_for("login.two_factor_status"), code=303)
    form = RemoveForm()
    svc = services()
    db = svc.db.session

    def again() -> Any:
        page = render_template(
            "account_2fa.html", user=user, totp_disabled=is_disabled(user, TOTP),
            codes_left=svc.two_factor.unused_recovery_codes(db, user.id),
            regenerate_form=CurrentPasswordForm(formdata=None), remove_form=form,
        )
        return page, 400

    if not form.validate_on_submit() or not _current_password_ok(form, user):
        return again()
    ok, method = _check_second_factor(user, form.code.data or "")
    if not ok:
        _journal("mfa:totp:disable-failure", user, reason="wrong-code", details={"method": method})
        db.commit()
        form.code.errors = [*form.code.errors, _("The code is incorrect.")]
        return again()
    svc.two_factor.disable(db, user)
    _journal("mfa:totp:disable", user, details={"method": "totp", "confirmed_with": method})
    _notify(user, "mfa_removed", method="totp")
    db.commit()
    # The session's acr stays what was done at sign-in (N26 concerns the event, not
    # the account); new sign-ins are password-only from now on.
    return redirect(url_for("login.two_factor_status"), code=303)
