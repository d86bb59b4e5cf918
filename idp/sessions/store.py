"""Server-side browser sessions in Redis behind an opaque cookie.

The cookie holds 256 random bits; Redis holds the data under the SHA-256 of that
value, so a Redis dump does not reveal live cookies. The id is rotated at every
sign-in (ASVS 7.2.4); idle and absolute timeouts are enforced here on every request,
never by cookie expiry (NIST 800-63B-4 §5.1).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from redis import Redis
from werkzeug.datastructures import CallbackDict

ANONYMOUS_TTL = 3600
# Writing last-seen on every request would make every page a Redis write; a minute is
# precise enough for idle timeouts measured in tens of minutes.
TOUCH_INTERVAL = 60


def _key(token: str) -> str:
    return "sess:" + hashlib.sha256(token.encode()).hexdigest()


class RedisSession(CallbackDict, SessionMixin):  # type: ignore[type-arg]
    """The dict behind ``flask.session``, with rotation and destruction flags."""

    def __init__(self, initial: dict[str, Any] | None = None, token: str | None = None) -> None:
        def on_update(_self: Any) -> None:
            self.modified = True

        super().__init__(initial or {}, on_update)
        self.token = token
        self.new = token is None
        self.modified = False
        self.rotate_requested = False
        self.destroyed = False

    def regenerate(self) -> None:
        """Give this session a new id at the next save; the old id stops working."""
        self.rotate_requested = True
        self.modified = True

    def destroy(self) -> None:
        self.clear()
        self.destroyed = True
        self.modified = True


class RedisSessionInterface(SessionInterface):
    """Flask session interface storing sessions in Redis."""

    def __init__(self, redis: Redis, *, idle_timeout: int, absolute_timeout: int, secure: bool) -> None:
        self.redis = redis
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.secure = secure
        # The __Host- prefix needs Secure; plain-http localhost gets an unprefixed name.
        self.cookie_name = "__Host-darbaza" if secure else "darbaza"

    def open_session(self, app: Flask, request: Request) -> RedisSession:
        token = request.cookies.get(self.cookie_name)
        if not token or len(token) > 100:
            return RedisSession()
        raw = self.redis.get(_key(token))
        if raw is None:
            return RedisSession()
        data = json.loads(raw)
        now = time.time()
        if data.get("uid") is not None:
            created = data.get("auth_time", now)
            last_seen = data.get("last_seen", now)
            if now - created > self.absolute_timeout or now - last_seen > self.idle_timeout:
                self.redis.delete(_key(token))
                self._unindex(data, _key(token))
                return RedisSession()
        session = RedisSession(data, token)
        if data.get("uid") is not None and now - data.get("last_seen", 0) > TOUCH_INTERVAL:
            session["last_seen"] = now
        return session

    def _unindex(self, data: dict[str, Any], key: str) -> None:
        if data.get("uid") is not None:
            self.redis.srem(f"usess:{data['uid']}", key)
        if data.get("sid"):
            self.redis.delete(f"sid:{data['sid']}")

    def _ttl(self, session: RedisSession) -> int:
        if session.get("uid") is None:
            return ANONYMOUS_TTL
        remaining = int(session.get("auth_time", time.time()) + self.absolute_timeout - time.time())
        return max(1, min(self.idle_timeout, remaining))

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, RedisSession)
        cookie_kwargs: dict[str, Any] = {
            "path": "/",
            "secure": self.secure,
            "httponly": True,
            "samesite": "Lax",
        }
        if session.destroyed:
            if session.token:
                old = _key(session.token)
                raw = self.redis.get(old)
                self.redis.delete(old)
                if raw:
                    self._unindex(json.loads(raw), old)
            response.delete_cookie(self.cookie_name, **cookie_kwargs)
            return
        if not session.modified:
            return
        if not dict(session) and session.new:
            return
        pipe = self.redis.pipeline()
        if session.rotate_requested and session.token:
            pipe.delete(_key(session.token))
            session.token = None
        if session.token is None:
            session.token = secrets.token_urlsafe(32)
            response.set_cookie(self.cookie_name, session.token, **cookie_kwargs)
        key = _key(session.token)
        ttl = self._ttl(session)
        pipe.set(key, json.dumps(dict(session)), ex=ttl)
        if session.get("uid") is not None:
            pipe.sadd(f"usess:{session['uid']}", key)
            if session.get("sid"):
                pipe.set(f"sid:{session['sid']}", key, ex=ttl)
        pipe.execute()
