"""``/activate``: a person sets their own password with the one-time code printed on
the card the school gave them, and is signed in.

Every failure of the code (unknown login, wrong, expired or used code, locked account)
gets one and the same message, so the page does not reveal which accounts exist.
AccountAdmin voids a code after 10 failures; this page also limits POSTs per client
IP, so codes cannot be guessed across many accounts from one place; a failed code also
counts against the client IP's sign-in throttle (guessing codes or passwords is the
same guessing), whose growing delays apply here too."""

from __future__ import annotations

from typing import Any

from flask import render_template, request
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from redis import Redis
from wtforms import StringField
from wtforms.validators import InputRequired, Length

from idp.accounts import password_policy
from idp.accounts.admin import ActivationError, redeem_activation_code
from idp.login import pending
from idp.login.required import NewPasswordForm
from idp.login.views import bp
from idp.notify.notices import notify
from idp.services import services

ACTIVATE_LIMIT = 20
ACTIVATE_WINDOW_SECONDS = 600


class ActivationForm(NewPasswordForm):
    login = StringField(
        validators=[InputRequired(message=_l("Enter your login.")), Length(max=128, message=_l("At most 128 characters."))]
    )
    code = StringField(
        validators=[
            InputRequired(message=_l("Enter the activation code from your card.")),
            Length(max=64, message=_l("At most 64 characters.")),
        ]
    )


def activation_attempts_exceeded(redis: Redis, ip: str) -> int | None:
    """Count one POST from ``ip``; the seconds to wait when over the limit, else None."""
    key = f"throttle:activate:{ip}"
    pipe = redis.pipeline(transaction=True)
    pipe.incr(key)
    pipe.ttl(key)
    count, ttl = pipe.execute()
    if ttl < 0:
        # The first POST of a window (or a counter left without expiry by a crash
        # between the two commands) starts the window.
        redis.expire(key, ACTIVATE_WINDOW_SECONDS)
        ttl = ACTIVATE_WINDOW_SECONDS
    if count > ACTIVATE_LIMIT:
        return max(1, int(ttl))
    return None


@bp.route("/activate", methods=["GET", "POST"])
def activate() -> Any:
    form = ActivationForm()
    if request.method == "GET":
        if request.args.get("login", "") and len(request.args["login"]) <= 128:
            form.login.data = request.args["login"]
        return render_template("activate.html", form=form, error=None)
    svc = services()
    wait = activation_attempts_exceeded(svc.redis, request.remote_addr or "unknown")
    if wait is not None:
        minutes = max(1, -(-wait // 60))
        page = render_template(
            "error.html",
            title=_("Too many attempts"),
            message=_("Too many activation attempts from this network. Try again in %(minutes)d minutes.",
                      minutes=minutes),
        )
        return page, 429, {"Retry-After": str(wait)}
    client_ip = request.remote_addr or "unknown"
    svc.login_ip_throttle.guard(client_ip)
    login_name = (form.login.data or "").strip().casefold()
    # The account is not known yet, so only the lowest minimum is checked here (checking
    # its own would tell a stranger whether it has a second factor); its own is below.
    if not form.validate_on_submit() or not form.check(
        login=login_name, min_length=password_policy.MIN_LENGTH_WITH_SECOND_FACTOR
    ):
        return render_template("activate.html", form=form, error=None), 400
    db = svc.db.session
    try:
        user = redeem_activation_code(
            db, svc.passwords, svc.journal, login=login_name, code=form.code.data, new_password=form.password.data,
            ip=request.remote_addr,
        )
    except ActivationError:
        # Keep the failure count and the journal event of the failed attempt.
        db.commit()
        svc.login_ip_throttle.fail(client_ip)
        error = _("The login or activation code is not valid, or the code has expired or was already used.")
        return render_template("activate.html", form=form, error=error), 400
    # The names are checked only now that the card's code proved who this is: checking
    # them earlier would tell anyone typing a login whether that person's name is in it.
    if not form.check(
        login=login_name, names=[user.display_name],
        min_length=password_policy.minimum_length(has_second_factor=user.has_second_factor or user.requires_2fa),
    ):
        db.rollback()
        return render_template("activate.html", form=form, error=None), 400
    # The account's password was just set by someone holding its card: whatever was
    # signed in before ends, as after any password change, and the account's address
    # is told (issue 4), in the same transaction.
    svc.sessions.end_all(db, user.id)
    notify(db, svc.outbox, user, "password_changed")
    db.commit()
    # The card proved who this is and set the password; the rest of the sign-in is the
    # pending chain (ASVS 6.4.3: a card resets the password, never the second factor).
    return pending.begin(user, ["pwd"], None, None)
