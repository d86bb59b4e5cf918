"""Which claims a scope releases about a user (ID token and userinfo)."""

from __future__ import annotations

import calendar
from typing import Any

from idp.accounts.models import User
from idp.config import Settings
from idp.oidc.models import Client

SCOPES_SUPPORTED = ["openid", "profile", "email", "address", "phone", "roles", "school", "offline_access"]
CLAIMS_SUPPORTED = [
    "sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "azp", "sid",
    "name", "preferred_username", "locale", "email", "roles", "app_roles", "school", "groups",
    "children",
]


SCOPE_CLAIMS: dict[str, list[str]] = {
    "openid": ["sub"],
    "profile": ["name", "preferred_username", "locale", "updated_at", "roles", "school", "groups", "children"],
    "email": ["email"],
    "roles": ["roles", "app_roles"],
    "school": ["school", "groups", "children"],
    "offline_access": [],
    "address": [],
    "phone": [],
}


def claims_for_scopes(scopes: list[str]) -> list[str]:
    """The personal data an app with these scopes can receive."""
    seen: dict[str, None] = {}
    for scope in scopes:
        for claim in SCOPE_CLAIMS.get(scope, []):
            seen[claim] = None
    return list(seen)


def user_claims(user: User, scope: str, settings: Settings, client: Client | None = None) -> dict[str, Any]:
    """Claims released for ``scope``; ``sub`` is the stable random subject, never the login."""
    scopes = set(scope.split())
    claims: dict[str, Any] = {"sub": user.subject}
    if "profile" in scopes:
        claims["name"] = user.display_name
        claims["preferred_username"] = user.login
        claims["locale"] = user.locale or settings.default_locale
        if user.updated_at is not None:
            claims["updated_at"] = calendar.timegm(user.updated_at.utctimetuple())
    if "email" in scopes and user.email:
        claims["email"] = user.email
    if "roles" in scopes or "profile" in scopes:
        claims["roles"] = user.role_names
        if client is not None and client.role_map:
            app_roles = sorted({client.role_map[r] for r in user.role_names if r in client.role_map})
            claims["app_roles"] = app_roles
    if "school" in scopes or "profile" in scopes:
        claims["school"] = settings.school_name
        claims["groups"] = user.class_names
        if user.children:
            claims["children"] = [{"sub": c.subject, "name": c.display_name} for c in user.children]
    return claims
