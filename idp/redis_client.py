"""The one way every Darbaza process connects to Redis (the server's services, the
worker, its jobs): ``IDP_REDIS_URL`` alone, or, with ``IDP_REDIS_SENTINELS``, the
current master of a Sentinel-monitored group.

With Sentinel the URL still gives the database number, the user name and password of
the Redis servers and TLS (``rediss://``); its host and port are not used — the
sentinels name the master, and a client that meets a demoted master (a failover)
asks them again. ``IDP_REDIS_SENTINEL_PASSWORD`` is the sentinels' own password."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.connection import SSLConnection, parse_url
from redis.sentinel import Sentinel

if TYPE_CHECKING:
    from idp.config import Settings


def sentinel_addresses(entries: list[str]) -> list[tuple[str, int]]:
    """``host:port`` entries (``[v6]:port`` for IPv6) as (host, port); ValueError names
    the entry that is not one."""
    addresses = []
    for entry in entries:
        host, sep, port = entry.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r} is not host:port")
        addresses.append((host, int(port)))
    return addresses


def connect_redis(
    settings: Settings,
    *,
    socket_timeout: float | None = 5,
    socket_connect_timeout: float | None = 2,
    health_check_interval: int = 0,
) -> Redis:
    """A Redis client for ``settings``. ``socket_timeout=None`` for blocking readers
    (the RQ worker waits on its queue for minutes)."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "health_check_interval": health_check_interval,
    }
    if not settings.redis_sentinels:
        return Redis.from_url(settings.redis_url, **options)
    url_options = parse_url(settings.redis_url)
    # The sentinels say where the master is; the URL keeps the db, credentials and TLS.
    url_options.pop("host", None)
    url_options.pop("port", None)
    tls = url_options.pop("connection_class", None) is SSLConnection
    sentinel_options: dict[str, Any] = {
        "socket_timeout": socket_connect_timeout or 2,
        "socket_connect_timeout": socket_connect_timeout,
        "ssl": tls,
    }
    if settings.redis_sentinel_password:
        sentinel_options["password"] = settings.redis_sentinel_password
    sentinel = Sentinel(sentinel_addresses(settings.redis_sentinels), sentinel_kwargs=sentinel_options)
    return sentinel.master_for(settings.redis_sentinel_service, redis_class=Redis, ssl=tls, **url_options, **options)
