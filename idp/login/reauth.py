"""Re-authentication before a sensitive change (ASVS 7.5.1; issue 4: "Changing password,
e-mail or 2FA needs a fresh sign-in").

``fresh_auth_required`` guards a signed-in view: when the session's last
authentication (``authenticated_at``) is older than ``reauth_max_age_seconds``, the
browser is sent to ``/login/reauth`` ("Confirm it's you") and comes back afterwards.
That page asks for the password and, when the account has TOTP, a code from the app or
a recovery code, on one form. Failures count like failed sign-ins (idp/login/factors.py).
Success gives the session a new id (ASVS 7.2.4: a new token at every
re-authentication), keeping its data, and restarts its clocks (N24: a successful
re-authentication resets both timeouts).

An account whose only second factor is a passkey is not re-authenticated here (passkey
assertions on this page are out of scope): it is offered a full sign-in again, which
asks for the passkey."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField, StringField
from wtforms.validators import InputRequired, Length, Optional

from idp.accounts.models import User
from idp.login.factors import (
    METHOD_RECOVERY_CODE,
    accepts_code,
    amr_for_code,
    check_password,
    check_second_factor,
    journal,
)
from idp.login.flow import ACR_MULTI_FACTOR, ACR_SINGLE_FACTOR, acr_for, sign_out
from idp.login.password_check import DirectoryUnavailable
from idp.login.required import MAX_PASSWORD_LENGTH
from idp.login.views import bp, directory_unavailable_message, safe_next
from idp.services import services

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("darbaza.login")

_ACR_RANK = {ACR_SINGLE_FACTOR: 1, ACR_MULTI_FACTOR: 2}
# A clock a little ahead on another server must not make a session fresh for longer.
_CLOCK_SKEW = 60


class ReauthForm(FlaskForm):
    next = HiddenField()
    password = PasswordField(
        validators=[InputRequired(message=_l("Enter your password.")), Length(max=4 * MAX_PASSWORD_LENGTH)]
    )
    code = StringField(validators=[Optional(), Length(max=64, message=_l("At most 64 characters."))])


class SignInAgainForm(FlaskForm):
    next = HiddenField()


def is_fresh() -> bool:
    """Whether this session's last authentication is recent enough for a sensitive change."""
    at = session.get("authenticated_at")
    if not isinstance(at, int | float) or isinstance(at, bool):
        return False
    age = time.time() - float(at)
    return -_CLOCK_SKEW <= age <= services().settings.reauth_max_age_seconds


def _return_to(back: str | None) -> str:
    """Where to come back after the re-authentication: this page for a GET; for a POST
    (whose form data cannot be replayed) the page the form is on."""
    if request.method in ("GET", "HEAD"):
        target = request.full_path.rstrip("?")
    else:
        target = url_for(back) if back else request.path
    return safe_next(target) or url_for("login.account")


def fresh_auth_required(view: F | None = None, *, back: str | None = None) -> Any:
    """Decorator for a signed-in view that changes credentials or recovery data.
    ``back`` names the endpoint to return to after a POST to a POST-only view."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # Not signed in: the view sends the browser to the sign-in page itself.
            if current_user.is_authenticated and not is_fresh():
                return redirect(url_for("login.reauthenticate", next=_return_to(back)), code=303)
            return fn(*args, **kwargs)

        return cast(F, wrapper)

    return decorate(view) if view is not None else decorate


def _mode(user: User) -> str:
    if accepts_code(user):
        return "code"
    if user.has_passkey:
        return "sign-in-again"
    return "password"


def _page(user: User, form: ReauthForm, status: int = 200) -> Any:
    page = render_template(
        "login_reauth.html", form=form, user=user, mode=_mode(user),
        again_form=SignInAgainForm(formdata=None, next=form.next.data),
    )
    return page, status


def _mark_reauthenticated(amr: list[str]) -> None:
    """A new session id with the same data, and the clocks restarted. ``auth_time`` and
    ``amr`` (what an ID token reports) change only when this authentication was at least
    as strong as the sign-in's (N26: a session is never reported stronger than it was)."""
    session.regenerate()  # type: ignore[attr-defined]
    now = time.time()
    session["authenticated_at"] = math.ceil(now * 1000) / 1000
    session["last_seen"] = int(now)
    # The session's acr is derived from its amr (idp/login/flow.py stores no "acr";
    # one stored by an older version is dropped here).
    session.pop("acr", None)
    if _ACR_RANK.get(acr_for(amr), 0) >= _ACR_RANK.get(acr_for(list(session.get("amr", []))), 0):
        session["auth_time"] = int(now)
        session["amr"] = amr


@bp.route("/login/reauth", methods=["GET", "POST"])
def reauthenticate() -> Any:
    next_url = safe_next(request.values.get("next")) or url_for("login.account")
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=next_url), code=302)
    svc = services()
    db = svc.db.session
    user = db.get(User, current_user.id)
    if user is None:
        return redirect(url_for("login.login"), code=302)
    form = ReauthForm()
    if request.method == "GET":
        form.next.data = next_url
        return _page(user, form)
    form.next.data = next_url
    if not form.validate_on_submit():
        return _page(user, form, 400)
    mode = _mode(user)
    if mode == "sign-in-again":
        return _page(user, form, 400)
    code = (form.code.data or "").strip()
    if mode == "code" and not code:
        form.code.errors = [*form.code.errors, _("Enter a code from the app or a recovery code.")]
        return _page(user, form, 400)
    svc.login_account_throttle.guard(user.login)
    # One message for either factor: the page does not say which of the two was wrong.
    wrong = _("The password or the code is incorrect.") if mode == "code" else _("The password is incorrect.")
    try:
        password_ok = check_password(user, form.password.data or "")
    except DirectoryUnavailable as exc:
        # Nothing was judged: nothing is counted; the person is told why (503).
        journal("account:reauth:failure", user, reason="directory-unavailable", details={"factor": "pwd"})
        db.commit()
        log.warning("directory unreachable at re-authentication of user %s: %s", user.id, exc)
        form.password.errors = [*form.password.errors, directory_unavailable_message()]
        return _page(user, form, 503)
    if not password_ok:
        journal("account:reauth:failure", user, reason="wrong-password", details={"factor": "pwd"})
        db.commit()
        form.password.errors = [*form.password.errors, wrong]
        return _page(user, form, 401)
    amr = ["pwd"]
    details: dict[str, Any] = {}
    if mode == "code":
        ok, method = check_second_factor(user, code)
        if not ok:
            journal("account:reauth:failure", user, reason="wrong-code", details={"factor": "otp", "method": method})
            db.commit()
            form.password.errors = [*form.password.errors, wrong]
            return _page(user, form, 401)
        amr = amr_for_code(method)
        if method == METHOD_RECOVERY_CODE:
            remaining = svc.two_factor.unused_recovery_codes(db, user.id)
            details["recovery_codes_left"] = remaining
            journal("mfa:recovery:use", user, reason="reauthentication", details={"recovery_codes_left": remaining})
    # N13: the whole re-authentication succeeded; the run of failures ends.
    svc.login_account_throttle.reset(user.login)
    journal("account:reauth:success", user, details={"amr": amr, **details})
    db.commit()
    _mark_reauthenticated(amr)
    return redirect(next_url, code=303)


@bp.post("/login/reauth/sign-in-again")
def reauth_sign_in_again() -> Any:
    """For an account whose second factor is a passkey: sign out and sign in afresh,
    coming back to the page that asked."""
    form = SignInAgainForm()
    next_url = safe_next(form.next.data) or url_for("login.account")
    if not form.validate_on_submit() or not current_user.is_authenticated:
        return redirect(url_for("login.login", next=next_url), code=303)
    login_hint = current_user.login
    uid = current_user.id
    sign_out()
    journal_user = services().db.session.get(User, uid)
    if journal_user is not None:
        journal("account:logout", journal_user, reason="reauthentication")
        services().db.session.commit()
    return redirect(url_for("login.login", next=next_url, login_hint=login_hint), code=303)
