"""Registering portal apps (OAuth clients)."""

from __future__ import annotations

import ipaddress
import secrets
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from idp.access.permissions import PERMISSIONS
from idp.oidc.claims import SCOPES_SUPPORTED
from idp.oidc.models import Client, token_hash

GRANT_TYPES = {"authorization_code", "refresh_token", "client_credentials"}
AUTH_METHODS = {"client_secret_basic", "client_secret_post", "none"}


class ClientError(ValueError):
    """A client registration is not valid; the message says why."""


def allowed_scopes(grant_types: list[str]) -> set[str]:
    """The scopes a client may be registered with. Admin-API scopes (named after the
    permissions) only for machine clients that use client credentials and nothing else:
    they must never reach a user's consent screen or a user's token."""
    if set(grant_types) == {"client_credentials"}:
        return set(SCOPES_SUPPORTED) | set(PERMISSIONS)
    return set(SCOPES_SUPPORTED)


def is_loopback(host: str | None) -> bool:
    if host in {"localhost"}:
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def check_redirect_uri(uri: str) -> None:
    """R24: https only, except http on loopback for development and native apps; no fragment."""
    parts = urlsplit(uri)
    if parts.fragment or "#" in uri:
        raise ClientError(f"redirect URI must not contain a fragment: {uri}")
    if parts.scheme == "https" and parts.netloc:
        return
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return
    raise ClientError(f"redirect URI must be https (or http on loopback): {uri}")


def check_backchannel_logout_uri(uri: str) -> None:
    """OIDC Back-Channel Logout 1.0 §2.2: an absolute URL without a fragment, where logout
    tokens are POSTed; https (http only on loopback) like every address of an app."""
    if len(uri) > 2048:
        raise ClientError("back-channel logout URI is longer than 2048 characters")
    try:
        check_redirect_uri(uri)
    except ClientError:
        raise ClientError(
            f"back-channel logout URI must be https (or http on loopback), without a fragment: {uri}"
        ) from None


def create_client(
    session: Session,
    *,
    name: str,
    redirect_uris: list[str],
    post_logout_redirect_uris: list[str] | None = None,
    grant_types: list[str] | None = None,
    scopes: list[str] | None = None,
    auth_method: str = "client_secret_basic",
    trusted: bool = False,
    client_id: str | None = None,
    backchannel_logout_uri: str | None = None,
    backchannel_logout_session_required: bool = True,
) -> tuple[Client, str | None]:
    """Register a client; returns it and its secret (shown once, stored hashed)."""
    grant_types = grant_types or ["authorization_code", "refresh_token"]
    scopes = scopes or ["openid", "profile", "email", "roles", "school", "offline_access"]
    if not name.strip():
        raise ClientError("name must not be empty")
    if set(grant_types) - GRANT_TYPES:
        raise ClientError("grant types must be among: " + ", ".join(sorted(GRANT_TYPES)))
    if set(scopes) - allowed_scopes(grant_types):
        raise ClientError("scopes must be among: " + ", ".join(sorted(allowed_scopes(grant_types))))
    if auth_method not in AUTH_METHODS:
        raise ClientError("auth method must be one of: " + ", ".join(sorted(AUTH_METHODS)))
    if auth_method == "none" and "client_credentials" in grant_types:
        raise ClientError("a public client cannot use client_credentials")
    if "authorization_code" in grant_types and not redirect_uris:
        raise ClientError("the authorization code grant needs at least one redirect URI")
    for uri in [*redirect_uris, *(post_logout_redirect_uris or [])]:
        check_redirect_uri(uri)
    if backchannel_logout_uri:
        check_backchannel_logout_uri(backchannel_logout_uri)
    client_id = client_id or secrets.token_urlsafe(16)
    if len(client_id) > 64 or not client_id.replace("-", "").replace("_", "").isalnum():
        raise ClientError("client id must be at most 64 letters, digits, '-' or '_'")
    if session.scalar(select(Client.id).where(Client.client_id == client_id)) is not None:
        raise ClientError(f"client id {client_id!r} is already registered")
    secret = None if auth_method == "none" else secrets.token_urlsafe(32)
    client = Client(
        client_id=client_id,
        secret_hash=token_hash(secret) if secret else None,
        name=name.strip(),
        redirect_uris=list(redirect_uris),
        post_logout_redirect_uris=list(post_logout_redirect_uris or []),
        grant_types=list(grant_types),
        scopes=list(scopes),
        token_endpoint_auth_method=auth_method,
        trusted=trusted,
        backchannel_logout_uri=backchannel_logout_uri or None,
        backchannel_logout_session_required=bool(backchannel_logout_session_required),
    )
    session.add(client)
    session.flush()
    return client, secret


def update_client(
    session: Session,
    client: Client,
    *,
    name: str,
    redirect_uris: list[str],
    post_logout_redirect_uris: list[str],
    backchannel_logout_uri: str | None,
    grant_types: list[str],
    scopes: list[str],
    trusted: bool,
    allowed_roles: list[str],
    role_map: dict[str, str],
    active: bool = True,
    backchannel_logout_session_required: bool = True,
) -> dict[str, list[object]]:
    """Change a client's registration; returns the changed fields (before, after)."""
    if not name.strip() or len(name) > 255:
        raise ClientError("name must be 1-255 characters")
    if set(grant_types) - GRANT_TYPES or not grant_types:
        raise ClientError("grant types must be among: " + ", ".join(sorted(GRANT_TYPES)))
    if set(scopes) - allowed_scopes(grant_types):
        raise ClientError("scopes must be among: " + ", ".join(sorted(allowed_scopes(grant_types))))
    if client.is_public and "client_credentials" in grant_types:
        raise ClientError("a public client cannot use client_credentials")
    if "authorization_code" in grant_types and not redirect_uris:
        raise ClientError("the authorization code grant needs at least one redirect URI")
    for uri in [*redirect_uris, *post_logout_redirect_uris]:
        check_redirect_uri(uri)
    if backchannel_logout_uri:
        check_backchannel_logout_uri(backchannel_logout_uri)
    fields = {
        "name": name.strip(),
        "redirect_uris": list(dict.fromkeys(redirect_uris)),
        "post_logout_redirect_uris": list(dict.fromkeys(post_logout_redirect_uris)),
        "backchannel_logout_uri": backchannel_logout_uri or None,
        "backchannel_logout_session_required": bool(backchannel_logout_session_required),
        "grant_types": list(dict.fromkeys(grant_types)),
        "scopes": list(dict.fromkeys(scopes)),
        "trusted": bool(trusted),
        "allowed_roles": sorted(set(allowed_roles)),
        "role_map": dict(role_map),
        "active": bool(active),
    }
    changes: dict[str, list[object]] = {}
    for key, value in fields.items():
        if getattr(client, key) != value:
            changes[key] = [getattr(client, key), value]
            setattr(client, key, value)
    return changes


def rotate_secret(client: Client) -> str:
    """A new secret (shown once, stored hashed); the old one stops working at once."""
    if client.is_public:
        raise ClientError("a public client has no secret")
    secret = secrets.token_urlsafe(32)
    client.secret_hash = token_hash(secret)
    return secret
