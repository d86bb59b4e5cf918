"""Sign-in, sign-out, the account page and the language switcher."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, abort, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import HiddenField, PasswordField, StringField, SubmitField
from wtforms.validators import DataRequired, Length

from idp.accounts.models import User
from idp.audit.web import audit_event
from idp.i18n import LANGUAGES
from idp.login import pending
from idp.login.flow import sign_out
from idp.login.password_check import DirectoryUnavailable, password_matches
from idp.login.throttle import (
    PASSWORD,
    Throttled,
    is_disabled,
    record_credential_failure,
    reset_credential_failures,
)
from idp.services import services

bp = Blueprint("login", __name__)
log = logging.getLogger("darbaza.login")


class LoginForm(FlaskForm):
    flow = HiddenField()
    next = HiddenField()
    login = StringField(validators=[DataRequired(message=_l("Enter your login.")), Length(max=128, message=_l("At most 128 characters."))])
    # 128 is the longest password we accept (ASVS 6.2.9 wants at least 64).
    password = PasswordField(
        validators=[DataRequired(message=_l("Enter your password.")), Length(max=128, message=_l("At most 128 characters."))]
    )
    submit = SubmitField()


class LogoutForm(FlaskForm):
    submit = SubmitField()


class LanguageForm(FlaskForm):
    lang = HiddenField(validators=[DataRequired()])
    next = HiddenField()


def safe_next(target: str | None) -> str | None:
    """Only local absolute paths: R2, no open redirect through ``next``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    if any(ch in target for ch in "\r\n\t") or len(target) > 2048:
        return None
    return target


def _after_sign_in(flow: str | None, next_url: str | None) -> Any:
    if flow:
        return redirect(url_for("oidc.authorize_continue", flow_id=flow), code=303)
    return redirect(safe_next(next_url) or url_for("login.account"), code=303)


def directory_unavailable_message() -> str:
    return _("The school directory cannot be reached right now, so directory accounts cannot sign in. "
             "Try again in a few minutes; local accounts are not affected.")


def _directory_unavailable(form: LoginForm, user: User | None, login_name: str, exc: Exception) -> Any:
    """A directory account's password could not be checked: say so (503), journal and log
    it, and count nothing against the account, whose password was not judged."""
    log.warning("directory unreachable at sign-in of user %s: %s", user.id if user else None, exc)
    audit_event("account:login:failure", subject=f"user:{user.id}" if user else None,
                reason="directory-unavailable", details={"login": login_name[:64], "factor": "pwd"})
    form.password.errors.append(directory_unavailable_message())
    return render_template("login.html", form=form), 503


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    form = LoginForm()
    flow = request.values.get("flow") or None
    if flow is not None and (len(flow) > 64 or not flow.replace("-", "").replace("_", "").isalnum()):
        flow = None
    if request.method == "GET":
        form.flow.data = flow or ""
        form.next.data = safe_next(request.args.get("next")) or ""
        hint = request.args.get("login_hint", "")
        if hint and len(hint) <= 128:
            form.login.data = hint
        return render_template("login.html", form=form)
    if not form.validate_on_submit():
        return render_template("login.html", form=form), 400
    svc = services()
    db = svc.db.session
    login_name = form.login.data.strip().casefold()
    client_ip = request.remote_addr or "unknown"
    # Checked before the account is looked up, and per login string whether or not an
    # account has it, so a throttled answer says nothing about existence.
    waits = [w for w in (svc.login_ip_throttle.check(client_ip), svc.login_account_throttle.check(login_name)) if w]
    if waits:
        raise Throttled(max(waits), "login")
    # No login holds a NUL, and PostgreSQL refuses one in a query: such a login is unknown.
    user = None if "\x00" in login_name else db.scalar(select(User).where(User.login == login_name))
    try:
        # The account's argon2id hash, or for a directory account a bind to the school
        # directory (idp/login/password_check.py); everything around it is the same.
        ok = password_matches(user, form.password.data)
    except DirectoryUnavailable as exc:
        return _directory_unavailable(form, user, login_name, exc)
    if not ok or user is None or is_disabled(user, PASSWORD):
        svc.login_ip_throttle.fail(client_ip)
        svc.login_account_throttle.fail(login_name)
        if user is not None and ok:
            # N12: the right password of a disabled password is refused exactly like a
            # wrong one (no hint to a guesser that this guess was right).
            audit_event("account:login:refused", subject=f"user:{user.id}", reason="credential-disabled",
                        details={"login": login_name[:64], "credential": PASSWORD.kind})
        else:
            if user is not None and record_credential_failure(
                db, user.id, PASSWORD, limit=svc.settings.credential_max_failures
            ):
                audit_event("account:credential:disabled", actor="system", subject=f"user:{user.id}",
                            reason="too-many-failures",
                            details={"credential": PASSWORD.kind, "failures": svc.settings.credential_max_failures},
                            commit=False)
            audit_event(
                "account:login:failure",
                subject=f"user:{user.id}" if user else None,
                details={"login": login_name[:64], "factor": "pwd"},
            )
        form.password.errors.append(_("The login or password is incorrect."))
        return render_template("login.html", form=form), 401
    # N13: a right password ends the run of failures, in Redis and in the database. With
    # a second factor the account's throttle goes on counting until the second step is
    # done too, or typing the password again would buy fresh guesses at the code (N19).
    if not user.has_second_factor:
        svc.login_account_throttle.reset(login_name)
    reset_credential_failures(db, user.id, PASSWORD)
    db.commit()
    if not user.can_sign_in:
        audit_event(
            "account:login:refused",
            subject=f"user:{user.id}",
            reason="locked" if user.locked else "disabled",
            details={"login": login_name[:64]},
        )
        form.password.errors.append(
            _("This account is locked. Contact the school's technical support.")
        )
        return render_template("login.html", form=form), 403
    if user.password_hash and svc.passwords.needs_rehash(user.password_hash):
        user.password_hash = svc.passwords.hash(form.password.data)
        db.commit()
    # The rest of the sign-in (second factor, required actions) is the pending chain
    # (idp/login/pending.py); the session exists only once it is done.
    return pending.begin(user, ["pwd"], form.flow.data or None, form.next.data)


@bp.get("/")
def account() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login"), code=302)
    return render_template("account.html", user=current_user, logout_form=LogoutForm())


@bp.post("/logout")
def logout() -> Any:
    form = LogoutForm()
    if not form.validate_on_submit():
        abort(400)
    uid = session.get("uid")
    sign_out()
    if uid is not None:
        audit_event("account:logout", actor=f"user:{uid}", subject=f"user:{uid}")
    return render_template("logged_out.html")


@bp.post("/lang")
def set_language() -> Any:
    form = LanguageForm()
    if not form.validate_on_submit() or form.lang.data not in LANGUAGES:
        abort(400)
    session["lang"] = form.lang.data
    if current_user.is_authenticated:
        current_user.locale = form.lang.data
        services().db.session.commit()
    return redirect(safe_next(form.next.data) or url_for("login.account"), code=303)


# Registers the activation and required-password-change views on ``bp`` (they import from here).
from idp.login import (  # noqa: E402,F401
    activation,
    email_change,  # noqa: E402,F401  (/account/email and its verification links)
    obligation,  # noqa: E402,F401  (/login/obligation and /account/obligations)
    passkeys,  # noqa: E402,F401  (passkeys: /account/passkeys, /login/passkey, second step)
    password,  # noqa: E402,F401  (the self-service /account/password)
    password_reset,  # noqa: E402,F401  (/password/forgot and /password/reset/<token>)
    personal_data,  # noqa: E402,F401  (/account/data.json: "My data")
    reauth,  # noqa: E402,F401  (/login/reauth: "Confirm it's you")
    refused,  # noqa: E402,F401  (/login/refused: why restrictions refused a sign-in)
    required,
    sessions,  # noqa: E402,F401  (/account/sessions: "My sessions")
    two_factor,  # noqa: E402,F401  (/login/second-factor and /account/2fa)
)
