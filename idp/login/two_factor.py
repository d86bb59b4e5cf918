"""Two-factor sign-in with TOTP and recovery codes (issue 4).

``/account/2fa``: a signed-in person enrols an authenticator app (QR code and the
secret as text, confirmed by a first code), gets ten recovery codes shown once, makes
new ones, or removes TOTP. Every change needs a recent sign-in (``fresh_auth_required``,
ASVS 7.5.1: an older session confirms the password and a code at /login/reauth first,
which replaces asking the current password on each form), is journalled and, when the
account has an e-mail address, announced by mail through the outbox in the same
transaction.

``/login/second-factor``: after ``login()`` verified the password of an account with
TOTP, a short-lived pending sign-in (STYLE 7) waits here for a TOTP code or a recovery
code; only then is the session created (``complete_sign_in``) with
``amr = ["pwd", "otp", "mfa"]`` (TOTP) or ``["pwd", "mfa"]`` (recovery code), which
``acr_for`` turns into ``urn:darbaza:loa:2`` (N26)."""

from __future__ import annotations

import time
from typing import Any

from flask import make_response, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import StringField
from wtforms.validators import InputRequired, Length

from idp.accounts.models import User
from idp.login import pending
from idp.login.factors import check_second_factor as _check_second_factor
from idp.login.factors import journal as _journal
from idp.login.reauth import fresh_auth_required
from idp.login.throttle import TOTP, is_disabled
from idp.login.views import bp
from idp.mfa import totp
from idp.mfa.qr import qr_svg
from idp.notify.notices import notify
from idp.services import services

ENROL_KEY = "totp_enrolment"
ENROL_SECONDS = 600
# Recovery codes wait here between the POST that made them and the one GET that shows them.
SHOW_CODES_KEY = "recovery_codes_to_show"


class SecondFactorForm(FlaskForm):
    code = StringField(
        validators=[InputRequired(message=_l("Enter the code.")), Length(max=64, message=_l("At most 64 characters."))]
    )


class ContinueForm(FlaskForm):
    pass


class EnrolForm(FlaskForm):
    """The first code of a new authenticator app (account page and sign-in chain)."""

    code = StringField(
        validators=[
            InputRequired(message=_l("Enter the six-digit code from the app.")),
            Length(max=64, message=_l("At most 64 characters.")),
        ]
    )


class RemoveForm(FlaskForm):
    code = StringField(
        validators=[
            InputRequired(message=_l("Enter a code from the app or a recovery code.")),
            Length(max=64, message=_l("At most 64 characters.")),
        ]
    )


class RegenerateForm(FlaskForm):
    pass


# --- shared checks ---------------------------------------------------------------------
# ``_journal`` and ``_check_second_factor`` are idp/login/factors.py's (re-authentication
# and the password reset check codes the same way).

def _notify(user: User, template: str, **context: str) -> None:
    """Queue a notice in the current transaction when the account has an e-mail."""
    svc = services()
    notify(svc.db.session, svc.outbox, user, template, **context)


def _signed_in_user() -> User | None:
    if not current_user.is_authenticated:
        return None
    return services().db.session.get(User, current_user.id)


def _no_store(response: Any) -> Any:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


# --- the second sign-in step -----------------------------------------------------------

@bp.route("/login/second-factor", methods=["GET", "POST"])
def second_factor() -> Any:
    found = pending.current(pending.SECOND_FACTOR)
    if found is None:
        # Expired, never started or another step is due (no detail is given).
        return pending.resume()
    _state, user = found
    form = SecondFactorForm()
    if request.method == "GET":
        return render_template("login_second_factor.html", form=form, user=user)
    if not form.validate_on_submit():
        return render_template("login_second_factor.html", form=form, user=user), 400
    svc = services()
    db = svc.db.session
    svc.login_account_throttle.guard(user.login)
    ok, method = _check_second_factor(user, form.code.data or "")
    if not ok:
        _journal("account:login:failure", user, actor="anonymous",
                 details={"login": user.login[:64], "factor": "otp", "method": method})
        db.commit()
        form.code.errors.append(_("The code is incorrect."))
        return render_template("login_second_factor.html", form=form, user=user), 401
    # N13: the whole sign-in succeeded; the run of failures ends.
    svc.login_account_throttle.reset(user.login)
    details: dict[str, Any] = {}
    if method == "recovery-code":
        remaining = svc.two_factor.unused_recovery_codes(db, user.id)
        totp_disabled = is_disabled(user, TOTP)
        details |= {"recovery_code": True, "recovery_codes_left": remaining, "totp_disabled": totp_disabled}
        # With a disabled TOTP a recovery code is the way back in, to bind a new app.
        _journal("mfa:recovery:use", user, reason="totp-disabled-rebind" if totp_disabled else None,
                 details={"recovery_codes_left": remaining, "totp_disabled": totp_disabled})
    db.commit()
    return pending.advance(user, step=pending.SECOND_FACTOR, add_amr=["otp"] if method == "totp" else [],
                           details=details)


@bp.route("/login/enrol-2fa", methods=["GET", "POST"])
def enrol_second_factor() -> Any:
    """Required action: a role of this account requires a second factor and it has none.
    The person just proved their password, so the first code of the new app is all that
    is asked; the recovery codes are shown once, then the sign-in goes on."""
    found = pending.current(pending.ENROL_SECOND_FACTOR)
    if found is None:
        return pending.resume()
    _state, user = found
    form = EnrolForm()
    if request.method == "GET":
        return _render_enrolment(user, form, template="login_enrol_2fa.html")
    if not form.validate_on_submit():
        return _render_enrolment(user, form, 400, template="login_enrol_2fa.html")
    svc = services()
    db = svc.db.session
    svc.login_account_throttle.guard(user.login)
    codes = svc.two_factor.enable(db, user, _enrolment_secret(user), form.code.data or "")
    if codes is None:
        db.rollback()
        svc.login_account_throttle.fail(user.login)
        form.code.errors = [*form.code.errors, _("The code is incorrect. Check the time on your phone and "
                                                 "enter the code the app shows now.")]
        return _render_enrolment(user, form, 400, template="login_enrol_2fa.html")
    _journal("mfa:totp:enable", user, details={"method": "totp", "recovery_codes": len(codes), "required": True})
    _notify(user, "mfa_added", method="totp")
    db.commit()
    session.pop(ENROL_KEY, None)
    svc.login_account_throttle.reset(user.login)
    # The codes are shown on the page the chain leads to next (or the account page).
    session[SHOW_CODES_KEY] = codes
    return redirect(url_for("login.enrolled_recovery_codes"), code=303)


@bp.route("/login/enrol-2fa/codes", methods=["GET", "POST"])
def enrolled_recovery_codes() -> Any:
    """The new recovery codes, shown once during the sign-in; "Continue" goes on."""
    found = pending.current(pending.ENROL_SECOND_FACTOR)
    if found is None:
        return pending.resume()
    _state, user = found
    form = ContinueForm()
    if request.method == "POST" and form.validate_on_submit() and user.has_totp:
        session.pop(SHOW_CODES_KEY, None)
        return pending.advance(user, step=pending.ENROL_SECOND_FACTOR, add_amr=["otp"],
                               details={"enrolled": "totp"})
    if not user.has_totp:
        return redirect(url_for("login.enrol_second_factor"), code=303)
    codes = session.pop(SHOW_CODES_KEY, None)
    page = render_template("login_enrol_2fa_codes.html", codes=codes if isinstance(codes, list) else None,
                           form=form)
    return _no_store(make_response(page, 200))


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
        regenerate_form=RegenerateForm(), remove_form=RemoveForm(),
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


def _render_enrolment(user: User, form: FlaskForm, status: int = 200, *, template: str = "account_2fa_enrol.html") -> Any:
    svc = services()
    secret = svc.two_factor.open_secret(_enrolment_secret(user))
    uri = svc.two_factor.provisioning_uri(secret, user.login)
    page = render_template(
        template, form=form, secret=totp.grouped_secret(secret),
        qr=qr_svg(uri, title=_("QR code for your authenticator app")),
    )
    return _no_store(make_response(page, status))


@bp.route("/account/2fa/totp", methods=["GET", "POST"])
@fresh_auth_required
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
@fresh_auth_required(back="login.two_factor_status")
def regenerate_recovery_codes() -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login"), code=302)
    if not user.has_totp:
        return redirect(url_for("login.two_factor_status"), code=303)
    form = RegenerateForm()
    svc = services()
    db = svc.db.session
    if not form.validate_on_submit():
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
@fresh_auth_required(back="login.two_factor_status")
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
            regenerate_form=RegenerateForm(formdata=None), remove_form=form,
        )
        return page, 400

    if not form.validate_on_submit():
        return again()
    if user.requires_2fa and not user.has_passkey:
        # A role of this account requires a second factor: the app is its only one.
        _journal("mfa:totp:disable-refused", user, reason="required-by-role")
        db.commit()
        form.code.errors = [*form.code.errors, _("Your role at the school requires two-factor sign-in: add a "
                                                 "passkey first, or ask tech support to reset it if you "
                                                 "changed phones.")]
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
