"""Self-service password reset by e-mail link (issue 4).

``/password/forgot``: the person types their login or e-mail address. The answer is the
same page whether or not an account exists, has a verified address or may sign in, and
the same work is done either way (no account enumeration). Only an account that can
sign in and has a *verified* address gets a link. Requests are limited per client IP,
per login or address typed and per account mailed (ASVS 2.4.1), answered 429 with
Retry-After.

``/password/reset/<token>``: the link (256 random bits, kept hashed in Redis for
``password_reset_ttl_seconds``) works once, and no longer once the password changed or
the address changed or lost its verification after it was sent. A GET only shows a page.
A reset never bypasses the second factor (ASVS 6.4.3): an account with TOTP gives a code
from the app or a recovery code first, in this browser; an account whose only second
factor is a passkey is sent to technical support (a passkey step here is not built).
The new password passes the same policy as everywhere. Afterwards every session and
token of the account ends, a password disabled after too many failures is enabled again
(mailbox plus second factor prove control; journalled), the "password changed" mail is
sent, and the person signs in with the new password: the reset itself signs no one in."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from flask import flash, g, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from wtforms import StringField
from wtforms.validators import InputRequired, Length

from idp.accounts import email_address
from idp.accounts.links import OneTimeLinks
from idp.accounts.models import User
from idp.login.factors import METHOD_RECOVERY_CODE, accepts_code, check_second_factor, journal
from idp.login.password_check import directory_managed
from idp.login.required import NewPasswordForm, save_new_password
from idp.login.throttle import PASSWORD, is_disabled
from idp.login.views import bp
from idp.notify.notices import notify
from idp.services import services

LINK_PURPOSE = "pwreset"
# The second factor given for a link in this browser stays good this long.
FACTOR_KEY = "password_reset_factor"
FACTOR_SECONDS = 600
# Siblings may share a parent's address: each account at it gets its own link, up to this.
MAX_ACCOUNTS_PER_ADDRESS = 5


class ForgotForm(FlaskForm):
    login = StringField(
        validators=[
            InputRequired(message=_l("Enter your login or e-mail address.")),
            Length(max=email_address.MAX_LENGTH, message=_l("At most 320 characters.")),
        ]
    )


class ResetCodeForm(FlaskForm):
    code = StringField(
        validators=[
            InputRequired(message=_l("Enter a code from the app or a recovery code.")),
            Length(max=64, message=_l("At most 64 characters.")),
        ]
    )


def _links() -> OneTimeLinks:
    return OneTimeLinks(redis=services().redis, purpose=LINK_PURPOSE)


def _password_state(user: User) -> str:
    """Changes whenever the password does (by any path: this page, support, the CLI), so
    a link sent before a change stops working."""
    changed = user.password_changed_at.isoformat() if user.password_changed_at else ""
    return hashlib.sha256(f"{user.password_hash or ''}|{changed}".encode()).hexdigest()[:32]


def _may_mail(user: User) -> bool:
    return (user.can_sign_in and user.email_verified
            and email_address.normalise_email(user.email) is not None)


def _may_reset(user: User) -> bool:
    # A directory account's password is the directory's (idp/login/password_check.py).
    return _may_mail(user) and not directory_managed(user)


def _accounts_for(identifier: str) -> list[User]:
    db = services().db.session
    if "\x00" in identifier:
        # PostgreSQL refuses a NUL in a query; no login or address holds one.
        return []
    if "@" in identifier:
        # Logins never contain "@" (idp/accounts/service.py LOGIN_PATTERN).
        return list(db.scalars(
            select(User).where(func.lower(User.email) == identifier.lower(), User.email_verified_at.is_not(None))
            .order_by(User.id).limit(MAX_ACCOUNTS_PER_ADDRESS)
        ))
    user = db.scalar(select(User).where(User.login == identifier))
    return [user] if user is not None else []


def _reset_url(token: str) -> str:
    return services().settings.issuer + url_for("login.reset_password", token=token)


def _expires_minutes() -> int:
    return max(1, services().settings.password_reset_ttl_seconds // 60)


def _send_link(user: User) -> None:
    svc = services()
    token = _links().issue(
        {"uid": user.id, "email": user.email, "pw": _password_state(user)},
        ttl=svc.settings.password_reset_ttl_seconds,
    )
    notify(svc.db.session, svc.outbox, user, "password_reset_link", login=user.login,
           reset_url=_reset_url(token), expires_minutes=_expires_minutes())


def _same_work_as_sending() -> None:
    """What sending costs, without sending: a token and a rendered message, so the answer
    takes about as long whether or not a link went out."""
    svc = services()
    token = secrets.token_urlsafe(32)
    hashlib.sha256(token.encode()).hexdigest()
    svc.outbox.render("password_reset_link", svc.outbox.locale_for(None), {
        "display_name": "-", "login": "-", "reset_url": _reset_url(token), "expires_minutes": _expires_minutes(),
    })


@bp.route("/password/forgot", methods=["GET", "POST"])
def forgot_password() -> Any:
    form = ForgotForm()
    if request.method == "GET":
        return render_template("password_forgot.html", form=form)
    if not form.validate_on_submit():
        return render_template("password_forgot.html", form=form), 400
    svc = services()
    db = svc.db.session
    client_ip = request.remote_addr or "unknown"
    identifier = (form.login.data or "").strip().casefold()
    # Checked per string typed, before any lookup, so a 429 says nothing about accounts.
    svc.password_reset_ip_throttle.guard(client_ip)
    svc.password_reset_throttle.guard(f"ask:{identifier}")
    svc.password_reset_ip_throttle.fail(client_ip)
    svc.password_reset_throttle.fail(f"ask:{identifier}")
    accounts = _accounts_for(identifier)
    sent = 0
    for user in accounts:
        if directory_managed(user) and _may_mail(user):
            # No link: the person is told, at their own address, to change it in the
            # directory (the page's answer stays the same for every account).
            if svc.password_reset_throttle.fail(f"user:{user.id}") > svc.password_reset_throttle.free_failures:
                journal("account:password:reset-requested", user, actor="anonymous", reason="throttled",
                        details={"sent": False})
                continue
            notify(db, svc.outbox, user, "password_reset_directory", login=user.login)
            journal("account:password:reset-requested", user, actor="anonymous", reason="directory-account",
                    details={"sent": False, "notice": True})
            sent += 1
            continue
        if not _may_reset(user):
            journal("account:password:reset-requested", user, actor="anonymous", reason="not-eligible",
                    details={"sent": False})
            continue
        # Per account too, however it was named (login or address): at most the free
        # allowance of links in the window, silently (the answer stays the same).
        if svc.password_reset_throttle.fail(f"user:{user.id}") > svc.password_reset_throttle.free_failures:
            journal("account:password:reset-requested", user, actor="anonymous", reason="throttled",
                    details={"sent": False})
            continue
        _send_link(user)
        journal("account:password:reset-requested", user, actor="anonymous", details={"sent": True})
        sent += 1
    if not sent:
        _same_work_as_sending()
    if not accounts:
        svc.journal.record(
            db, actor="anonymous", action="account:password:reset-requested", reason="unknown",
            ip=request.remote_addr, request_id=getattr(g, "request_id", None),
            details={"identifier": identifier[:64], "sent": False},
        )
    db.commit()
    return render_template("password_forgot_sent.html")


def _link_user(data: dict[str, Any] | None) -> User | None:
    """The account a link is for, while the link still holds for it."""
    if data is None:
        return None
    user = services().db.session.get(User, data.get("uid"))
    if user is None or not _may_reset(user):
        return None
    if not email_address.same_address(user.email, data.get("email")) or data.get("pw") != _password_state(user):
        return None
    return user


def _invalid_link() -> Any:
    page = render_template(
        "error.html", title=_("This link does not work"),
        message=_("The link is not valid, has expired or was already used. Ask for a new one with "
                  "“Forgot your password?” on the sign-in page."),
    )
    return page, 400


def _factor_given(user: User, link_id: str) -> str | None:
    """The method of the second factor given for this link in this browser, if any."""
    proof = session.get(FACTOR_KEY)
    if (isinstance(proof, dict) and proof.get("link") == link_id and proof.get("uid") == user.id
            and proof.get("expires", 0) > time.time()):
        return str(proof.get("method"))
    return None


@bp.route("/password/reset/<token>", methods=["GET", "POST"])
def reset_password(token: str) -> Any:
    links = _links()
    user = _link_user(links.peek(token))
    if user is None:
        return _invalid_link()
    svc = services()
    db = svc.db.session
    if not accepts_code(user) and user.has_second_factor:
        # Only a passkey: it cannot be checked on this page, and the reset must not skip it.
        return render_template("password_reset.html", step="support", user=user)
    # Identifies the link in the session without keeping the link itself there.
    link_id = hashlib.sha256(token.encode()).hexdigest()[:32]
    method = _factor_given(user, link_id) if accepts_code(user) else "none"
    if method is None:
        code_form = ResetCodeForm()
        if request.method == "GET":
            return render_template("password_reset.html", step="code", form=code_form, user=user, token=token)
        if not code_form.validate_on_submit():
            return render_template("password_reset.html", step="code", form=code_form, user=user, token=token), 400
        svc.login_account_throttle.guard(user.login)
        ok, method = check_second_factor(user, code_form.code.data or "")
        if not ok:
            journal("account:password:reset-failure", user, actor="anonymous", reason="wrong-code",
                    details={"method": method})
            db.commit()
            code_form.code.errors = [*code_form.code.errors, _("The code is incorrect.")]
            return render_template("password_reset.html", step="code", form=code_form, user=user, token=token), 401
        if method == METHOD_RECOVERY_CODE:
            journal("mfa:recovery:use", user, actor="anonymous", reason="password-reset",
                    details={"recovery_codes_left": svc.two_factor.unused_recovery_codes(db, user.id)})
        db.commit()
        # A new session id for the browser that now holds a proven factor (ASVS 7.2.4).
        session.regenerate()  # type: ignore[attr-defined]
        session[FACTOR_KEY] = {"link": link_id, "uid": user.id, "method": method,
                               "expires": time.time() + FACTOR_SECONDS}
        return redirect(url_for("login.reset_password", token=token), code=303)
    form = NewPasswordForm().for_account(user)
    if request.method == "GET":
        return render_template("password_reset.html", step="password", form=form, user=user, token=token)
    if not form.validate_on_submit() or not form.check(
        login=user.login, names=[user.display_name], current_hash=user.password_hash, passwords=svc.passwords
    ):
        return render_template("password_reset.html", step="password", form=form, user=user, token=token), 400
    # Used up here, atomically: of two racing requests only one gets past this line.
    data = links.consume(token)
    if data is None or _link_user(data) is not user:
        return _invalid_link()
    was_disabled = is_disabled(user, PASSWORD)
    save_new_password(
        db, svc.passwords, svc.journal, user, form.password.data or "", ip=request.remote_addr,
        request_id=getattr(g, "request_id", None), required=False, ended_other_sessions=True,
        action="account:password:reset", details={"second_factor": method},
    )
    # N12/N13: the mailbox and the second factor proved control; the new password starts
    # with no failures, enabled.
    user.password_failures = 0
    user.password_disabled_at = None
    if was_disabled:
        journal("account:credential:enabled", user, reason="password-reset", details={"credential": PASSWORD.kind})
    svc.sessions.end_all(db, user.id)
    db.commit()
    svc.login_account_throttle.reset(user.login)
    session.pop(FACTOR_KEY, None)
    if session.get("uid") == user.id:
        # This browser's own session of the account ended with the others just above;
        # its data must not be written back under the old id.
        keep = {k: session[k] for k in ("lang", "ui_locales") if k in session}
        session.clear()
        session.regenerate()  # type: ignore[attr-defined]
        session.update(keep)
    flash(_("Your password was changed. Sign in with your new password."))
    return redirect(url_for("login.login"), code=303)
