"""Protocol endpoints: discovery, JWKS, authorize, token, userinfo, revocation,
introspection and end_session."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _
from flask_wtf import FlaskForm
from wtforms import HiddenField, SubmitField

from idp.access.decision import AUTHORIZE, context_for, decide_for, protocol_description
from idp.accounts.models import User, load_account
from idp.audit.web import audit_event
from idp.login.flow import acr_for
from idp.login.refusal import refusal_page
from idp.oidc.authorize import (
    AccessRefused,
    AuthorizationRequest,
    FatalAuthorizeError,
    FlowStore,
    RedirectAuthorizeError,
    decide,
    issue_code,
    remember_consent,
    repeated_description,
    single_values,
    validate,
)
from idp.oidc.claims import CLAIMS_SUPPORTED, SCOPES_SUPPORTED, user_claims
from idp.oidc.server import DarbazaAuthorizationServer
from idp.oidc.tokens import InvalidAccessToken
from idp.services import services

bp = Blueprint("oidc", __name__)

def oauth_server() -> DarbazaAuthorizationServer:
    return current_app.extensions["darbaza_oauth"]


def flows() -> FlowStore:
    return FlowStore(services().redis)


def _fatal_message(key: str) -> str:
    # The messages are listed literally so that the translation extractor sees them.
    messages = {
        "missing_client": _("The request does not name a portal app (client_id is missing)."),
        "unknown_client": _("This portal app is not registered with the school's sign-in service."),
        "bad_redirect_uri": _(
            "The return address of this portal app is not registered. Sign-in was stopped to protect you."
        ),
        "missing_redirect_uri": _("The request does not say where to return (redirect_uri is missing)."),
    }
    return messages.get(key, _("The sign-in request is not valid."))


# --- discovery -----------------------------------------------------------------------
def provider_metadata() -> dict[str, Any]:
    issuer = services().settings.issuer
    return {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token",
        "userinfo_endpoint": issuer + "/userinfo",
        "jwks_uri": issuer + "/jwks.json",
        "revocation_endpoint": issuer + "/revoke",
        "introspection_endpoint": issuer + "/introspect",
        "end_session_endpoint": issuer + "/end_session",
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query", "fragment", "form_post"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": CLAIMS_SUPPORTED,
        "claims_parameter_supported": False,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
        "require_request_uri_registration": False,
        "acr_values_supported": ["urn:darbaza:loa:1", "urn:darbaza:loa:2"],
        "ui_locales_supported": ["ky", "ru", "en"],
        "claims_locales_supported": ["ky", "ru", "en"],
        "display_values_supported": ["page", "popup", "touch"],
        "prompt_values_supported": ["none", "login", "consent", "select_account"],
        "authorization_response_iss_parameter_supported": True,
        # OIDC Back-Channel Logout 1.0 §2.1 (checklist BC1): logout tokens carry the sid.
        "backchannel_logout_supported": True,
        "backchannel_logout_session_supported": True,
        "frontchannel_logout_supported": False,
        "access_token_issuer": issuer,
    }


def _public_json(payload: Any, max_age: int = 300) -> Response:
    response = jsonify(payload)
    # Metadata and keys are public; CORS is allowed here (never on /authorize, R26).
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Cache-Control"] = f"public, max-age={max_age}"
    return response


@bp.get("/.well-known/openid-configuration")
def discovery() -> Response:
    return _public_json(provider_metadata())


@bp.get("/.well-known/oauth-authorization-server")
def oauth_metadata() -> Response:
    return _public_json(provider_metadata())


@bp.get("/jwks.json")
def jwks() -> Response:
    return _public_json(services().keys.jwks(), max_age=60)


# --- authorize -----------------------------------------------------------------------
def _add_params(uri: str, params: list[tuple[str, str]], fragment: bool) -> str:
    parts = urlsplit(uri)
    encoded = urlencode(params)
    if fragment:
        return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, encoded))
    query = parts.query + ("&" if parts.query else "") + encoded
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def respond_to_client(req: AuthorizationRequest, params: list[tuple[str, str]]) -> Any:
    """Send an authorization response (code or error) with state and iss (RFC 9207)."""
    if req.state is not None:
        params.append(("state", req.state))
    params.append(("iss", services().settings.issuer))
    if req.response_mode == "form_post":
        return Response(
            render_template("form_post.html", action=req.redirect_uri, params=params),
            content_type="text/html; charset=utf-8",
        )
    return redirect(_add_params(req.redirect_uri, params, req.response_mode == "fragment"), code=302)


def error_to_client(exc: RedirectAuthorizeError) -> Response:
    description = " ".join(exc.description.split())  # C2: no CR/LF/TAB
    return respond_to_client(exc.request, [("error", exc.error), ("error_description", description)])


def fatal_page(key: str) -> tuple[str, int]:
    return render_template("error.html", title=_("Sign-in cannot continue"), message=_fatal_message(key)), 400


def _current_user() -> User | None:
    uid = session.get("uid")
    if uid is None:
        return None
    user = services().db.session.get(User, uid)
    return user if user is not None and user.can_sign_in else None


# --- restrictions at the authorization door (policy 5.1, 4.2.5) --------------------------
def check_access(req: AuthorizationRequest, user: User) -> None:
    """The access decision for this app, now, from this address: refuse (AccessRefused)
    or narrow the request to the scopes that may be granted here."""
    svc = services()
    context = context_for(
        svc.settings, phase=AUTHORIZE, now=svc.clock(), client=req.client, ip=request.remote_addr or "",
        scopes=req.scope.split(), amr=session.get("amr") or [],
    )
    access = decide_for(svc.db.session, user, context, svc.restrictions)
    if not access.allowed:
        raise AccessRefused(req, access)
    # Policy 4.2.5: school-only scopes are not granted from outside; the rest goes on.
    req.scope = " ".join(access.granted_scopes)


def back_to_app(req: AuthorizationRequest, error: str, description: str) -> dict[str, Any]:
    """The way back to the app with an error, for a page that first tells the person why."""
    params = [("error", error), ("error_description", " ".join(description.split()))]
    if req.state is not None:
        params.append(("state", req.state))
    params.append(("iss", services().settings.issuer))
    if req.response_mode == "form_post":
        return {"method": "post", "action": req.redirect_uri, "params": params, "app": req.client.name}
    action = _add_params(req.redirect_uri, params, req.response_mode == "fragment")
    return {"method": "get", "action": action, "params": [], "app": req.client.name}


def back_to_app_for_flow(flow_id: str) -> dict[str, Any] | None:
    """The way back (``access_denied``) to the app whose parked request a refused sign-in
    belonged to; the request is dropped. None when it expired or is not valid."""
    parked = flows().load(flow_id)
    if parked is None:
        return None
    flows().drop(flow_id)
    svc = services()
    try:
        req = validate(parked["params"], set(), query_client=oauth_server().query_client, tokens=svc.tokens,
                       db=svc.db.session)
    except (FatalAuthorizeError, RedirectAuthorizeError):
        return None
    return back_to_app(req, "access_denied", "The account may not sign in now.")


def access_refused(exc: AccessRefused, flow_id: str | None) -> Any:
    """A refused authorization: journaled; the person is told why on a page with the way
    back to the app, or (prompt=none, no page allowed) the app gets access_denied at once."""
    if flow_id:
        flows().drop(flow_id)
    req, decision = exc.request, exc.decision
    audit_event(
        "access:authorize:refused",
        subject=f"user:{session.get('uid')}",
        reason="access-denied",
        details={"client_id": req.client.client_id, "codes": decision.codes, "network": decision.network,
                 "restrictions": sorted({r.restriction_id for r in decision.denials if r.restriction_id})},
    )
    description = protocol_description(decision)
    if "none" in req.prompt:
        return error_to_client(RedirectAuthorizeError(req, "access_denied", description))
    return refusal_page(decision.denials, title=_("You cannot use %(app)s now", app=req.client.name),
                        back=back_to_app(req, "access_denied", description))


def run_authorization(params: dict[str, str], repeated: set[str], flow_id: str | None, started: float | None) -> Any:
    svc = services()
    db = svc.db.session
    try:
        req = validate(params, repeated, query_client=oauth_server().query_client, tokens=svc.tokens, db=db)
    except FatalAuthorizeError as exc:
        if flow_id:
            flows().drop(flow_id)
        return fatal_page(exc.message)
    except RedirectAuthorizeError as exc:
        if flow_id:
            flows().drop(flow_id)
        return error_to_client(exc)
    if req.ui_locales and req.ui_locales.split():  # a blank value crashed split()[0]
        session["ui_locales"] = req.ui_locales.split()[0].split("-")[0].lower()
    user = _current_user()
    try:
        decision = decide(
            req,
            user=user,
            auth_time=session.get("auth_time"),
            authenticated_at=session.get("authenticated_at"),
            flow_started=started,
            db=db,
            access=check_access,
        )
    except RedirectAuthorizeError as exc:
        if flow_id:
            flows().drop(flow_id)
        return error_to_client(exc)
    except AccessRefused as exc:
        return access_refused(exc, flow_id)
    if decision.action == "login":
        flow_id = flow_id or flows().park(params)
        args: dict[str, Any] = {"flow": flow_id}
        if req.login_hint:
            args["login_hint"] = req.login_hint[:128]
        return redirect(url_for("login.login", **args), code=302)
    assert user is not None
    if decision.action == "consent":
        flow_id = flow_id or flows().park(params)
        form = ConsentForm(flow=flow_id)
        return render_template(
            "consent.html", form=form, client=req.client, scopes=[s for s in req.scope.split() if s != "openid"]
        )
    if flow_id:
        flows().drop(flow_id)
    code = issue_code(
        db,
        req,
        user=user,
        auth_time=int(session["auth_time"]),
        amr=list(session.get("amr", [])),
        acr=acr_for(list(session.get("amr", []))),
        sid=session.get("sid"),
        lifetime=svc.settings.code_lifetime,
    )
    svc.backchannel.remember_app(session.get("sid"), req.client.client_id)
    return respond_to_client(req, [("code", code)])


@bp.route("/authorize", methods=["GET", "POST"])
def authorize() -> Any:
    source = request.form if request.method == "POST" else request.args
    params, repeated = single_values(source)
    return run_authorization(params, repeated, None, None)


@bp.get("/authorize/continue/<flow_id>")
def authorize_continue(flow_id: str) -> Any:
    parked = flows().load(flow_id)
    if parked is None:
        return render_template(
            "error.html",
            title=_("This sign-in request has expired"),
            message=_("Go back to the portal app and start again."),
        ), 400
    return run_authorization(parked["params"], set(), flow_id, parked["started"])


class ConsentForm(FlaskForm):
    flow = HiddenField()
    approve = SubmitField()
    deny = SubmitField()


@bp.post("/authorize/consent")
def consent() -> Any:
    form = ConsentForm()
    if not form.validate_on_submit():
        abort(400)
    flow_id = form.flow.data or ""
    parked = flows().load(flow_id)
    if parked is None:
        return render_template(
            "error.html",
            title=_("This sign-in request has expired"),
            message=_("Go back to the portal app and start again."),
        ), 400
    svc = services()
    db = svc.db.session
    try:
        req = validate(parked["params"], set(), query_client=oauth_server().query_client, tokens=svc.tokens, db=db)
    except FatalAuthorizeError as exc:
        return fatal_page(exc.message)
    except RedirectAuthorizeError as exc:
        return error_to_client(exc)
    user = _current_user()
    if user is None:
        return redirect(url_for("login.login", flow=flow_id), code=303)
    if not form.approve.data:
        flows().drop(flow_id)
        return error_to_client(RedirectAuthorizeError(req, "access_denied", "The user did not approve the request."))
    # P18: re-check prompt/max_age before approving.
    try:
        decision = decide(
            req,
            user=user,
            auth_time=session.get("auth_time"),
            authenticated_at=session.get("authenticated_at"),
            flow_started=parked["started"],
            db=db,
            access=check_access,
        )
    except RedirectAuthorizeError as exc:
        return error_to_client(exc)
    except AccessRefused as exc:
        return access_refused(exc, flow_id)
    if decision.action == "login":
        return redirect(url_for("login.login", flow=flow_id), code=303)
    remember_consent(db, user, req.client, req.scope)
    db.commit()
    flows().drop(flow_id)
    code = issue_code(
        db,
        req,
        user=user,
        auth_time=int(session["auth_time"]),
        amr=list(session.get("amr", [])),
        acr=acr_for(list(session.get("amr", []))),
        sid=session.get("sid"),
        lifetime=svc.settings.code_lifetime,
    )
    svc.backchannel.remember_app(session.get("sid"), req.client.client_id)
    response = respond_to_client(req, [("code", code)])
    if response.status_code == 302:
        response.status_code = 303
    return response


# --- token, revocation, introspection ------------------------------------------------
def _repeated_parameters_error() -> Response | None:
    """RFC 6749 §3.2: parameters MUST NOT be repeated (Authlib silently takes the first)."""
    _values, repeated = single_values(request.values)
    if not repeated:
        return None
    error = InvalidRequestError(repeated_description(repeated))
    return oauth_server().handle_error_response(None, error)


@bp.post("/token")
def token() -> Response:
    return _repeated_parameters_error() or oauth_server().create_token_response()


@bp.post("/revoke")
def revoke() -> Response:
    return _repeated_parameters_error() or oauth_server().create_endpoint_response("revocation")


@bp.post("/introspect")
def introspect() -> Response:
    return _repeated_parameters_error() or oauth_server().create_endpoint_response("introspection")


# --- userinfo ------------------------------------------------------------------------
def _bearer_error(error: str, description: str, status: int, *, challenge: bool = True) -> Response:
    """An RFC 6750 error. ``challenge=False`` (no token at all): the WWW-Authenticate
    header names no error (RFC 6750 section 3.1); the JSON body still carries a code."""
    response = jsonify({"error": error, "error_description": description})
    response.status_code = status
    header = 'Bearer realm="darbaza"'
    if challenge:
        header += f', error="{error}", error_description="{description}"'
    response.headers["WWW-Authenticate"] = header
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/userinfo", methods=["GET", "POST"])
def userinfo() -> Response:
    auth = request.headers.get("Authorization", "")
    token_value = None
    if auth:
        scheme, _sep, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return _bearer_error("invalid_request", "Use the Bearer scheme.", 400)
        token_value = value.strip()
    if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
        body_values = request.form.getlist("access_token")
        if body_values:
            if token_value is not None or len(body_values) > 1:
                return _bearer_error("invalid_request", "Send the access token only once.", 400)
            token_value = body_values[0]
    if token_value is None:
        # R33: a token in the URL query is not accepted.
        if "access_token" in request.args:
            return _bearer_error("invalid_request", "Access tokens are not accepted in the URL.", 400)
        return _bearer_error("invalid_token", "An access token is required.", 401, challenge=False)
    svc = services()
    db = svc.db.session
    try:
        claims, record = svc.tokens.verify_access_token(db, token_value)
    except InvalidAccessToken:
        return _bearer_error("invalid_token", "The access token is not valid.", 401)
    if record.user_id is None or "openid" not in record.scope.split():
        return _bearer_error("insufficient_scope", "The openid scope is required.", 403)
    user = load_account(db, record.user_id)
    if user is None or not user.can_sign_in:
        return _bearer_error("invalid_token", "The access token is not valid.", 401)
    client = oauth_server().query_client(record.client_id)
    response = jsonify(user_claims(user, record.scope, svc.settings, client))
    response.headers["Cache-Control"] = "no-store"
    return response


# --- end_session (RP-initiated logout) ------------------------------------------------
class LogoutForm(FlaskForm):
    confirm = SubmitField()


@bp.route("/end_session", methods=["GET", "POST"])
def end_session() -> Any:
    server = oauth_server()
    source = request.form if request.method == "POST" else request.args
    params, repeated = single_values(source)
    if repeated:
        return render_template(
            "error.html", title=_("Sign-out request is not valid"), message=_("Parameters must not be repeated.")
        ), 400
    try:
        end_req = server.validate_endpoint_request("end_session")
    except OAuth2Error:
        end_req = None
    signed_in = session.get("uid") is not None
    hint_sub = end_req.id_token_claims.get("sub") if end_req and end_req.id_token_claims else None
    current_sub = None
    if signed_in:
        user = _current_user()
        current_sub = user.subject if user else None
    # L2/L8: a valid id_token_hint of the signed-in user (or of nobody signed in) ends the
    # session at once; anything else asks the user to confirm (ASVS 10.6.2, L3-L5, L11).
    if end_req is not None and end_req.id_token_claims and (not signed_in or hint_sub == current_sub):
        response = server.create_endpoint_response("end_session", end_req)
        if response is not None:
            return response
        return render_template("logged_out.html")
    if not signed_in:
        return render_template("logged_out.html")
    return render_template("logout_confirm.html", form=LogoutForm())


@bp.post("/end_session/confirm")
def end_session_confirm() -> Any:
    from idp.login.flow import sign_out

    form = LogoutForm()
    if not form.validate_on_submit():
        abort(400)
    sign_out()
    return render_template("logged_out.html")
