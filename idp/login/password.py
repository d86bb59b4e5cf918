"""``/account/password``: a signed-in person changes their own password.

The page needs a recent sign-in (ASVS 7.5.1, idp/login/reauth.py) and still asks for
the current password first (ASVS 6.2.3), so that someone at an unlocked screen cannot
take the account over. The new password passes the same policy as at
/activate and the required change. Afterwards this browser stays signed in (its
session is re-created, since sessions older than the last password change are no
longer accepted) and every other session and the portal apps' tokens end (ASVS
7.4.3): sessions that began before the change are refused anyway, so ending them
explicitly is the one honest behaviour, not an option. A wrong current password counts
like a failed sign-in (throttle and the 100-failure limit)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from wtforms import PasswordField
from wtforms.validators import InputRequired, Length

from idp.accounts.models import User
from idp.login.flow import complete_sign_in
from idp.login.password_check import directory_managed, directory_password_message
from idp.login.reauth import fresh_auth_required
from idp.login.required import MAX_PASSWORD_LENGTH, NewPasswordForm, save_new_password
from idp.login.throttle import (
    PASSWORD,
    Throttled,
    is_disabled,
    record_credential_failure,
    reset_credential_failures,
)
from idp.login.views import bp
from idp.services import services

F = TypeVar("F", bound=Callable[..., Any])


class ChangePasswordForm(NewPasswordForm):
    current_password = PasswordField(
        validators=[
            InputRequired(message=_l("Enter your current password.")),
            Length(max=4 * MAX_PASSWORD_LENGTH),
        ]
    )


def local_password_only(view: F) -> F:
    """The school directory manages a directory account's password: the page says so
    (403) instead of asking for a re-authentication and a new password."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_user.is_authenticated and directory_managed(current_user):
            page = render_template("error.html", title=_("Password managed by the school directory"),
                                   message=directory_password_message())
            return page, 403
        return view(*args, **kwargs)

    return cast(F, wrapper)


@bp.route("/account/password", methods=["GET", "POST"])
@local_password_only
@fresh_auth_required
def change_password() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=url_for("login.change_password")), code=302)
    svc = services()
    db = svc.db.session
    user = db.get(User, current_user.id)
    if user is None:
        return redirect(url_for("login.login"), code=302)
    form = ChangePasswordForm().for_account(user)
    if request.method == "GET":
        return render_template("account_password.html", form=form)
    if not form.validate_on_submit():
        return render_template("account_password.html", form=form), 400
    wait = svc.login_account_throttle.check(user.login)
    if wait:
        raise Throttled(wait, "password-change")
    if not svc.passwords.verify(user.password_hash, form.current_password.data) or is_disabled(user, PASSWORD):
        svc.login_account_throttle.fail(user.login)
        disabled = record_credential_failure(db, user.id, PASSWORD, limit=svc.settings.credential_max_failures)
        form.current_password.errors = [*form.current_password.errors, _("The current password is incorrect.")]
        svc.journal.record(
            db, actor=f"user:{user.id}", action="account:password:change-failure", subject=f"user:{user.id}",
            reason="wrong-current-password", ip=request.remote_addr, request_id=getattr(g, "request_id", None),
        )
        if disabled:
            svc.journal.record(
                db, actor="system", action="account:credential:disabled", subject=f"user:{user.id}",
                reason="too-many-failures", ip=request.remote_addr, request_id=getattr(g, "request_id", None),
            )
        db.commit()
        return render_template("account_password.html", form=form), 400
    svc.login_account_throttle.reset(user.login)
    reset_credential_failures(db, user.id, PASSWORD)
    if not form.check(
        login=user.login, names=[user.display_name], current_hash=user.password_hash, passwords=svc.passwords
    ):
        return render_template("account_password.html", form=form), 400
    save_new_password(
        db, svc.passwords, svc.journal, user, form.password.data, ip=request.remote_addr,
        request_id=getattr(g, "request_id", None), required=False, ended_other_sessions=True,
    )
    # Ends every session, this one included, and the tokens of every portal app; this
    # browser is signed in again just below.
    svc.sessions.end_all(db, user.id)
    db.commit()
    # The person just proved their password here: a fresh sign-in (new session id) that
    # keeps what this session's sign-in did (the second factor is not undone).
    complete_sign_in(user, [str(m) for m in session.get("amr") or ["pwd"]])
    return redirect(url_for("login.password_changed"), code=303)


@bp.get("/account/password/changed")
def password_changed() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login"), code=302)
    return render_template("account_password_changed.html")
