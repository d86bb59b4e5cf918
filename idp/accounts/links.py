"""One-time links sent by e-mail (password reset, e-mail verification).

A link carries 256 random bits; Redis keeps only the SHA-256 of it (a Redis dump
reveals no live link) with what the link is for and an expiry. ``peek`` reads without
using it up (a GET only shows a page: mail scanners open links), ``consume`` reads and
deletes in one transaction, so a link works exactly once even when two requests race.
No Flask here: the views pass in what they know."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Any

from redis import Redis

# token_urlsafe(32) gives 43 characters; anything else is not ours and is not looked up.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


class OneTimeLinks:
    """Tokens of one ``purpose`` (such as ``pwreset``) in Redis, each valid once."""

    def __init__(self, *, redis: Redis, purpose: str) -> None:
        self.redis = redis
        self.purpose = purpose

    def _key(self, token: str) -> str:
        return f"link:{self.purpose}:{hashlib.sha256(token.encode()).hexdigest()}"

    def _owner_key(self, user_id: int) -> str:
        return f"link:{self.purpose}:latest:{user_id}"

    @staticmethod
    def well_formed(token: str) -> bool:
        return bool(_TOKEN.fullmatch(token))

    def issue(self, data: dict[str, Any], *, ttl: int, user_id: int | None = None,
              replace_earlier: bool = False) -> str:
        """A new token for ``data`` valid ``ttl`` seconds. With ``replace_earlier`` the
        account's previous link of this purpose stops working (only the newest counts)."""
        token = secrets.token_urlsafe(32)
        key = self._key(token)
        pipe = self.redis.pipeline(transaction=True)
        if replace_earlier and user_id is not None:
            previous = self.redis.get(self._owner_key(user_id))
            if previous:
                pipe.delete(previous.decode() if isinstance(previous, bytes) else str(previous))
            pipe.set(self._owner_key(user_id), key, ex=ttl)
        pipe.set(key, json.dumps(data), ex=max(1, ttl))
        pipe.execute()
        return token

    def peek(self, token: str) -> dict[str, Any] | None:
        """What the link is for, or None when it is unknown, expired, used or malformed."""
        if not self.well_formed(token):
            return None
        raw = self.redis.get(self._key(token))
        return self._load(raw)

    def consume(self, token: str) -> dict[str, Any] | None:
        """Use the link up; returns its data only to the one caller that used it."""
        if not self.well_formed(token):
            return None
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self._key(token))
        pipe.delete(self._key(token))
        raw, deleted = pipe.execute()
        return self._load(raw) if deleted else None

    def ttl(self, token: str) -> int:
        """Seconds the link has left (0 when it is gone)."""
        if not self.well_formed(token):
            return 0
        return max(0, int(self.redis.ttl(self._key(token))))

    @staticmethod
    def _load(raw: Any) -> dict[str, Any] | None:
        if raw is None:
            return None
        data = json.loads(raw)
        return data if isinstance(data, dict) else None
