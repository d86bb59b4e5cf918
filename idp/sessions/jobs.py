"""The worker's job that ends timed-out sessions (``idp/worker.py`` queues it once a
minute): ``SessionRegistry.sweep_expired`` with the settings of the environment."""

from __future__ import annotations

import logging

from redis import Redis

from idp.config import Settings
from idp.db import Database
from idp.oidc.backchannel import build_backchannel
from idp.redis_client import connect_redis
from idp.sessions.registry import SessionRegistry

log = logging.getLogger("darbaza.sessions")


def build_registry(settings: Settings, database: Database, redis: Redis) -> SessionRegistry:
    """A registry wired like the server's (tokens, back-channel logout) for worker jobs."""
    backchannel = build_backchannel(settings, database.factory, redis)
    return SessionRegistry(redis=redis, tokens=backchannel.tokens, backchannel=backchannel)


def sweep_sessions() -> int:
    """RQ job: end every session past its idle or absolute timeout. Like the other jobs it
    builds its own database engine and Redis client in RQ's forked process."""
    settings = Settings.from_env()
    database = Database(settings.database_url, pool_size=1)
    redis = connect_redis(settings, socket_timeout=5, socket_connect_timeout=2)
    try:
        with database.factory() as db:
            ended = build_registry(settings, database, redis).sweep_expired(db)
    finally:
        database.dispose()
        redis.close()
    if ended:
        log.info("timed-out sessions ended: %d", ended)
    return ended
