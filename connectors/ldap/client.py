"""Talking to the school directory with ldap3: connections (failover over the configured
servers, LDAPS or StartTLS with the CA file, timeouts), the service account's bind, a
person's password check by binding as them, and paged searches.

Every filter and DN built from data goes through ldap3's escaping helpers
(``escape_filter_chars``, ``escape_rdn``); nothing here formats user input into a filter
any other way."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from typing import Any

from ldap3 import FIRST, NONE, SIMPLE, Connection, Server, ServerPool, Tls
from ldap3.core.exceptions import LDAPException, LDAPInvalidCredentialsResult, LDAPOperationResult
from ldap3.utils.conv import escape_filter_chars

from connectors.ldap.config import DirectoryConfig

log = logging.getLogger(__name__)


class DirectoryUnavailable(Exception):
    """The directory cannot be reached (or refused the service account): nothing about
    the person can be decided; callers say so clearly and local accounts keep working."""


def _pool(config: DirectoryConfig) -> ServerPool:
    tls = None
    if config.security in {"ldaps", "starttls"}:
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file or None,
                  version=ssl.PROTOCOL_TLS_CLIENT)
    servers = [
        Server(url, use_ssl=config.security == "ldaps", tls=tls, get_info=NONE, connect_timeout=config.timeout)
        for url in config.urls
    ]
    # FIRST: the first server that answers; exhaust=True skips a dead one for a while.
    return ServerPool(servers, FIRST, active=1, exhaust=30)


def _open(config: DirectoryConfig, user: str, password: str) -> Connection:
    """A bound connection, or raises ``LDAPInvalidCredentialsResult`` (wrong password) or
    ``DirectoryUnavailable``."""
    if not config.urls:
        raise DirectoryUnavailable("no directory is configured (IDP_LDAP_URLS)")
    conn = Connection(_pool(config), user=user, password=password, authentication=SIMPLE,
                      receive_timeout=config.timeout, raise_exceptions=True, read_only=True)
    try:
        conn.open()
        if config.security == "starttls":
            conn.start_tls()
        conn.bind()
    except LDAPInvalidCredentialsResult:
        conn.unbind()
        raise
    except (LDAPException, OSError, ssl.SSLError) as exc:
        try:
            conn.unbind()
        except (LDAPException, OSError):
            pass
        raise DirectoryUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return conn


def service_connection(config: DirectoryConfig) -> Connection:
    """A connection bound as the service account (``IDP_LDAP_BIND_DN``). A refused
    service bind is reported as unavailable: it is a configuration fault, not the user's."""
    try:
        return _open(config, config.bind_dn, config.bind_password)
    except LDAPInvalidCredentialsResult as exc:
        raise DirectoryUnavailable("the directory refused the service account (IDP_LDAP_BIND_DN)") from exc


def check_password(config: DirectoryConfig, dn: str, password: str) -> bool:
    """Whether ``password`` is the password of the entry ``dn``, by binding as it.

    An empty password is refused here, never sent: LDAP treats a simple bind with a DN
    and no password as an unauthenticated (anonymous) bind that *succeeds* (RFC 4513
    5.1.2). Raises ``DirectoryUnavailable`` when the directory cannot answer."""
    if not password or not dn or "\x00" in password:
        return False
    try:
        conn = _open(config, dn, password)
    except LDAPInvalidCredentialsResult:
        return False
    except LDAPOperationResult as exc:  # pragma: no cover - e.g. a locked account in AD
        log.info("directory bind refused for %s: %s", dn, exc)
        return False
    conn.unbind()
    return True


def paged_search(conn: Connection, base: str, search_filter: str, attributes: list[str],
                 page_size: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every entry under ``base`` matching ``search_filter``, fetched ``page_size`` at a
    time (Simple Paged Results, RFC 2696), as (dn, attributes) pairs."""
    try:
        for item in conn.extend.standard.paged_search(base, search_filter, attributes=attributes,
                                                      paged_size=page_size, generator=True):
            if item.get("type") == "searchResEntry":
                yield item["dn"], dict(item.get("attributes", {}))
    except (LDAPException, OSError) as exc:
        raise DirectoryUnavailable(f"{type(exc).__name__}: {exc}") from exc


def equals_filter(attribute: str, value: str) -> str:
    """``(attribute=value)`` with ``value`` escaped (RFC 4515): ``*``, ``(``, ``)``, ``\\``
    and NUL cannot change the filter's meaning."""
    return f"({attribute}={escape_filter_chars(value)})"
