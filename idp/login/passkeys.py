"""Passkeys (WebAuthn) in the browser: the phishing-resistant option (issue 4, N23).

Account pages (signed in, recent sign-in required): the list on ``/account/2fa``; add a
passkey (JSON: options, then the authenticator's answer with a name); rename or remove
one on its own page. Each change is journalled (``mfa:passkey:add|rename|remove``) and
additions and removals are announced by mail, in the same transaction.

Sign-in: the second step after the password (``/login/second-factor``, amr gains
"hwk" and "mfa") and passwordless sign-in from ``/login`` with a discoverable passkey
and user verification (amr ``["hwk", "user", "mfa"]``), both continuing through the
pending chain (idp/login/pending.py). The ceremonies run in idp/static/passkeys.js
(CSP ``script-src 'self'``); these endpoints answer JSON, take the form token in the
``X-CSRFToken`` header, and answer every failed sign-in with the same message."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from flask import (
    abort,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import StringField
from wtforms.validators import InputRequired, Length

from idp.accounts.models import Passkey, User
from idp.login import pending
from idp.login.factors import journal as _journal
from idp.login.reauth import fresh_auth_required, is_fresh
from idp.login.throttle import Throttled
from idp.login.views import bp, safe_next
from idp.mfa.passkeys import NAME_MAX, PasskeyCloned, PasskeyRejected, clean_name
from idp.notify.notices import BISHKEK, notify
from idp.services import services

F = TypeVar("F", bound=Callable[..., Any])

# The challenge handles of this browser's ceremonies in progress, one per purpose.
CHALLENGES_KEY = "passkey_challenges"


class RenamePasskeyForm(FlaskForm):
    name = StringField(
        validators=[
            InputRequired(message=_l("Enter a name for the passkey.")),
            Length(max=NAME_MAX, message=_l("At most 64 characters.")),
        ]
    )


class RemovePasskeyForm(FlaskForm):
    pass


# --- helpers ---------------------------------------------------------------------------

def _signed_in_user() -> User | None:
    if not current_user.is_authenticated:
        return None
    return services().db.session.get(User, current_user.id)


def _no_store(response: Any) -> Any:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


def _notify(user: User, template: str) -> None:
    """Announce a passkey added or removed, in the current transaction (mfa_added /
    mfa_removed say "a passkey" for ``method == "webauthn"``)."""
    svc = services()
    notify(svc.db.session, svc.outbox, user, template, method="webauthn")


def _json_error(code: str, message: str, status: int, **extra: Any) -> Any:
    response = jsonify({"error": code, "message": message, **extra})
    response.status_code = status
    return _no_store(response)


def _json_ok(**body: Any) -> Any:
    return _no_store(jsonify({"ok": True, **body}))


def _throttled(e: Throttled) -> Any:
    response = _json_error("too_many_requests", _("Too many failed sign-in attempts. Try again later."), 429)
    response.headers["Retry-After"] = str(e.retry_after)
    return response


def _remember_challenge(purpose: str, handle: str) -> None:
    """One live challenge per purpose and browser: asking again drops the older one, so
    a script asking in a loop does not pile up challenges in Redis."""
    handles = dict(session.get(CHALLENGES_KEY) or {})
    services().passkeys.challenges.discard(handles.get(purpose))
    handles[purpose] = handle
    session[CHALLENGES_KEY] = handles


def _take_challenge_handle(purpose: str) -> str | None:
    handles = dict(session.get(CHALLENGES_KEY) or {})
    handle = handles.pop(purpose, None)
    session[CHALLENGES_KEY] = handles
    return handle if isinstance(handle, str) else None


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def _redirect_target(response: Any) -> str:
    """The Location of a redirect the pending chain answered (for the script to follow)."""
    return str(response.headers.get("Location") or url_for("login.account"))


def _sign_in_failed(*, second_step: bool = False) -> Any:
    # One answer for every failure: unknown passkey, wrong account, bad signature,
    # expired or replayed challenge. Nothing tells whether an account exists.
    message = (_("The passkey was not accepted. Try again.") if second_step
               else _("The passkey was not accepted. Try again or sign in with your password."))
    return _json_error("passkey_rejected", message, 401)


def _fresh_json(view: F) -> F:
    """``fresh_auth_required`` for the script's endpoints: a stale sign-in gets a JSON
    answer naming the "Confirm it's you" page (a redirect would only confuse fetch)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_user.is_authenticated and not is_fresh():
            return _json_error(
                "reauth_required", _("Confirm it's you first: sign in again to change your passkeys."), 401,
                redirect=url_for("login.reauthenticate", next=url_for("login.two_factor_status")),
            )
        return view(*args, **kwargs)

    return cast(F, wrapper)


@bp.app_template_filter("school_time")
def school_time(value: datetime | None) -> str:
    """A stored UTC time as the school reads it (Asia/Bishkek), for the passkey lists."""
    if value is None:
        return ""
    return value.replace(tzinfo=UTC).astimezone(BISHKEK).strftime("%Y-%m-%d %H:%M")


def _own_passkey(user: User, passkey_id: int) -> Passkey:
    passkey = next((p for p in user.passkeys if p.id == passkey_id), None)
    if passkey is None:
        abort(404)
    return passkey


def _is_last_required_factor(user: User) -> bool:
    """Removing one passkey would leave an account whose role requires 2FA without any
    second factor."""
    return user.requires_2fa and not user.has_totp and len(user.passkeys) <= 1


# --- account: add ----------------------------------------------------------------------

@bp.post("/account/passkeys/options")
@_fresh_json
def passkey_registration_options() -> Any:
    user = _signed_in_user()
    if user is None:
        return _json_error("login_required", _("Sign in first."), 401)
    options, handle = services().passkeys.registration_options(user)
    _remember_challenge("register", handle)
    return _json_ok(publicKey=options)


@bp.post("/account/passkeys")
@_fresh_json
def passkey_register() -> Any:
    user = _signed_in_user()
    if user is None:
        return _json_error("login_required", _("Sign in first."), 401)
    body = _body()
    name = clean_name(body.get("name") if isinstance(body.get("name"), str) else "")
    if not name:
        name = _("Passkey %(num)d", num=len(user.passkeys) + 1)
    svc = services()
    db = svc.db.session
    try:
        passkey = svc.passkeys.register(db, user, _take_challenge_handle("register"), body.get("credential"), name)
    except PasskeyRejected as e:
        db.rollback()
        _journal("mfa:passkey:add-failure", user, reason=e.reason)
        db.commit()
        if e.reason == "already-registered":
            return _json_error("already_registered", _("This passkey is already registered."), 400)
        return _json_error("passkey_rejected", _("The passkey could not be added. Try again."), 400)
    _journal("mfa:passkey:add", user, details={
        "method": "webauthn", "passkey": passkey.id, "name": passkey.name, "aaguid": passkey.aaguid,
        "backed_up": passkey.backed_up,
    })
    _notify(user, "mfa_added")
    db.commit()
    return _json_ok(redirect=url_for("login.two_factor_status"), id=passkey.id, name=passkey.name)


# --- account: rename and remove --------------------------------------------------------

def _passkey_page(user: User, passkey: Passkey, rename_form: RenamePasskeyForm, remove_form: RemovePasskeyForm,
                  status: int = 200, *, remove_error: str | None = None) -> Any:
    page = render_template(
        "account_passkey.html", user=user, passkey=passkey, rename_form=rename_form, remove_form=remove_form,
        remove_error=remove_error, last_required=_is_last_required_factor(user),
    )
    return _no_store(make_response(page, status))


@bp.get("/account/passkeys/<int:passkey_id>")
@fresh_auth_required
def passkey_detail(passkey_id: int) -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login", next=url_for("login.two_factor_status")), code=302)
    passkey = _own_passkey(user, passkey_id)
    rename_form = RenamePasskeyForm(formdata=None, data={"name": passkey.name})
    return _passkey_page(user, passkey, rename_form, RemovePasskeyForm(formdata=None))


@bp.post("/account/passkeys/<int:passkey_id>/rename")
@fresh_auth_required(back="login.two_factor_status")
def passkey_rename(passkey_id: int) -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login"), code=302)
    passkey = _own_passkey(user, passkey_id)
    form = RenamePasskeyForm()
    valid = form.validate_on_submit()
    if valid and not clean_name(form.name.data):
        # Only spaces or control characters: nothing would be left of the name.
        form.name.errors = [*form.name.errors, _("Enter a name for the passkey.")]
        valid = False
    if not valid:
        return _passkey_page(user, passkey, form, RemovePasskeyForm(formdata=None), 400)
    svc = services()
    old_name = passkey.name
    svc.passkeys.rename(passkey, form.name.data or "")
    _journal("mfa:passkey:rename", user, details={"passkey": passkey.id, "from": old_name, "to": passkey.name})
    svc.db.session.commit()
    return redirect(url_for("login.two_factor_status"), code=303)


@bp.post("/account/passkeys/<int:passkey_id>/remove")
@fresh_auth_required(back="login.two_factor_status")
def passkey_remove(passkey_id: int) -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login"), code=302)
    passkey = _own_passkey(user, passkey_id)
    form = RemovePasskeyForm()
    rename_form = RenamePasskeyForm(formdata=None, data={"name": passkey.name})
    if not form.validate_on_submit():
        return _passkey_page(user, passkey, rename_form, form, 400)
    svc = services()
    db = svc.db.session
    if _is_last_required_factor(user):
        # A role of this account requires a second factor: the last one cannot go
        # (the same rule holds for the authenticator app).
        _journal("mfa:passkey:remove-refused", user, reason="last-required-factor", details={"passkey": passkey.id})
        db.commit()
        return _passkey_page(user, passkey, rename_form, form, 400, remove_error=_(
            "Your role requires a second sign-in step. Add another passkey or an authenticator app "
            "before you remove this one."))
    details = {"method": "webauthn", "passkey": passkey.id, "name": passkey.name}
    svc.passkeys.remove(db, user, passkey)
    _journal("mfa:passkey:remove", user, details=details)
    _notify(user, "mfa_removed")
    db.commit()
    return redirect(url_for("login.two_factor_status"), code=303)


# --- sign-in: the second step after the password ---------------------------------------

@bp.post("/login/second-factor/passkey/options")
def passkey_second_factor_options() -> Any:
    found = pending.current(pending.SECOND_FACTOR)
    if found is None:
        return _json_error("expired", _("The sign-in has expired. Start again."), 401,
                           redirect=url_for("login.login"))
    _state, user = found
    if not user.has_passkey:
        return _sign_in_failed(second_step=True)
    try:
        services().login_account_throttle.guard(user.login)
    except Throttled as e:
        return _throttled(e)
    options, handle = services().passkeys.authentication_options(user)
    _remember_challenge("second-factor", handle)
    return _json_ok(publicKey=options)


@bp.post("/login/second-factor/passkey")
def passkey_second_factor() -> Any:
    found = pending.current(pending.SECOND_FACTOR)
    if found is None:
        return _json_error("expired", _("The sign-in has expired. Start again."), 401,
                           redirect=url_for("login.login"))
    _state, user = found
    svc = services()
    db = svc.db.session
    try:
        svc.login_account_throttle.guard(user.login)
    except Throttled as e:
        return _throttled(e)
    handle = _take_challenge_handle("second-factor")
    try:
        passkey = svc.passkeys.authenticate(db, handle, _body().get("credential"), user=user)
    except PasskeyRejected as e:
        db.rollback()
        # Counted like a wrong code: the account's throttle goes on after the password.
        svc.login_account_throttle.fail(user.login)
        _record_rejection(e, user, step="second-factor")
        db.commit()
        return _sign_in_failed(second_step=True)
    db.commit()
    # N13: the whole sign-in succeeded; the run of failures ends.
    svc.login_account_throttle.reset(user.login)
    done = pending.advance(user, step=pending.SECOND_FACTOR, add_amr=["hwk"], details={"passkey": passkey.id})
    return _json_ok(redirect=_redirect_target(done))


# --- sign-in: passwordless -------------------------------------------------------------

def _flow_and_next(body: dict[str, Any]) -> tuple[str | None, str | None]:
    flow = body.get("flow") if isinstance(body.get("flow"), str) else None
    if flow is not None and (not flow or len(flow) > 64 or not flow.replace("-", "").replace("_", "").isalnum()):
        flow = None
    next_url = body.get("next") if isinstance(body.get("next"), str) else None
    return flow, safe_next(next_url)


@bp.post("/login/passkey/options")
def passkey_login_options() -> Any:
    svc = services()
    wait = svc.login_ip_throttle.check(request.remote_addr or "unknown")
    if wait:
        return _throttled(Throttled(wait, "login"))
    options, handle = svc.passkeys.authentication_options(None)
    _remember_challenge("passwordless", handle)
    return _json_ok(publicKey=options)


@bp.post("/login/passkey")
def passkey_login() -> Any:
    svc = services()
    db = svc.db.session
    client_ip = request.remote_addr or "unknown"
    # The same per-IP limit as the password (checked before anything is looked up).
    wait = svc.login_ip_throttle.check(client_ip)
    if wait:
        return _throttled(Throttled(wait, "login"))
    body = _body()
    try:
        passkey = svc.passkeys.authenticate(db, _take_challenge_handle("passwordless"), body.get("credential"),
                                            user=None)
    except PasskeyRejected as e:
        db.rollback()
        svc.login_ip_throttle.fail(client_ip)
        owner = db.get(User, e.user_id) if e.user_id is not None else None
        if owner is not None:
            svc.login_account_throttle.fail(owner.login)
        _record_rejection(e, owner, step="passwordless")
        db.commit()
        return _sign_in_failed()
    user = db.get(User, passkey.user_id)
    if user is None:  # deleted meanwhile
        db.rollback()
        return _sign_in_failed()
    if not user.can_sign_in:
        # Only the holder of a working passkey learns this, as with a right password.
        db.rollback()
        _journal("account:login:refused", user, actor="anonymous", reason="locked" if user.locked else "disabled",
                 details={"login": user.login[:64], "factor": "hwk"})
        db.commit()
        return _json_error("account_locked", _("This account is locked. Contact the school's technical support."), 403)
    db.commit()
    svc.login_account_throttle.reset(user.login)
    flow, next_url = _flow_and_next(body)
    # Possession of the passkey plus the device's PIN or biometric (required above):
    # two factors in one (NIST 800-63B-4 multi-factor cryptographic authenticator).
    done = pending.begin(user, ["hwk", "user", "mfa"], flow, next_url)
    return _json_ok(redirect=_redirect_target(done))


def _record_rejection(e: PasskeyRejected, user: User | None, *, step: str) -> None:
    """Journal a refused passkey sign-in (and a suspected clone) without committing."""
    svc = services()
    details: dict[str, Any] = {"factor": "hwk", "step": step}
    if user is not None:
        details["login"] = user.login[:64]
    if e.passkey_id is not None:
        details["passkey"] = e.passkey_id
    svc.journal.record(
        svc.db.session, actor="anonymous", action="account:login:failure",
        subject=f"user:{user.id}" if user is not None else None, reason=e.reason,
        ip=request.remote_addr, request_id=getattr(g, "request_id", None), details=details,
    )
    if isinstance(e, PasskeyCloned) and user is not None:
        # WebAuthn §6.1.1: a counter that did not grow hints at a copied authenticator;
        # support sees it in the journal and can remove the passkey.
        _journal("mfa:passkey:clone-suspected", user, actor="system", reason=e.reason,
                 details={"passkey": e.passkey_id})

