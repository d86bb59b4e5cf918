"""``/account/email``: a signed-in person sets or verifies their e-mail address.

A verified address is what a password-reset link may be sent to, so it is treated like a
credential: the page needs a fresh sign-in (ASVS 7.5.1), and a new address replaces the
old one only when a link mailed to the new address is opened and confirmed. The old
address is told at once. A link carries 256 random bits, is kept hashed in Redis for 24
hours, is bound to the account and the address, works once, and only the newest link of
an account works. Opening a link only shows a button (mail scanners open links); the
POST of that button confirms."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import flash, get_flashed_messages, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import StringField
from wtforms.validators import InputRequired, Length

from idp.accounts import email_address
from idp.accounts.links import OneTimeLinks
from idp.accounts.models import User
from idp.login.factors import journal
from idp.login.reauth import fresh_auth_required
from idp.login.views import bp
from idp.notify.notices import notify
from idp.services import services

LINK_PURPOSE = "email-verify"
LINK_HOURS = 24
KIND_CHANGE = "change"
KIND_VERIFY = "verify"


class NewAddressForm(FlaskForm):
    email = StringField(
        validators=[
            InputRequired(message=_l("Enter an e-mail address.")),
            Length(max=email_address.MAX_LENGTH, message=_l("At most 320 characters.")),
        ]
    )


class SendLinkForm(FlaskForm):
    pass


class ConfirmForm(FlaskForm):
    pass


def _links() -> OneTimeLinks:
    return OneTimeLinks(redis=services().redis, purpose=LINK_PURPOSE)


def _signed_in_user() -> User | None:
    if not current_user.is_authenticated:
        return None
    return services().db.session.get(User, current_user.id)


def _page(user: User, form: NewAddressForm | None = None, status: int = 200) -> Any:
    page = render_template(
        "account_email.html", user=user, form=form or NewAddressForm(formdata=None),
        send_form=SendLinkForm(formdata=None), notices=get_flashed_messages(),
    )
    return page, status


def _send_link(user: User, address: str, kind: str) -> None:
    """Mail a verification link for ``address`` (in the caller's transaction). Counts
    against the account's mail allowance; raises ``Throttled`` when it is used up."""
    svc = services()
    svc.email_link_throttle.guard(f"user:{user.id}")
    svc.email_link_throttle.fail(f"user:{user.id}")
    token = _links().issue(
        {"uid": user.id, "email": address, "kind": kind}, ttl=LINK_HOURS * 3600, user_id=user.id,
        replace_earlier=True,
    )
    notify(
        svc.db.session, svc.outbox, user, "email_verify", to=address, login=user.login,
        verify_url=svc.settings.issuer + url_for("login.verify_email", token=token), expires_hours=LINK_HOURS,
    )


@bp.route("/account/email", methods=["GET", "POST"])
@fresh_auth_required
def email_address_page() -> Any:
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login", next=url_for("login.email_address_page")), code=302)
    if request.method == "GET":
        return _page(user)
    form = NewAddressForm()
    if not form.validate_on_submit():
        return _page(user, form, 400)
    address = email_address.normalise_email(form.email.data)
    if address is None:
        form.email.errors = [*form.email.errors, _("The e-mail address is not valid.")]
        return _page(user, form, 400)
    if email_address.same_address(address, user.email) and user.email_verified:
        form.email.errors = [*form.email.errors, _("This is already your verified address.")]
        return _page(user, form, 400)
    svc = services()
    db = svc.db.session
    kind = KIND_VERIFY if email_address.same_address(address, user.email) else KIND_CHANGE
    _send_link(user, address, kind)
    if kind == KIND_CHANGE and user.email:
        # The old address hears of it at once: if this was not its owner, support can act
        # before the new address is confirmed.
        notify(db, svc.outbox, user, "email_change_notice", new_email=email_address.mask_email(address))
    journal("account:email:change-requested" if kind == KIND_CHANGE else "account:email:verification-requested",
            user, details={"email": address, "previous": user.email})
    db.commit()
    flash(_("We sent a link to %(address)s. Open it within %(hours)d hours to confirm the address.",
            address=address, hours=LINK_HOURS))
    return redirect(url_for("login.email_address_page"), code=303)


@bp.post("/account/email/send-link")
@fresh_auth_required(back="login.email_address_page")
def send_email_link() -> Any:
    """A new verification link for the current, not yet verified address."""
    user = _signed_in_user()
    if user is None:
        return redirect(url_for("login.login"), code=302)
    form = SendLinkForm()
    if not form.validate_on_submit() or not user.email or user.email_verified:
        return redirect(url_for("login.email_address_page"), code=303)
    address = email_address.normalise_email(user.email)
    if address is None:
        flash(_("Your current address cannot receive mail from us. Enter it again or give another one."))
        return redirect(url_for("login.email_address_page"), code=303)
    svc = services()
    _send_link(user, user.email.strip(), KIND_VERIFY)
    journal("account:email:verification-requested", user, details={"email": user.email})
    svc.db.session.commit()
    flash(_("We sent a link to %(address)s. Open it within %(hours)d hours to confirm the address.",
            address=user.email, hours=LINK_HOURS))
    return redirect(url_for("login.email_address_page"), code=303)


def _link_target(data: dict[str, Any] | None) -> User | None:
    """The account a link's data names, when the link still makes sense for it."""
    if data is None or not isinstance(data.get("email"), str):
        return None
    user = services().db.session.get(User, data.get("uid"))
    if user is None or not user.can_sign_in:
        return None
    if data.get("kind") == KIND_VERIFY and not email_address.same_address(user.email, data["email"]):
        # The address was changed since: this link verifies an address no longer used.
        return None
    return user


def _invalid_link() -> Any:
    page = render_template(
        "error.html", title=_("This link does not work"),
        message=_("The link is not valid, has expired or was already used. Ask for a new one on your "
                  "account page."),
    )
    return page, 400


@bp.route("/account/email/verify/<token>", methods=["GET", "POST"])
def verify_email(token: str) -> Any:
    """GET shows the address and a button; only the POST of that button verifies it.
    Being signed in is not needed: the link itself proves the mailbox is the person's."""
    links = _links()
    data = links.peek(token)
    user = _link_target(data)
    if data is None or user is None:
        return _invalid_link()
    form = ConfirmForm()
    if request.method == "GET" or not form.validate_on_submit():
        return render_template("email_verify.html", form=form, address=data["email"], token=token)
    data = links.consume(token)
    user = _link_target(data)
    if data is None or user is None:
        return _invalid_link()
    svc = services()
    db = svc.db.session
    previous = user.email
    changed = previous != data["email"]
    user.email = data["email"]
    user.email_verified_at = datetime.now(UTC).replace(tzinfo=None)
    journal("account:email:verified", user, details={"email": user.email, "previous": previous, "changed": changed})
    db.commit()
    return render_template("email_verified.html", address=user.email)
