"""The admin API's contract: an OpenAPI 3.1 document, kept next to the routes in
``admin_ui.api``. The request-body schemas here are also what the API validates
bodies against, and the limits below are the ones it enforces, so the document
cannot drift from the behaviour (tests/integration/admin/test_openapi.py checks the
routes and their permissions too). Plain data: no Flask here."""

from __future__ import annotations

import copy
from typing import Any

from idp.access.permissions import PERMISSIONS

API_PREFIX = "/admin/api/v1"
MAX_PAGE = 1_000_000
MAX_PER_PAGE = 200
USERS_PER_PAGE = 25
AUDIT_PER_PAGE = 50
# Query-parameter limits: longer values cannot match anything stored.
TEXT_LIMITS = {"q": 100, "role": 64, "class": 32, "actor": 128, "subject": 128, "action": 64}
USER_STATES = ["active", "locked", "disabled"]
LOCALES = ["ky", "ru", "en"]
MAX_REASON = 1000  # idp.accounts.admin.MAX_REASON
MAX_LIST_ITEMS = 100

_nullable_text = {"type": ["string", "null"]}
_names = {"type": "array", "items": {"type": "string"}}
_timestamp = {"type": ["string", "null"], "format": "date-time", "description": "UTC, RFC 3339"}


def _list_of(ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items"],
        "additionalProperties": False,
        "properties": {"items": {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _page_of(ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "total", "page", "per_page", "pages"],
        "additionalProperties": False,
        "properties": {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}},
            "total": {"type": "integer", "minimum": 0},
            "page": {"type": "integer", "minimum": 1},
            "per_page": {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE},
            "pages": {"type": "integer", "minimum": 1},
        },
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {
                "type": "string",
                "description": "A stable code: missing_token, invalid_token, insufficient_scope, invalid_json, "
                "invalid_field, invalid_parameter, invalid_value, not_found, conflict, account_locked, "
                "method_not_allowed, request_too_large, temporarily_unavailable, server_error.",
            },
            "message": {"type": "string", "description": "What went wrong, for people."},
            "field": {"type": "string", "description": "The body field or query parameter at fault."},
            "permission": {"type": "string", "description": "The permission (scope) that is missing."},
        },
    },
    "User": {
        "type": "object",
        "required": [
            "id", "subject", "login", "display_name", "email", "locale", "roles", "classes", "active",
            "locked", "lock_reason", "must_change_password", "created_at", "updated_at",
        ],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            "subject": {"type": "string", "description": "The OIDC `sub` of the account."},
            "login": {"type": "string"},
            "display_name": {"type": "string"},
            "email": _nullable_text,
            "locale": {"type": ["string", "null"], "enum": [*LOCALES, None]},
            "roles": _names,
            "classes": _names,
            "active": {"type": "boolean"},
            "locked": {"type": "boolean"},
            "lock_reason": _nullable_text,
            "must_change_password": {"type": "boolean"},
            "created_at": _timestamp,
            "updated_at": _timestamp,
            "obligations_pending": {
                "type": "array",
                "description": "Only in getUser: the current confidentiality-obligation versions (policy 2.5) of "
                "the account's roles that it has not accepted yet; it is asked to at its next sign-in.",
                "items": {
                    "type": "object",
                    "required": ["role", "version"],
                    "additionalProperties": False,
                    "properties": {"role": {"type": "string"}, "version": {"type": "integer", "minimum": 1}},
                },
            },
            "obligation_acceptances": {
                "type": "array",
                "description": "Only in getUser: every confidentiality-obligation version the account accepted, "
                "newest first.",
                "items": {
                    "type": "object",
                    "required": ["role", "version", "accepted_at", "ip", "locale"],
                    "additionalProperties": False,
                    "properties": {
                        "role": {"type": "string"},
                        "version": {"type": "integer", "minimum": 1},
                        "accepted_at": _timestamp,
                        "ip": _nullable_text,
                        "locale": {"type": "string", "enum": LOCALES},
                    },
                },
            },
        },
    },
    "UserPage": _page_of("User"),
    "UserCreate": {
        "type": "object",
        "required": ["login", "display_name"],
        "additionalProperties": False,
        "properties": {
            "login": {
                "type": "string", "minLength": 2, "maxLength": 64,
                "description": "2-64 latin letters, digits, '.', '_' or '-', starting with a letter or "
                "digit; compared case-insensitively.",
            },
            "display_name": {"type": "string", "minLength": 1, "maxLength": 255},
            "email": {"type": ["string", "null"], "maxLength": 320},
            "locale": {"type": ["string", "null"], "enum": [*LOCALES, None]},
            "roles": {
                "type": "array", "maxItems": MAX_LIST_ITEMS, "items": {"type": "string", "maxLength": 64},
                "description": "Giving roles needs admin:roles:assign and every permission of each role.",
            },
            "classes": {"type": "array", "maxItems": MAX_LIST_ITEMS, "items": {"type": "string", "maxLength": 32}},
        },
    },
    "UserUpdate": {
        "type": "object",
        "additionalProperties": False,
        "description": "Only the fields sent are changed; email and locale may be null to clear them.",
        "properties": {
            "display_name": {"type": "string", "minLength": 1, "maxLength": 255},
            "email": {"type": ["string", "null"], "maxLength": 320},
            "locale": {"type": ["string", "null"], "enum": [*LOCALES, None]},
            "classes": {"type": "array", "maxItems": MAX_LIST_ITEMS, "items": {"type": "string", "maxLength": 32}},
        },
    },
    "RolesUpdate": {
        "type": "object",
        "required": ["roles"],
        "additionalProperties": False,
        "properties": {
            "roles": {
                "type": "array", "maxItems": MAX_LIST_ITEMS, "items": {"type": "string", "maxLength": 64},
                "description": "The complete new set of roles.",
            },
        },
    },
    "Reason": {
        "type": "object",
        "required": ["reason"],
        "additionalProperties": False,
        "properties": {
            "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON,
                       "description": "Stored in the audit journal."},
        },
    },
    "OptionalReason": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"reason": {"type": ["string", "null"], "maxLength": MAX_REASON}},
    },
    "AccountActionResult": {
        "type": "object",
        "required": ["user"],
        "additionalProperties": False,
        "properties": {
            "user": {"$ref": "#/components/schemas/User"},
            "sessions_ended": {"type": "integer", "minimum": 0},
        },
    },
    "ActivationCode": {
        "type": "object",
        "required": ["user_id", "code", "expires_at"],
        "additionalProperties": False,
        "properties": {
            "user_id": {"type": "integer"},
            "code": {"type": "string", "description": "Shown once; stored only hashed."},
            "expires_at": {"type": "string", "format": "date-time"},
        },
    },
    "Role": {
        "type": "object",
        "required": ["name", "description", "builtin", "permissions"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "builtin": {"type": "boolean"},
            "permissions": _names,
        },
    },
    "RoleList": _list_of("Role"),
    "SchoolClass": {
        "type": "object",
        "required": ["name", "members", "created_at"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "members": {"type": "integer", "minimum": 0},
            "created_at": _timestamp,
        },
    },
    "ClassList": _list_of("SchoolClass"),
    "ClassCreate": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 32,
                     "description": "Letters, digits, '-', '_' or spaces; stored upper-case (\"7A\")."},
        },
    },
    "Client": {
        "type": "object",
        "required": [
            "client_id", "name", "active", "trusted", "grant_types", "scopes", "redirect_uris",
            "post_logout_redirect_uris", "backchannel_logout_uri", "backchannel_logout_session_required",
            "token_endpoint_auth_method", "allowed_roles", "created_at",
        ],
        "additionalProperties": False,
        "properties": {
            "client_id": {"type": "string"},
            "name": {"type": "string"},
            "active": {"type": "boolean"},
            "trusted": {"type": "boolean"},
            "grant_types": _names,
            "scopes": _names,
            "redirect_uris": _names,
            "post_logout_redirect_uris": _names,
            "backchannel_logout_uri": _nullable_text,
            "backchannel_logout_session_required": {
                "type": "boolean",
                "description": "Logout tokens sent to backchannel_logout_uri carry the session id (sid).",
            },
            "token_endpoint_auth_method": {"type": "string"},
            "allowed_roles": _names,
            "created_at": _timestamp,
        },
    },
    "ClientList": _list_of("Client"),
    "AuditEvent": {
        "type": "object",
        "required": [
            "seq", "occurred_at", "occurred_at_local", "actor", "subject", "action", "reason", "ip",
            "request_id", "details", "prev_hash", "hash",
        ],
        "additionalProperties": False,
        "properties": {
            "seq": {"type": "integer", "minimum": 1},
            "occurred_at": {"type": "string", "description": "UTC, with the microseconds the hash covers."},
            "occurred_at_local": {"type": "string", "description": "The same moment in Asia/Bishkek."},
            "actor": {"type": "string", "description": "\"user:12\", \"client:abc\", \"cli:root\", \"anonymous\""},
            "subject": _nullable_text,
            "action": {"type": "string", "description": "A tag such as account:lock."},
            "reason": _nullable_text,
            "ip": _nullable_text,
            "request_id": _nullable_text,
            "details": {"type": "object"},
            "prev_hash": {"type": "string"},
            "hash": {"type": "string"},
            "content_hash": {"type": ["string", "null"],
                             "description": "SHA-256 of the personal content; null on rows written before "
                                            "redaction existed (their hash covers every field)."},
            "redacted_at": {"type": ["string", "null"],
                            "description": "When retention blanked the personal content (UTC)."},
        },
    },
    "AuditPage": _page_of("AuditEvent"),
    "PersonalData": {
        "type": "object",
        "description": "Everything Darbaza keeps about the person (idp/privacy.py), without any secret.",
        "required": ["format", "generated_at", "account", "two_factor", "sessions", "consents", "apps",
                     "breach_reports", "obligations_accepted", "journal", "journal_truncated"],
        "properties": {
            "format": {"type": "string", "const": "darbaza-personal-data/1"},
            "generated_at": {"type": "string"},
            "account": {"type": "object"},
            "two_factor": {"type": "object"},
            "sessions": {"type": ["array", "null"], "items": {"type": "object"}},
            "consents": {"type": "array", "items": {"type": "object"}},
            "apps": {"type": "array", "items": {"type": "object"}},
            "breach_reports": {"type": "array", "items": {"type": "object"}},
            "obligations_accepted": {"type": "array", "items": {"type": "object"}},
            "journal": {"type": "array", "items": {"type": "object"}},
            "journal_truncated": {"type": "boolean"},
        },
    },
}


def _error(description: str, *, challenge: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if challenge:
        response["headers"] = {
            "WWW-Authenticate": {
                "description": "RFC 6750 bearer challenge",
                "required": True,
                "schema": {"type": "string"},
            }
        }
    return response


RESPONSES: dict[str, dict[str, Any]] = {
    "BadRequest": _error("Malformed JSON, a body that is not an object, or a query parameter out of range."),
    "Unauthorized": _error("The bearer token is missing, invalid, expired or revoked.", challenge=True),
    "Forbidden": _error("The token's scope lacks the permission this operation needs (insufficient_scope).",
                        challenge=True),
    "NotFound": _error("No such account."),
    "Conflict": _error("The resource already exists, or the account's state does not allow the action."),
    "Unprocessable": _error("A field has the wrong type, is unknown or missing, or its value is refused."),
    "TooLarge": _error("The request body is larger than 1 MiB."),
}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _text(name: str, description: str) -> dict[str, Any]:
    return _query(name, description, {"type": "string", "maxLength": TEXT_LIMITS[name]})


PARAMETERS: dict[str, dict[str, Any]] = {
    "UserId": {"name": "user_id", "in": "path", "required": True,
               "schema": {"type": "integer", "minimum": 1, "maximum": 2_147_483_647}},
    "Page": _query("page", "Page number, from 1.", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
    "UsersPerPage": _query("per_page", "Items per page.",
                           {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE, "default": USERS_PER_PAGE}),
    "AuditPerPage": _query("per_page", "Items per page.",
                           {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE, "default": AUDIT_PER_PAGE}),
    "Q": _text("q", "Part of the name or login."),
    "Role": _text("role", "Only accounts with this role."),
    "Class": _text("class", "Only members of this class."),
    "State": _query("state", "Only accounts in this state.", {"type": "string", "enum": USER_STATES}),
    "Actor": _text("actor", "Who acted: a reference such as user:12 or client:abc, or a login."),
    "Subject": _text("subject", "Whom it was about: a reference such as user:12, or a login."),
    "Action": _text("action", "The beginning of the action tag, e.g. account: or account:lock."),
    "From": _query("from", "First day (Asia/Bishkek), YYYY-MM-DD.", {"type": "string", "format": "date"}),
    "To": _query("to", "Last day (Asia/Bishkek), YYYY-MM-DD, inclusive.", {"type": "string", "format": "date"}),
}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref("schemas", schema)}}


def _operation(
    operation_id: str,
    summary: str,
    permission: str,
    *,
    ok: tuple[str, str, str],
    parameters: tuple[str, ...] = (),
    body: str | None = None,
    body_required: bool = True,
    errors: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One operation; ``ok`` is (status, description, response schema)."""
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission}")
    status, description, schema = ok
    responses: dict[str, Any] = {status: {"description": description, "content": _json(schema)}}
    responses["400"] = _ref("responses", "BadRequest")
    responses["401"] = _ref("responses", "Unauthorized")
    responses["403"] = _ref("responses", "Forbidden")
    names = {"404": "NotFound", "409": "Conflict", "413": "TooLarge", "422": "Unprocessable"}
    wanted = set(errors) | ({"413", "422"} if body else set())
    for code in sorted(wanted):
        responses[code] = _ref("responses", names[code])
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "description": f"Needs the scope `{permission}`.",
        "x-permission": permission,
        "security": [{"bearerAuth": [permission]}],
        "parameters": [_ref("parameters", p) for p in parameters],
        "responses": responses,
    }
    if body:
        operation["requestBody"] = {"required": body_required, "content": _json(body)}
    return operation


def _paths() -> dict[str, Any]:
    user = ("UserId",)
    return {
        "/users": {
            "get": _operation("listUsers", "Search accounts", "admin:users:read", ok=("200", "A page of accounts", "UserPage"),
                              parameters=("Q", "Role", "Class", "State", "Page", "UsersPerPage")),
            "post": _operation("createUser", "Create an account (without a password: issue an activation code)",
                               "admin:users:write", ok=("201", "The new account", "User"), body="UserCreate",
                               errors=("409",)),
        },
        "/users/{user_id}": {
            "get": _operation("getUser", "One account", "admin:users:read", ok=("200", "The account", "User"),
                              parameters=user, errors=("404",)),
            "patch": _operation("updateUser", "Change the profile (name, e-mail, language) and classes",
                                "admin:users:write", ok=("200", "The account", "User"), parameters=user,
                                body="UserUpdate", errors=("404",)),
        },
        "/users/{user_id}/roles": {
            "put": _operation("setUserRoles", "Replace the account's roles", "admin:roles:assign",
                              ok=("200", "The account", "User"), parameters=user, body="RolesUpdate", errors=("404",)),
        },
        "/users/{user_id}/lock": {
            "post": _operation("lockUser", "Lock the account and end all its sessions and tokens",
                               "support:accounts:lock", ok=("200", "Locked", "AccountActionResult"),
                               parameters=user, body="Reason", errors=("404",)),
        },
        "/users/{user_id}/unlock": {
            "post": _operation("unlockUser", "Unlock the account", "support:accounts:lock",
                               ok=("200", "Unlocked", "AccountActionResult"), parameters=user, body="Reason",
                               errors=("404",)),
        },
        "/users/{user_id}/sessions/end": {
            "post": _operation("endUserSessions", "End every session of the account and revoke its tokens",
                               "support:sessions:end", ok=("200", "Sessions ended", "AccountActionResult"),
                               parameters=user, body="Reason", errors=("404",)),
        },
        "/users/{user_id}/activation-code": {
            "post": _operation("issueActivationCode",
                               "Issue a one-time activation code (returned once; earlier codes stop working)",
                               "support:credentials:reset", ok=("200", "The code", "ActivationCode"),
                               parameters=user, body="OptionalReason", body_required=False,
                               errors=("404", "409")),
        },
        "/users/{user_id}/personal-data": {
            "post": _operation("exportPersonalData",
                               "The person's personal data (their request under the personal-data law); journalled "
                               "with the reason", "privacy:data:export",
                               ok=("200", "The export", "PersonalData"), parameters=user, body="Reason",
                               errors=("404",)),
        },
        "/roles": {
            "get": _operation("listRoles", "Roles and their permissions", "admin:users:read",
                              ok=("200", "Every role", "RoleList")),
        },
        "/classes": {
            "get": _operation("listClasses", "Classes and their member counts", "admin:users:read",
                              ok=("200", "Every class", "ClassList")),
            "post": _operation("createClass", "Create a class", "admin:users:write",
                               ok=("201", "The new class", "SchoolClass"), body="ClassCreate", errors=("409",)),
        },
        "/clients": {
            "get": _operation("listClients", "Registered portal apps", "clients:read",
                              ok=("200", "Every portal app", "ClientList")),
        },
        "/audit": {
            "get": _operation("listAuditEvents", "The audit journal, newest first", "audit:read",
                              ok=("200", "A page of journal rows", "AuditPage"),
                              parameters=("Actor", "Subject", "Action", "From", "To", "Page", "AuditPerPage")),
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenApiDocument",
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}},
            },
        },
    }


def document(issuer: str) -> dict[str, Any]:
    """The OpenAPI document for a provider at ``issuer``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Darbaza admin API",
            "version": "1.0.0",
            "description": (
                "The console's account, class, portal-app and audit operations as JSON, for the school's "
                "IT scripts. Authenticate with an access token from the client-credentials grant at "
                f"{issuer}/token, for a portal app registered with the client_credentials grant only and "
                "with admin scopes: each scope is a permission name (for example admin:users:read), and "
                "each operation names the one it needs. Every change is written to the audit journal "
                "with the actor client:<client_id>. Errors are JSON objects {error, message}."
            ),
        },
        "servers": [{"url": issuer.rstrip("/") + API_PREFIX}],
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": f"An RFC 9068 access token from {issuer}/token (grant_type=client_credentials).",
                },
            },
            "schemas": copy.deepcopy(SCHEMAS),
            "responses": copy.deepcopy(RESPONSES),
            "parameters": copy.deepcopy(PARAMETERS),
        },
    }
