"""The one check of a password typed at sign-in or re-authentication (issue 7).

A local account (and a roster one) has an argon2id hash here. A directory account has
none: its password is the school directory's, checked by binding to the directory as the
account's entry (``User.directory_dn``), "bind-through" (connectors/ldap/client.py). Both
paths cost one argon2id verification (a directory account's is a dummy one), and an
unknown login costs the same dummy verification, so the answer's time says nothing about
whether the login exists.

Everything around the check (throttles, the consecutive-failure limit, restrictions, the
second factor, the pending chain) is the caller's and the same for every account. A
directory that cannot be reached raises ``DirectoryUnavailable``: the caller says so
clearly, counts nothing against the account, and local accounts are not affected."""

from __future__ import annotations

import logging

from flask import current_app
from flask_babel import gettext as _

from connectors.ldap import client as ldap_client
from connectors.ldap.client import DirectoryUnavailable
from connectors.ldap.config import DirectoryConfig, directory_config
from idp.accounts.models import User
from idp.config import Settings, SettingsError
from idp.services import services

__all__ = ["DIRECTORY", "DirectoryUnavailable", "directory_managed", "directory_password_message",
           "password_matches"]

log = logging.getLogger("darbaza.login")

DIRECTORY = "directory"
_CACHE_KEY = "darbaza.directory-config"


def directory_managed(user: User | None) -> bool:
    """Whether the school directory manages the account's password (no password is set,
    reset, changed or activated here)."""
    return user is not None and user.source == DIRECTORY


def directory_password_message() -> str:
    """What a directory account's person is told where a password would be set here."""
    return _("Your password is managed by the school directory; change it there.")


def _config(settings: Settings) -> DirectoryConfig | None:
    """The directory configuration, worked out once per application; None when no
    directory is configured or its settings are wrong (logged)."""
    cache = current_app.extensions.setdefault(_CACHE_KEY, {})
    if id(settings) not in cache:
        try:
            config: DirectoryConfig | None = directory_config(settings)
        except SettingsError as exc:
            log.error("the school directory settings are not valid, directory accounts cannot sign in: %s", exc)
            config = None
        if config is not None and not config.configured:
            config = None
        cache.clear()
        cache[id(settings)] = config
    value = cache[id(settings)]
    return value if isinstance(value, DirectoryConfig) else None


def password_matches(user: User | None, password: str) -> bool:
    """Whether ``password`` is the password of ``user`` (None: an unknown login, never
    matches). Raises ``DirectoryUnavailable`` when ``user`` is a directory account and
    the directory cannot answer. The password is passed on exactly as typed."""
    svc = services()
    if not directory_managed(user):
        return svc.passwords.verify(user.password_hash if user is not None else None, password)
    assert user is not None
    # The same argon2id cost as a local account's check (N8/timing: the kind of account
    # is not told by the answer's time).
    svc.passwords.verify(None, password)
    if not user.directory_dn:
        log.warning("directory account %s has no directory DN: it cannot sign in with a password", user.id)
        return False
    config = _config(svc.settings)
    if config is None:
        log.warning("directory account %s cannot sign in: no school directory is configured (IDP_LDAP_URLS)",
                    user.id)
        return False
    return ldap_client.check_password(config, user.directory_dn, password)
