"""CORS for the endpoints browser-based portal apps call directly (token, userinfo,
revocation, discovery, JWKS), allowed only for the origins of registered redirect URIs
(ASVS 3.4.2). Never on /authorize (R26): that one is a top-level navigation."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from flask import Flask, Response, request
from sqlalchemy import select

from idp.oidc.models import Client
from idp.services import services

CORS_PATHS = ("/token", "/userinfo", "/revoke")
PUBLIC_PATHS = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server", "/jwks.json")
CACHE_SECONDS = 30


class OriginAllowlist:
    """Origins of every active client's redirect URIs, re-read every 30 seconds."""

    def __init__(self) -> None:
        self._origins: set[str] = set()
        self._loaded_at = 0.0

    def allows(self, origin: str) -> bool:
        age = time.monotonic() - self._loaded_at
        # A miss re-reads at most once a second, so a newly registered app works at once
        # while unknown origins cannot make every request query the database.
        if age > CACHE_SECONDS or (origin not in self._origins and age > 1):
            origins: set[str] = set()
            rows = services().db.session.execute(select(Client.redirect_uris).where(Client.active.is_(True)))
            for (uris,) in rows:
                for uri in uris or []:
                    parts = urlsplit(uri)
                    if parts.scheme in ("http", "https") and parts.netloc:
                        origins.add(f"{parts.scheme}://{parts.netloc}")
            self._origins = origins
            self._loaded_at = time.monotonic()
        return origin in self._origins


def init_app(app: Flask) -> None:
    allowlist = OriginAllowlist()

    @app.before_request
    def _preflight() -> Response | None:
        if request.method != "OPTIONS" or not request.path.startswith(CORS_PATHS):
            return None
        origin = request.headers.get("Origin", "")
        response = Response(status=204)
        if origin and allowlist.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        response.headers["Vary"] = "Origin"
        return response

    @app.after_request
    def _cors(response: Response) -> Response:
        if request.path.startswith(CORS_PATHS):
            origin = request.headers.get("Origin", "")
            if origin and allowlist.allows(origin):
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Access-Control-Expose-Headers"] = "WWW-Authenticate"
            response.headers.add("Vary", "Origin")
        return response
