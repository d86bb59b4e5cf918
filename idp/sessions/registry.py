"""The per-account index of browser sessions in Redis: list them and end them.

Sessions are written by ``RedisSessionInterface``; each signed-in session is listed in
``usess:{user_id}``. Ending a session deletes it and revokes the tokens bound to it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from sqlalchemy.orm import Session

from idp.oidc.tokens import TokenService


@dataclass
class SessionInfo:
    key: str
    sid: str | None
    auth_time: int | None
    last_seen: float | None
    amr: list[str]


class SessionRegistry:
    """Lists and ends an account's sessions; services never touch Flask."""

    def __init__(self, *, redis: Redis, tokens: TokenService) -> None:
        self.redis = redis
        self.tokens = tokens

    def list(self, user_id: int) -> list[SessionInfo]:
        found: list[SessionInfo] = []
        for raw_key in self.redis.smembers(f"usess:{user_id}"):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            raw = self.redis.get(key)
            if raw is None:
                self.redis.srem(f"usess:{user_id}", key)
                continue
            data: dict[str, Any] = json.loads(raw)
            if data.get("uid") != user_id:
                continue
            found.append(
                SessionInfo(
                    key=key,
                    sid=data.get("sid"),
                    auth_time=data.get("auth_time"),
                    last_seen=data.get("last_seen"),
                    amr=list(data.get("amr", [])),
                )
            )
        return sorted(found, key=lambda s: s.auth_time or 0, reverse=True)

    def end_all(self, db: Session, user_id: int) -> int:
        """End every browser session of the account and revoke all of its tokens."""
        ended = 0
        for info in self.list(user_id):
            self.redis.delete(info.key)
            if info.sid:
                self.redis.delete(f"sid:{info.sid}")
            ended += 1
        self.redis.delete(f"usess:{user_id}")
        self.tokens.revoke_user(db, user_id)
        return ended

    @staticmethod
    def now() -> float:
        return time.time()
