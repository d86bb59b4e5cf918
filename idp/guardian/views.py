"""``/guardian``: parents link their children with the one-time link codes the school
prints or sends (idp/accounts/guardian_codes.py).

- Not signed in: "Register as a parent": the code, a login, a name, an optional e-mail
  address and a password (the password policy of every new password). A new account
  with the ``parent`` role is created and linked to the child; the person then signs
  in (``/login``). A given address is unverified until the mailed link is opened.
- Signed in with the ``parent`` role: "Link another child" with just the code. Other
  accounts are told that only parent accounts link children.

A code that does not work (unknown, expired, revoked or used) always gets the same
message, and each such attempt counts against the client IP: this page's own limiter
(growing delays after ``FREE_FAILURES``) and the sign-in limiter of the IP, as for
activation codes. The child's name is shown only once a link was made. The login is
checked only after the code: a stranger cannot use the page to learn which logins
exist."""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    flash,
    g,
    get_flashed_messages,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import StringField
from wtforms.validators import InputRequired, Length, Optional

from idp.accounts import email_address
from idp.accounts import guardian_codes as codes
from idp.accounts.models import User
from idp.accounts.service import LOGIN_PATTERN, AccountError, create_user, normalise_login
from idp.i18n import LANGUAGES

# The login blueprint first: idp.login.required and email_change import it back.
from idp.login import views as _login_views  # noqa: F401
from idp.login.email_change import KIND_VERIFY, _send_link
from idp.login.required import NewPasswordForm
from idp.login.throttle import Throttle, Throttled
from idp.services import services

bp = Blueprint("guardian", __name__, url_prefix="/guardian")

# Failed codes per client IP before the growing delays start, and the window they are
# counted in (a school's NAT has many parents; 60-bit codes make guessing hopeless anyway).
FREE_FAILURES = 10
WINDOW_SECONDS = 3600
THROTTLE_PURPOSE = "guardian-code:ip"


def code_throttle() -> Throttle:
    svc = services()
    return Throttle(redis=svc.redis, purpose=THROTTLE_PURPOSE, free_failures=FREE_FAILURES,
                    max_delay=svc.settings.login_max_delay, window=WINDOW_SECONDS)


def _code_field() -> StringField:
    return StringField(validators=[InputRequired(message=_l("Enter the link code from the school's slip.")),
                                   Length(max=64, message=_l("At most 64 characters."))])


class LinkForm(FlaskForm):
    code = _code_field()


class RegisterForm(NewPasswordForm):
    code = _code_field()
    login = StringField(validators=[InputRequired(message=_l("Choose a login.")),
                                    Length(max=64, message=_l("At most 64 characters."))])
    display_name = StringField(validators=[InputRequired(message=_l("Enter your name.")),
                                           Length(max=255, message=_l("At most 255 characters."))])
    email = StringField(validators=[Optional(), Length(max=email_address.MAX_LENGTH,
                                                       message=_l("At most 320 characters."))])


def _bad_code_message() -> str:
    return _("This link code does not work: it is not valid, has expired or was already used. "
             "Ask the school for a new one.")


def _signed_in() -> User | None:
    if not current_user.is_authenticated:
        return None
    return services().db.session.get(User, current_user.id)


def _ctx(actor: str) -> codes.Context:
    return codes.Context(actor=actor, ip=request.remote_addr, request_id=getattr(g, "request_id", None))


def _page(*, user: User | None, form: FlaskForm | None = None, error: str | None = None, status: int = 200) -> Any:
    if user is not None:
        form = form or LinkForm(formdata=None)
        template = "guardian_link.html"
        is_parent = codes.PARENT in user.role_names
        return render_template(template, form=form, error=error, user=user, is_parent=is_parent,
                               notices=get_flashed_messages()), status
    form = form or RegisterForm(formdata=None)
    return render_template("guardian_register.html", form=form, error=error), status


def _client_ip() -> str:
    return request.remote_addr or "unknown"


def _throttled(user: User | None, form: FlaskForm, wait: int) -> Any:
    minutes = max(1, -(-wait // 60))
    page, _status = _page(user=user, form=form, error=_(
        "Too many link codes that did not work were tried from this network. Try again in %(minutes)d minutes.",
        minutes=minutes))
    return page, 429, {"Retry-After": str(wait)}


def _guard(user: User | None, form: FlaskForm) -> Any | None:
    """The 429 answer when this IP must wait, else None."""
    svc = services()
    ip = _client_ip()
    wait = code_throttle().check(ip)
    if wait is None:
        wait = svc.login_ip_throttle.check(ip)
    return None if wait is None else _throttled(user, form, wait)


def _count_failure(actor: str) -> None:
    """Journal a code that did not work and count it against the client IP."""
    svc = services()
    db = svc.db.session
    db.rollback()
    codes.record_failure(db, svc.journal, _ctx(actor))
    db.commit()
    code_throttle().fail(_client_ip())
    svc.login_ip_throttle.fail(_client_ip())


@bp.get("")
def home() -> Any:
    return _page(user=_signed_in())


@bp.post("/link")
def link() -> Any:
    """A signed-in parent links another child."""
    user = _signed_in()
    if user is None:
        return redirect(url_for("login.login", next=url_for("guardian.home")), code=303)
    form = LinkForm()
    if codes.PARENT not in user.role_names:
        return _page(user=user, form=form, error=_("Only parent accounts can link children."), status=403)
    stop = _guard(user, form)
    if stop is not None:
        return stop
    if not form.validate_on_submit():
        return _page(user=user, form=form, status=400)
    svc = services()
    db = svc.db.session
    try:
        child = codes.redeem(db, svc.journal, user, form.code.data, _ctx(f"user:{user.id}"))
    except codes.AlreadyLinked as exc:
        db.rollback()
        return _page(user=user, form=form, status=400,
                     error=_("%(child)s is already linked to your account.", child=exc.child.display_name))
    except codes.GuardianCodeError:
        _count_failure(f"user:{user.id}")
        return _page(user=user, form=form, error=_bad_code_message(), status=400)
    db.commit()
    flash(_("%(child)s is now linked to your account.", child=child.display_name))
    return redirect(url_for("guardian.home"), code=303)


@bp.post("/register")
def register() -> Any:
    """A new parent account, linked to the child of the code."""
    if _signed_in() is not None:
        return redirect(url_for("guardian.home"), code=303)
    form = RegisterForm()
    stop = _guard(None, form)
    if stop is not None:
        return stop
    if not form.validate_on_submit():
        return _page(user=None, form=form, status=400)
    svc = services()
    db = svc.db.session
    # The code first: only its holder learns anything about logins.
    if codes.live_code(db, form.code.data) is None:
        _count_failure("anonymous")
        return _page(user=None, form=form, error=_bad_code_message(), status=400)
    login = normalise_login(form.login.data)
    display_name = form.display_name.data.strip()
    valid = True
    if not LOGIN_PATTERN.match(login):
        form.login.errors = [*form.login.errors, _(
            "The login must be 2–64 characters: latin letters, digits, '.', '_' or '-', starting with a "
            "letter or digit.")]
        valid = False
    elif db.scalar(select(User.id).where(User.login == login)) is not None:
        form.login.errors = [*form.login.errors, _("This login is already taken. Choose another one.")]
        valid = False
    if not display_name:
        form.display_name.errors = [*form.display_name.errors, _("Enter your name.")]
        valid = False
    address = None
    if (form.email.data or "").strip():
        address = email_address.normalise_email(form.email.data)
        if address is None:
            form.email.errors = [*form.email.errors, _("The e-mail address is not valid.")]
            valid = False
    if not form.check(login=login, names=[display_name]) or not valid:
        return _page(user=None, form=form, status=400)
    locale = str(get_locale() or "")
    try:
        user = create_user(db, svc.passwords, login=login, display_name=display_name, password=form.password.data,
                           roles=[codes.PARENT], email=address, locale=locale if locale in LANGUAGES else None)
    except AccountError:
        # Taken between the check and the insert (or a rule above missed): say the same.
        db.rollback()
        form.login.errors = [*form.login.errors, _("This login is already taken. Choose another one.")]
        return _page(user=None, form=form, status=400)
    ctx = _ctx(f"user:{user.id}")
    svc.journal.record(db, actor=ctx.actor, action="account:create", subject=f"user:{user.id}", ip=ctx.ip,
                       request_id=ctx.request_id, details={"login": user.login, "roles": [codes.PARENT],
                                                           "via": "guardian-code"})
    try:
        child = codes.redeem(db, svc.journal, user, form.code.data, ctx)
    except (codes.GuardianCodeError, codes.AlreadyLinked):
        # Spent by someone else a moment ago: no account either.
        _count_failure("anonymous")
        return _page(user=None, form=form, error=_bad_code_message(), status=400)
    if address is not None:
        try:
            _send_link(user, address, KIND_VERIFY)
        except Throttled:  # a new account has its whole allowance; never fail the registration on it
            pass
        else:
            svc.journal.record(db, actor=ctx.actor, action="account:email:verification-requested",
                               subject=f"user:{user.id}", ip=ctx.ip, request_id=ctx.request_id,
                               details={"email": address})
    db.commit()
    flash(_("Your parent account was created and %(child)s is linked to it. Sign in with your login and "
            "password.", child=child.display_name))
    if address is not None:
        flash(_("We sent a link to %(address)s: open it to confirm your e-mail address.", address=address))
    return redirect(url_for("login.login"), code=303)
