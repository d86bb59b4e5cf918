"""Portal apps (policy 2.4: the list of protected information resources) and the
who-has-access report (policy 3).

Registration rules live in ``idp.oidc.clients``; this module turns the console's forms
into calls to it, writes the journal in the same transaction, and shows a new client
secret exactly once on a page that is never cached."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

from flask import Response, abort, flash, make_response, redirect, render_template, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import BooleanField, RadioField, SelectMultipleField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, ValidationError

from admin_ui import bp
from admin_ui.csv_export import BOM, safe_cell
from admin_ui.guard import current_actor, record_console_event, requires
from admin_ui.nav import add_nav
from idp.access.roles import who_has_access
from idp.accounts.models import Role
from idp.oidc.claims import SCOPES_SUPPORTED, claims_for_scopes
from idp.oidc.clients import (
    ClientError,
    check_redirect_uri,
    create_client,
    rotate_secret,
    update_client,
)
from idp.oidc.models import AccessToken, Client, RefreshToken
from idp.services import services

MAX_URIS = 20
MAX_URI_LENGTH = 2048
MAX_REASON = 1000
APP_ROLE_MAX = 64

# What each claim means to the person reading the register (policy 2.4 asks what
# personal data every resource holds, in words a school can check).
CLAIM_DESCRIPTIONS: dict[str, Any] = {
    "sub": _l("a permanent random identifier of the account (not the login)"),
    "name": _l("full name"),
    "preferred_username": _l("login"),
    "locale": _l("language"),
    "updated_at": _l("when the account was last changed"),
    "email": _l("e-mail address"),
    "roles": _l("roles at school"),
    "app_roles": _l("roles in this app (from the role mapping)"),
    "school": _l("name of the school"),
    "groups": _l("classes"),
    "children": _l("children of a parent: their identifiers and names"),
}

GRANT_TYPE_LABELS: dict[str, Any] = {
    "authorization_code": _l("Sign-in through Darbaza with code and PKCE (authorization_code)"),
    "refresh_token": _l("Stay signed in with refresh tokens (refresh_token)"),
    "client_credentials": _l("App-to-app calls without a person (client_credentials)"),
}

AUTH_METHOD_LABELS: dict[str, Any] = {
    "client_secret_basic": _l("Confidential: runs on a server and keeps a secret (sent in the Authorization header)"),
    "client_secret_post": _l("Confidential: runs on a server and keeps a secret (sent in the request body)"),
    "none": _l("Public: a phone or browser app that cannot keep a secret (PKCE only)"),
}



# --- forms -------------------------------------------------------------------------------


def _lines(text: str | None) -> list[str]:
    """Non-empty lines, trimmed, first occurrence kept."""
    return list(dict.fromkeys(line.strip() for line in (text or "").splitlines() if line.strip()))


def _check_uris(uris: list[str]) -> None:
    if len(uris) > MAX_URIS:
        raise ValidationError(_("At most %(count)d addresses.", count=MAX_URIS))
    for uri in uris:
        if len(uri) > MAX_URI_LENGTH:
            raise ValidationError(_("An address may have at most %(count)d characters.", count=MAX_URI_LENGTH))
        try:
            check_redirect_uri(uri)
        except ClientError:
            # R24 / RFC 9700 4.1.1: the same rule the registration service enforces,
            # said in the console's language.
            raise ValidationError(
                _(
                    "%(uri)s cannot be used: an address must start with https:// "
                    "(http:// only for localhost or 127.0.0.1) and must not contain #.",
                    uri=uri,
                )
            ) from None


class AppForm(FlaskForm):
    """The registration of a portal app, as the console edits it."""

    name = StringField(
        validators=[DataRequired(message=_l("Enter the app's name.")), Length(max=255, message=_l("At most 255 characters."))]
    )
    redirect_uris = TextAreaField()
    post_logout_redirect_uris = TextAreaField()
    backchannel_logout_uri = StringField()
    backchannel_logout_session_required = BooleanField()
    scopes = SelectMultipleField(choices=[(s, s) for s in SCOPES_SUPPORTED], validate_choice=True)
    grant_types = SelectMultipleField(choices=list(GRANT_TYPE_LABELS.items()), validate_choice=True)
    trusted = BooleanField()
    allowed_roles = SelectMultipleField(choices=[], validate_choice=True)
    role_map = TextAreaField()

    def __init__(self, *args: Any, role_names: list[str], public: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.role_names = role_names
        self.public = public
        self.allowed_roles.choices = [(r, r) for r in role_names]
        self.parsed_role_map: dict[str, str] = {}
        self.problems: list[str] = []

    def validate_redirect_uris(self, field: TextAreaField) -> None:
        _check_uris(_lines(field.data))

    def validate_post_logout_redirect_uris(self, field: TextAreaField) -> None:
        _check_uris(_lines(field.data))

    def validate_backchannel_logout_uri(self, field: StringField) -> None:
        uri = (field.data or "").strip()
        if len(uri) > 2048:
            raise ValidationError(_("At most 2048 characters."))
        if uri:
            _check_uris([uri])

    def validate_scopes(self, field: SelectMultipleField) -> None:
        # The service would quietly fill in its default scopes for an empty list.
        if not field.data:
            raise ValidationError(_("Choose at least one scope."))

    def validate_grant_types(self, field: SelectMultipleField) -> None:
        if not field.data:
            raise ValidationError(_("Choose at least one grant type."))
        if self.is_public() and "client_credentials" in field.data:
            raise ValidationError(_("A public app has no secret, so it cannot use client_credentials."))
        if "authorization_code" in field.data and not _lines(self.redirect_uris.data):
            raise ValidationError(_("Sign-in with a code needs at least one redirect URI."))

    def validate_role_map(self, field: TextAreaField) -> None:
        mapping: dict[str, str] = {}
        for line in _lines(field.data):
            school_role, sep, app_role = (part.strip() for part in line.partition("="))
            if not sep or not school_role or not app_role:
                raise ValidationError(_("Write each mapping as school_role=app_role: %(line)s", line=line))
            if school_role not in self.role_names:
                raise ValidationError(_("There is no school role %(role)s.", role=school_role))
            if school_role in mapping:
                raise ValidationError(_("The role %(role)s is mapped twice.", role=school_role))
            if len(app_role) > APP_ROLE_MAX or any(ch.isspace() for ch in app_role):
                raise ValidationError(
                    _("An app role must be at most %(count)d characters without spaces.", count=APP_ROLE_MAX)
                )
            mapping[school_role] = app_role
        self.parsed_role_map = mapping

    def is_public(self) -> bool:
        return self.public

    # The cleaned values the service receives.
    def registration(self) -> dict[str, Any]:
        return {
            "name": self.name.data.strip(),
            "redirect_uris": _lines(self.redirect_uris.data),
            "post_logout_redirect_uris": _lines(self.post_logout_redirect_uris.data),
            "backchannel_logout_uri": (self.backchannel_logout_uri.data or "").strip() or None,
            "backchannel_logout_session_required": bool(self.backchannel_logout_session_required.data),
            "grant_types": list(dict.fromkeys(self.grant_types.data)),
            "scopes": list(dict.fromkeys(self.scopes.data)),
            "trusted": bool(self.trusted.data),
        }


class RegisterAppForm(AppForm):
    auth_method = RadioField(
        choices=list(AUTH_METHOD_LABELS.items()),
        default="client_secret_basic",
        validators=[DataRequired(message=_l("Choose whether the app is public or confidential."))],
    )

    def is_public(self) -> bool:
        return self.auth_method.data == "none"


class ConfirmForm(FlaskForm):
    """A reason for the journal and, for destructive actions, the client id typed out."""

    confirm = StringField()
    reason = TextAreaField(
        validators=[
            DataRequired(message=_l("Give a reason; it is kept in the audit journal.")),
            Length(max=MAX_REASON, message=_l("At most 1000 characters.")),
        ]
    )

    def __init__(self, *args: Any, expected: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected = expected

    def validate_confirm(self, field: StringField) -> None:
        if self.expected is not None and (field.data or "").strip() != self.expected:
            raise ValidationError(_("Type %(expected)s exactly to confirm.", expected=self.expected))


# --- helpers -----------------------------------------------------------------------------


def _role_names() -> list[str]:
    return list(services().db.session.scalars(select(Role.name).order_by(Role.name)))


def _client_or_404(client_id: str) -> Client:
    client = services().db.session.scalar(select(Client).where(Client.client_id == client_id))
    if client is None:
        abort(404)
    return client


def _record(action: str, client: Client, *, reason: str | None = None, details: dict[str, Any] | None = None) -> None:
    """Journal a console change to an app in the same transaction as the change."""
    record_console_event(action, subject=f"client:{client.client_id}", reason=reason, details=details)


def registration_of(client: Client) -> dict[str, Any]:
    """Everything about a registration that may be journaled: never the secret or its hash."""
    return {
        "name": client.name,
        "redirect_uris": list(client.redirect_uris or []),
        "post_logout_redirect_uris": list(client.post_logout_redirect_uris or []),
        "backchannel_logout_uri": client.backchannel_logout_uri,
        "backchannel_logout_session_required": client.backchannel_logout_session_required,
        "grant_types": list(client.grant_types or []),
        "scopes": list(client.scopes or []),
        "auth_method": client.token_endpoint_auth_method,
        "trusted": client.trusted,
        "allowed_roles": list(client.allowed_roles or []),
        "role_map": dict(client.role_map or {}),
    }


def _show_secret_once(client: Client, secret: str, *, created: bool) -> Any:
    """Post/redirect/get: the secret waits in the admin's server-side session (Redis, never
    the cookie) and the next GET shows it once; a reload cannot register a second app or
    rotate again, and shows that the secret was already shown."""
    session["secret_once"] = {"client_id": client.client_id, "secret": secret, "created": created}
    return redirect(url_for("admin.app_secret", client_id=client.client_id), code=303)


@bp.get("/apps/<client_id>/secret")
@requires("clients:write")
def app_secret(client_id: str) -> Any:
    client = _client_or_404(client_id)
    pending = session.get("secret_once")
    if not pending or pending.get("client_id") != client.client_id:
        flash(_("The secret was shown once and is not kept. Rotate it if it was lost."), "error")
        return redirect(url_for("admin.app_page", client_id=client.client_id), code=303)
    session.pop("secret_once", None)
    response = make_response(
        render_template("admin/apps/secret.html", client=client, secret=pending["secret"], created=pending["created"])
    )
    # noggin's pattern: no cache may keep the page that shows a secret.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


def revoke_client_tokens(client: Client) -> int:
    """Revoke every live token family of the app, so switching it off takes effect at once
    and switching it back on does not bring old grants back. Returns the families revoked."""
    svc = services()
    db = svc.db.session
    families = set(
        db.scalars(
            select(RefreshToken.family_id).where(
                RefreshToken.client_id == client.client_id, RefreshToken.revoked_at.is_(None)
            )
        )
    ) | set(
        db.scalars(
            select(AccessToken.family_id).where(AccessToken.client_id == client.client_id, AccessToken.revoked_at.is_(None))
        )
    )
    for family_id in families:
        svc.tokens.revoke_family(db, family_id)
    return len(families)




# --- views: the register -------------------------------------------------------------------


@bp.get("/apps")
@requires("clients:read")
def apps() -> str:
    clients = services().db.session.scalars(select(Client).order_by(Client.active.desc(), Client.name))
    return render_template("admin/apps/list.html", clients=list(clients))


@bp.route("/apps/new", methods=["GET", "POST"])
@requires("clients:write")
def app_new() -> Any:
    form = RegisterAppForm(role_names=_role_names(), data={"scopes": ["openid", "profile"],
                                                         "grant_types": ["authorization_code", "refresh_token"],
                                                         "backchannel_logout_session_required": True})
    if form.validate_on_submit():
        db = services().db.session
        try:
            client, secret = create_client(db, auth_method=form.auth_method.data, **form.registration())
        except ClientError as exc:
            db.rollback()
            form.problems.append(_("The app was not registered: %(reason)s", reason=str(exc)))
        else:
            client.allowed_roles = sorted(set(form.allowed_roles.data))
            client.role_map = form.parsed_role_map
            _record("client:create", client, details=registration_of(client))
            db.commit()
            if secret is None:
                flash(_("The app %(name)s is registered. It is public, so it has no secret.", name=client.name))
                return redirect(url_for("admin.app_page", client_id=client.client_id), code=303)
            return _show_secret_once(client, secret, created=True)
    return render_template(
        "admin/apps/form.html", form=form, client=None, grant_labels=GRANT_TYPE_LABELS, auth_labels=AUTH_METHOD_LABELS
    )


@bp.get("/apps/<client_id>")
@requires("clients:read")
def app_page(client_id: str) -> str:
    client = _client_or_404(client_id)
    claims = claims_for_scopes(client.scopes or [])
    return render_template(
        "admin/apps/show.html",
        client=client,
        claims=[(c, CLAIM_DESCRIPTIONS.get(c, "")) for c in claims],
        grant_labels=GRANT_TYPE_LABELS,
        auth_labels=AUTH_METHOD_LABELS,
    )


@bp.route("/apps/<client_id>/edit", methods=["GET", "POST"])
@requires("clients:write")
def app_edit(client_id: str) -> Any:
    client = _client_or_404(client_id)
    current = {
        "name": client.name,
        "redirect_uris": "\n".join(client.redirect_uris or []),
        "post_logout_redirect_uris": "\n".join(client.post_logout_redirect_uris or []),
        "backchannel_logout_uri": client.backchannel_logout_uri or "",
        "backchannel_logout_session_required": client.backchannel_logout_session_required,
        "scopes": list(client.scopes or []),
        "grant_types": list(client.grant_types or []),
        "trusted": client.trusted,
        "allowed_roles": list(client.allowed_roles or []),
        "role_map": "\n".join(f"{k}={v}" for k, v in sorted((client.role_map or {}).items())),
    }
    form = AppForm(role_names=_role_names(), public=client.is_public, data=current)
    if form.validate_on_submit():
        db = services().db.session
        try:
            changes = update_client(
                db,
                client,
                allowed_roles=form.allowed_roles.data,
                role_map=form.parsed_role_map,
                active=client.active,
                **form.registration(),
            )
        except ClientError as exc:
            db.rollback()
            form.problems.append(_("The changes were not saved: %(reason)s", reason=str(exc)))
        else:
            if changes:
                # The registration holds no secret (only its hash, which update_client
                # never touches), so before/after values are safe to journal.
                _record("client:update", client, details={"changed": sorted(changes), "changes": changes})
                db.commit()
                flash(_("The changes to %(name)s are saved.", name=client.name))
            else:
                flash(_("Nothing was changed."))
            return redirect(url_for("admin.app_page", client_id=client.client_id), code=303)
    return render_template(
        "admin/apps/form.html", form=form, client=client, grant_labels=GRANT_TYPE_LABELS, auth_labels=AUTH_METHOD_LABELS
    )


@bp.route("/apps/<client_id>/rotate-secret", methods=["GET", "POST"])
@requires("clients:write")
def app_rotate_secret(client_id: str) -> Any:
    client = _client_or_404(client_id)
    if client.is_public:
        flash(_("A public app has no secret to rotate."), "error")
        return redirect(url_for("admin.app_page", client_id=client.client_id), code=303)
    form = ConfirmForm(expected=client.client_id)
    if form.validate_on_submit():
        secret = rotate_secret(client)
        _record("client:secret:rotate", client, reason=form.reason.data.strip())
        services().db.session.commit()
        return _show_secret_once(client, secret, created=False)
    return render_template("admin/apps/confirm.html", form=form, client=client, action="rotate")


@bp.route("/apps/<client_id>/deactivate", methods=["GET", "POST"])
@requires("clients:write")
def app_deactivate(client_id: str) -> Any:
    client = _client_or_404(client_id)
    if not client.active:
        flash(_("The app %(name)s is already switched off.", name=client.name))
        return redirect(url_for("admin.app_page", client_id=client.client_id), code=303)
    form = ConfirmForm(expected=client.client_id)
    if form.validate_on_submit():
        client.active = False
        families = revoke_client_tokens(client)
        _record("client:deactivate", client, reason=form.reason.data.strip(), details={"token_families_revoked": families})
        services().db.session.commit()
        flash(_("The app %(name)s is switched off; its tokens no longer work.", name=client.name))
        return redirect(url_for("admin.app_page", client_id=client.client_id), code=303)
    return render_template("admin/apps/confirm.html", form=form, client=client, action="deactivate")


@bp.route("/apps/<client_id>/activate", methods=["GET", "POST"])
@requires("clients:write")
def app_activate(client_id: str) -> Any:
    client = _client_or_404(client_id)
    if client.active:
        flash(_("The app %(name)s is already in use.", name=client.name))
        return redirect(url_for("admin.app_page", client_id=client.client_id), code=303)
    # Switching an app back on destroys nothing, so a reason is enough.
    form = ConfirmForm(expected=None)
    if form.validate_on_submit():
        client.active = True
        _record("client:activate", client, reason=form.reason.data.strip())
        services().db.session.commit()
        flash(_("The app %(name)s is switched on again.", name=client.name))
        return redirect(url_for("admin.app_page", client_id=client.client_id), code=303)
    return render_template("admin/apps/confirm.html", form=form, client=client, action="activate")


# --- views: who has access (policy 3) --------------------------------------------------------


@bp.get("/reports/access")
@requires("clients:read")
def access_report() -> str:
    rows = who_has_access(services().db.session)
    return render_template("admin/apps/access_report.html", rows=rows, claim_descriptions=CLAIM_DESCRIPTIONS)


@bp.get("/reports/access.csv")
@requires("clients:read")
def access_report_csv() -> Response:
    svc = services()
    rows = who_has_access(svc.db.session)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([_("App"), _("Client ID"), _("Login"), _("Name"), _("Roles"), _("Personal data")])
    count = 0
    for row in rows:
        claims = " ".join(row.claims)
        for user in row.accounts:
            writer.writerow(
                [safe_cell(v) for v in (row.client.name, row.client.client_id, user.login, user.display_name,
                                       " ".join(user.role_names), claims)]
            )
            count += 1
    # The export carries personal data of every account: the journal keeps who took it.
    actor = current_actor()
    svc.journal.record(svc.db.session, actor=actor.ref, action="report:access:export", ip=actor.ip,
                       request_id=actor.request_id, details={"rows": count})
    svc.db.session.commit()
    # A BOM so that spreadsheet programs read the Kyrgyz and Russian names as UTF-8.
    body = (BOM + buffer.getvalue()).encode("utf-8")
    filename = f"who-has-access-{datetime.now(UTC):%Y-%m-%d}.csv"
    return Response(
        body,
        content_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
    )


add_nav("admin.apps", "clients:read", _l("Portal apps"))
add_nav("admin.access_report", "clients:read", _l("Who has access"))
