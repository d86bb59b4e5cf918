"""The admin REST API (``/admin/api/v1``): the console's operations as JSON, for the
school's IT scripts.

A caller is a portal app registered with the client-credentials grant only and with
admin scopes; its access token's scopes are its permissions (scope names are
permission names), and it acts in the journal as ``client:<client_id>``. Views are
thin: ``AccountAdmin`` decides and journals, exactly as for the console; domain
exceptions become JSON errors ``{"error", "message"}`` in the handlers below. The
contract is ``admin_ui.openapi``, whose body schemas are also what bodies are checked
against here."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from flask import Blueprint, Response, current_app, g, jsonify, request, url_for
from flask.blueprints import BlueprintSetupState
from flask_babel import gettext as _
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException

from admin_ui import openapi
from admin_ui.audit import event_record, parse_filters, search_events
from idp.access.permissions import PERMISSIONS
from idp.accounts import obligations
from idp.accounts.admin import AccountAdmin, Actor, OutranksActor, PermissionDenied
from idp.accounts.models import Role, SchoolClass, User
from idp.accounts.service import AccountError
from idp.oidc.models import Client
from idp.oidc.tokens import InvalidAccessToken
from idp.services import services

log = logging.getLogger("darbaza.admin_api")
api = Blueprint("admin_api", __name__, url_prefix=openapi.API_PREFIX)
F = TypeVar("F", bound=Callable[..., Any])
REALM = "darbaza-admin-api"
# Methods the catch-all answers, so that every path under the prefix gets our JSON errors.
ROUTED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
# The range is checked in user_or_404: a converter that refuses a value (min/max) makes
# werkzeug answer 404 itself, with the application's error format instead of ours.
USER_ID = "<int:user_id>"
MAX_ID = 2_147_483_647


@api.record_once
def _exempt_from_csrf(state: BlueprintSetupState) -> None:
    # Bearer tokens, not cookies, authenticate these requests: there is no ambient
    # credential for a cross-site form to ride on, and so no form token to check.
    state.app.extensions["csrf"].exempt(api)


# --- errors ----------------------------------------------------------------------------
class ApiError(Exception):
    """An answer other than success: status, stable code, message, optional extras."""

    def __init__(
        self, status: int, error: str, message: str, *, headers: dict[str, str] | None = None, **extra: str
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def _answer(status: int, error: str, message: str, headers: dict[str, str] | None = None,
            **extra: str) -> Response:
    # Nothing half-done survives a refused request.
    services().db.session.rollback()
    response = jsonify({"error": error, "message": message, **extra})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _challenge(error: str | None = None, **params: str) -> dict[str, str]:
    """RFC 6750 §3: the WWW-Authenticate header of a 401 or 403."""
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    parts.extend(f'{k}="{v}"' for k, v in params.items())
    return {"WWW-Authenticate": "Bearer " + ", ".join(parts)}


@api.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Response:
    return _answer(exc.status, exc.error, exc.message, exc.headers, **exc.extra)


@api.errorhandler(AccountError)
def _account_error(exc: AccountError) -> Response:
    # The service's message is precise and stable ("unknown role(s): x"): scripts log it.
    return _answer(422, "invalid_value", str(exc))


@api.errorhandler(OutranksActor)
def _outranked(exc: OutranksActor) -> Response:
    # A credential action on an account that holds permissions the caller lacks.
    return _answer(
        403, "account_outranks_caller",
        _("This account holds permissions the token does not have (%(permissions)s); its credentials "
          "cannot be reset with it.", permissions=", ".join(exc.missing)),
    )


@api.errorhandler(PermissionDenied)
def _permission_denied(exc: PermissionDenied) -> Response:
    # Raised by the service, e.g. giving a role whose permissions the client lacks.
    return _answer(
        403, "insufficient_scope",
        _("This needs the permission %(permission)s, which the token does not have.", permission=exc.permission),
        _challenge("insufficient_scope", scope=exc.permission), permission=exc.permission,
    )


@api.errorhandler(IntegrityError)
def _integrity_error(_exc: IntegrityError) -> Response:
    # A concurrent request created the same login or class between our check and the insert.
    return _answer(409, "conflict", _("This already exists."))


@api.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    codes = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    messages = {
        404: _("There is no such resource."),
        405: _("This HTTP method is not allowed here."),
        413: _("The request body is too large."),
    }
    response = _answer(status, codes.get(status, "invalid_request"), messages.get(status, _("The request is not valid.")))
    valid_methods = getattr(exc, "valid_methods", None)
    if status == 405 and valid_methods:
        response.headers["Allow"] = ", ".join(sorted(valid_methods))
    return response


@api.errorhandler(RedisError)
@api.errorhandler(OperationalError)
def _store_down(exc: Exception) -> Response:
    log.error("store unavailable: %s", exc.__class__.__name__)
    return _answer(503, "temporarily_unavailable", _("Please try again in a minute."), {"Retry-After": "30"})


@api.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    # The outermost layer of the API: log with the trace, answer without it.
    log.exception("unhandled error on %s %s", request.method, request.path)
    return _answer(500, "server_error", _("Something went wrong. Please try again in a minute."))


@api.before_request
def _read_body_once() -> None:
    # Cache the raw body before anything (the language choice reads request.values)
    # can consume it as a form.
    if request.method in ("POST", "PUT", "PATCH"):
        request.get_data(cache=True)


@api.after_request
def _no_store(response: Response) -> Response:
    # Answers carry personal data and one-time codes: no cache may keep them.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


# --- authentication -----------------------------------------------------------------------
def _unauthorized(error: str, message: str) -> ApiError:
    challenge = _challenge() if error == "missing_token" else _challenge("invalid_token")
    return ApiError(401, error, message, headers=challenge)


def authenticate() -> Actor:
    """The calling machine client, from its bearer token (RFC 6750 §2.1, header only)."""
    scheme, _sep, value = request.headers.get("Authorization", "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise _unauthorized("missing_token", _("Send an access token: Authorization: Bearer <token>."))
    svc = services()
    db = svc.db.session
    try:
        _claims, record = svc.tokens.verify_access_token(db, value)
    except (InvalidAccessToken, RecursionError) as exc:
        raise _unauthorized("invalid_token", _("The access token is invalid, expired or revoked.")) from exc
    if record.user_id is not None:
        # Only machine clients use this API; a person's token never carries admin scopes.
        raise _unauthorized("invalid_token", _("Use a token from the client-credentials grant."))
    client = db.scalar(select(Client).where(Client.client_id == record.client_id))
    if client is None or not client.active or not client.check_grant_type("client_credentials"):
        raise _unauthorized("invalid_token", _("The access token is invalid, expired or revoked."))
    # Scopes the app has lost since the token was issued no longer count.
    permissions = set(record.scope.split()) & set(PERMISSIONS) & set(client.scopes)
    return Actor(
        ref=f"client:{client.client_id}",
        permissions=permissions,
        ip=request.remote_addr,
        request_id=getattr(g, "request_id", None),
    )


def needs(permission: str) -> Callable[[F], F]:
    """Declare the permission (token scope) a route needs, checked on every request."""
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission}")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            actor = authenticate()
            if permission not in actor.permissions:
                raise ApiError(
                    403, "insufficient_scope",
                    _("This needs the scope %(permission)s.", permission=permission),
                    headers=_challenge("insufficient_scope", scope=permission), permission=permission,
                )
            g.api_actor = actor
            g.audit_actor = actor.ref
            return view(*args, **kwargs)

        wrapper.required_permission = permission  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def actor() -> Actor:
    return g.api_actor  # type: ignore[no-any-return]


# --- reading requests -------------------------------------------------------------------------
@dataclass
class Problem:
    field: str
    message: str


def _fits_text(value: str) -> bool:
    # NUL is refused by PostgreSQL; a lone surrogate (legal in JSON escapes) cannot be
    # stored as UTF-8. Both are refused here rather than failing in the driver.
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_problem(schema: dict[str, Any], value: object, where: str = "") -> Problem | None:
    """Check ``value`` against the subset of JSON Schema our request bodies use
    (type, enum, lengths, items, properties, required, additionalProperties)."""
    if "$ref" in schema:
        schema = openapi.SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    types = schema.get("type")
    allowed = [types] if isinstance(types, str) else list(types or [])
    if allowed and not any(_TYPES[t](value) for t in allowed):
        expected = " or ".join(allowed)
        return Problem(where, _("%(field)s must be of type %(type)s.", field=where or "body", type=expected))
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join("null" if c is None else str(c) for c in schema["enum"])
        return Problem(where, _("%(field)s must be one of: %(choices)s.", field=where, choices=choices))
    if isinstance(value, str):
        if not _fits_text(value):
            return Problem(where, _("%(field)s contains characters that are not allowed.", field=where))
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if len(value) < low or (high is not None and len(value) > high):
            return Problem(where, _("%(field)s must be %(min)s to %(max)s characters long.", field=where, min=low,
                                    max=high if high is not None else "∞"))
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            return Problem(where, _("%(field)s may have at most %(max)s items.", field=where, max=schema["maxItems"]))
        for index, item in enumerate(value):
            problem = schema_problem(schema.get("items", {}), item, f"{where}[{index}]")
            if problem:
                return problem
    if isinstance(value, dict):
        properties: dict[str, Any] = schema.get("properties", {})
        for name in value:
            if not isinstance(name, str) or not _fits_text(name):
                return Problem(where, _("A field name contains characters that are not allowed."))
            if name not in properties and schema.get("additionalProperties") is False:
                return Problem(name, _("Unknown field: %(field)s.", field=name[:64]))
        for name in schema.get("required", []):
            if name not in value:
                return Problem(name, _("Missing field: %(field)s.", field=name))
        for name, item in value.items():
            if name in properties:
                problem = schema_problem(properties[name], item, name if not where else f"{where}.{name}")
                if problem:
                    return problem
    return None


def json_body(schema_name: str, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object, checked against its schema in ``admin_ui.openapi``."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "invalid_json", _("Send a JSON object as the request body."))
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "invalid_json", _("The request body is not valid JSON.")) from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", _("The request body must be a JSON object."))
    problem = schema_problem(openapi.SCHEMAS[schema_name], body)
    if problem is not None:
        raise ApiError(422, "invalid_field", problem.message, field=problem.field)
    return body


def text_arg(name: str) -> str:
    value = request.args.get(name, "").strip()
    limit = openapi.TEXT_LIMITS[name]
    if len(value) > limit:
        raise ApiError(400, "invalid_parameter", _("%(field)s must be at most %(max)s characters.", field=name,
                                                   max=limit), field=name)
    if not _fits_text(value):
        raise ApiError(400, "invalid_parameter", _("%(field)s contains characters that are not allowed.",
                                                   field=name), field=name)
    return value


def int_arg(name: str, default: int, maximum: int) -> int:
    raw = request.args.get(name, "").strip()
    if not raw:
        return default
    # ASCII digits only, and short: int() would accept "٣" or "1_000".
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not 1 <= int(raw) <= maximum:
        raise ApiError(400, "invalid_parameter", _("%(field)s must be a whole number from 1 to %(max)s.",
                                                   field=name, max=maximum), field=name)
    return int(raw)


# --- presenting -------------------------------------------------------------------------------
def _timestamp(value: Any) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def user_json(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "subject": user.subject,
        "login": user.login,
        "display_name": user.display_name,
        "email": user.email,
        "locale": user.locale,
        "roles": user.role_names,
        "classes": user.class_names,
        "active": bool(user.active),
        "locked": bool(user.locked),
        "lock_reason": user.lock_reason,
        "must_change_password": bool(user.must_change_password),
        "created_at": _timestamp(user.created_at),
        "updated_at": _timestamp(user.updated_at),
    }


def obligations_json(user: User) -> dict[str, Any]:
    """Policy 2.5, for one account (not in lists): what it accepted and what awaits it."""
    db = services().db.session
    return {
        "obligations_pending": [
            {"role": s.obligation.role.name, "version": s.obligation.version}
            for s in obligations.status_for(db, user) if s.pending
        ],
        "obligation_acceptances": [
            {"role": a.obligation.role.name, "version": a.obligation.version,
             "accepted_at": _timestamp(a.accepted_at), "ip": a.ip, "locale": a.locale}
            for a in obligations.acceptances(db, user)
        ],
    }


def class_json(school_class: SchoolClass, members: int) -> dict[str, Any]:
    return {"name": school_class.name, "members": members, "created_at": _timestamp(school_class.created_at)}


def client_json(client: Client) -> dict[str, Any]:
    return {
        "client_id": client.client_id,
        "name": client.name,
        "active": bool(client.active),
        "trusted": bool(client.trusted),
        "grant_types": list(client.grant_types or []),
        "scopes": list(client.scopes or []),
        "redirect_uris": list(client.redirect_uris or []),
        "post_logout_redirect_uris": list(client.post_logout_redirect_uris or []),
        "backchannel_logout_uri": client.backchannel_logout_uri,
        "backchannel_logout_session_required": bool(client.backchannel_logout_session_required),
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        "allowed_roles": list(client.allowed_roles or []),
        "created_at": _timestamp(client.created_at),
    }


# --- helpers ------------------------------------------------------------------------------------
def account_admin() -> AccountAdmin:
    svc = services()
    return AccountAdmin(db=svc.db.session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)


def user_or_404(user_id: int) -> User:
    # Out-of-range ids cannot exist, and some databases fail on them rather than say so.
    user = account_admin().get(user_id) if 1 <= user_id <= MAX_ID else None
    if user is None:
        raise ApiError(404, "not_found", _("There is no account with this id."))
    return user


def _commit() -> None:
    services().db.session.commit()


# --- routes: accounts ---------------------------------------------------------------------------
@api.get("/users")
@needs("admin:users:read")
def list_users() -> Response:
    state = request.args.get("state", "").strip()
    if state and state not in openapi.USER_STATES:
        raise ApiError(400, "invalid_parameter", _("state must be one of: %(choices)s.",
                                                   choices=", ".join(openapi.USER_STATES)), field="state")
    result = account_admin().search(
        text=text_arg("q"),
        role=text_arg("role"),
        class_name=text_arg("class"),
        state=state,
        page=int_arg("page", 1, openapi.MAX_PAGE),
        per_page=int_arg("per_page", openapi.USERS_PER_PAGE, openapi.MAX_PER_PAGE),
    )
    return jsonify({
        "items": [user_json(u) for u in result.items],
        "total": result.total, "page": result.page, "per_page": result.per_page, "pages": result.pages,
    })


@api.post("/users")
@needs("admin:users:write")
def create_user() -> tuple[Response, int, dict[str, str]]:
    body = json_body("UserCreate")
    admin = account_admin()
    if admin.find_by_login(body["login"]) is not None:
        raise ApiError(409, "conflict", _("This login is already taken."), field="login")
    user = admin.create(
        actor(),
        login=body["login"],
        display_name=body["display_name"],
        email=body.get("email"),
        locale=body.get("locale"),
        roles=list(dict.fromkeys(body.get("roles", []))),
        classes=body.get("classes"),
    )
    _commit()
    return jsonify(user_json(user)), 201, {"Location": url_for(".get_user", user_id=user.id)}


@api.get(f"/users/{USER_ID}")
@needs("admin:users:read")
def get_user(user_id: int) -> Response:
    user = user_or_404(user_id)
    return jsonify(user_json(user) | obligations_json(user))


@api.patch(f"/users/{USER_ID}")
@needs("admin:users:write")
def update_user(user_id: int) -> Response:
    user = user_or_404(user_id)
    body = json_body("UserUpdate")
    admin = account_admin()
    if {"display_name", "email", "locale"} & set(body):
        admin.update_profile(
            actor(),
            user,
            display_name=body.get("display_name", user.display_name),
            email=body["email"] if "email" in body else user.email,
            locale=body["locale"] if "locale" in body else user.locale,
        )
    if "classes" in body:
        admin.set_classes(actor(), user, body["classes"])
    _commit()
    return jsonify(user_json(user))


@api.put(f"/users/{USER_ID}/roles")
@needs("admin:roles:assign")
def set_user_roles(user_id: int) -> Response:
    user = user_or_404(user_id)
    body = json_body("RolesUpdate")
    account_admin().set_roles(actor(), user, list(dict.fromkeys(body["roles"])))
    _commit()
    return jsonify(user_json(user))


@api.post(f"/users/{USER_ID}/lock")
@needs("support:accounts:lock")
def lock_user(user_id: int) -> Response:
    user = user_or_404(user_id)
    body = json_body("Reason")
    ended = account_admin().lock(actor(), user, body["reason"])
    _commit()
    return jsonify({"user": user_json(user), "sessions_ended": ended})


@api.post(f"/users/{USER_ID}/unlock")
@needs("support:accounts:lock")
def unlock_user(user_id: int) -> Response:
    user = user_or_404(user_id)
    body = json_body("Reason")
    account_admin().unlock(actor(), user, body["reason"])
    _commit()
    return jsonify({"user": user_json(user)})


@api.post(f"/users/{USER_ID}/sessions/end")
@needs("support:sessions:end")
def end_user_sessions(user_id: int) -> Response:
    user = user_or_404(user_id)
    body = json_body("Reason")
    ended = account_admin().end_sessions(actor(), user, body["reason"])
    _commit()
    return jsonify({"user": user_json(user), "sessions_ended": ended})


@api.post(f"/users/{USER_ID}/activation-code")
@needs("support:credentials:reset")
def issue_activation_code(user_id: int) -> Response:
    user = user_or_404(user_id)
    body = json_body("OptionalReason", optional=True)
    if not user.can_sign_in:
        # As in the console: a locked or disabled account could not redeem the code.
        raise ApiError(409, "account_locked", _("This account is locked or disabled: unlock it first."))
    code, expires = account_admin().issue_activation_code(actor(), user, (body.get("reason") or "").strip() or None)
    _commit()
    return jsonify({"user_id": user.id, "code": code, "expires_at": _timestamp(expires)})


@api.post(f"/users/{USER_ID}/personal-data")
@needs("privacy:data:export")
def export_personal_data(user_id: int) -> Response:
    from idp.privacy import export_personal_data as build_export

    user = user_or_404(user_id)
    body = json_body("Reason")
    svc = services()
    db = svc.db.session
    document = build_export(db, user, sessions=svc.sessions.list(user.id))
    caller = actor()
    svc.journal.record(db, actor=caller.ref, action="privacy:export:admin", subject=f"user:{user.id}",
                       reason=body["reason"], ip=caller.ip, request_id=caller.request_id,
                       details={"format": document["format"], "via": "api"})
    _commit()
    return jsonify(document)


# --- routes: roles, classes, portal apps, journal ------------------------------------------------
@api.get("/roles")
@needs("admin:users:read")
def list_roles() -> Response:
    roles = services().db.session.scalars(select(Role).order_by(Role.name))
    return jsonify({"items": [
        {"name": r.name, "description": r.description or "", "builtin": bool(r.builtin),
         "permissions": sorted(r.permissions)}
        for r in roles
    ]})


@api.get("/classes")
@needs("admin:users:read")
def list_classes() -> Response:
    return jsonify({"items": [class_json(c, n) for c, n in account_admin().list_classes()]})


@api.post("/classes")
@needs("admin:users:write")
def create_class() -> tuple[Response, int]:
    body = json_body("ClassCreate")
    name = body["name"].strip().upper()
    if services().db.session.scalar(select(SchoolClass.id).where(SchoolClass.name == name)) is not None:
        raise ApiError(409, "conflict", _("The class %(name)s already exists.", name=name), field="name")
    school_class = account_admin().create_class(actor(), body["name"])
    _commit()
    return jsonify(class_json(school_class, 0)), 201


@api.get("/clients")
@needs("clients:read")
def list_clients() -> Response:
    clients = services().db.session.scalars(select(Client).order_by(Client.name, Client.client_id))
    return jsonify({"items": [client_json(c) for c in clients]})


@api.get("/audit")
@needs("audit:read")
def list_audit_events() -> Response:
    filters, errors = parse_filters(request.args)
    if errors:
        field, message = next(iter(errors.items()))
        raise ApiError(400, "invalid_parameter", message, field=field)
    page = int_arg("page", 1, openapi.MAX_PAGE)
    per_page = int_arg("per_page", openapi.AUDIT_PER_PAGE, openapi.MAX_PER_PAGE)
    result = search_events(services().db.session, filters, page=page, per_page=per_page)
    return jsonify({
        "items": [event_record(e) for e in result.items],
        "total": result.total, "page": result.page, "per_page": result.per_page, "pages": result.pages,
    })


# --- the contract, and everything else under the prefix -----------------------------------------
@api.get("/openapi.json")
def openapi_document() -> Response:
    return jsonify(openapi.document(services().settings.issuer))


@api.route("/", defaults={"unknown": ""}, methods=ROUTED_METHODS)
@api.route("/<path:unknown>", methods=ROUTED_METHODS)
def unknown_path(unknown: str) -> NoReturn:
    """Answer unknown paths (404) and unsupported methods (405) with our JSON errors
    rather than the application's generic ones."""
    adapter = current_app.url_map.bind_to_environ(request.environ)
    allowed = []
    for method in ROUTED_METHODS:
        try:
            endpoint, _args = adapter.match(request.path, method=method)
        except HTTPException:
            continue
        if endpoint != "admin_api.unknown_path":
            allowed.append(method)
    if allowed:
        raise ApiError(405, "method_not_allowed", _("This HTTP method is not allowed here."),
                       headers={"Allow": ", ".join(allowed)})
    raise ApiError(404, "not_found", _("There is no such resource."))
