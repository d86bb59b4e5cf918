"""The collaborators every part of Darbaza shares, built once by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import current_app
from redis import Redis

from connectors.mail import MailTransport
from idp.accounts.blocklist import BlocklistSource, build_blocklist
from idp.accounts.passwords import PasswordHashing
from idp.audit.journal import Journal
from idp.clock import Clock, utc_now
from idp.config import Settings
from idp.crypto import SecretBox
from idp.db import Database
from idp.login.throttle import Throttle
from idp.mfa.passkeys import PasskeyService
from idp.mfa.service import TwoFactorService
from idp.notify.jobs import build_mail_transport, build_outbox
from idp.notify.outbox import Outbox
from idp.observability import MetricsBuffer, install_commit_counters
from idp.oidc.backchannel import BackchannelLogout
from idp.oidc.keys import KeyService, build_key_service
from idp.oidc.tokens import TokenService
from idp.redis_client import connect_redis
from idp.row_cache import ClientCache, RestrictionCache
from idp.sessions.registry import SessionRegistry


@dataclass
class Services:
    settings: Settings
    db: Database
    redis: Redis
    passwords: PasswordHashing
    keys: KeyService
    tokens: TokenService
    journal: Journal
    sessions: SessionRegistry
    # Common and breached passwords (idp/accounts/blocklist.py), or its Null twin.
    blocklist: BlocklistSource
    # Named limiters, one per purpose (STYLE: rate limiters are named per purpose).
    login_account_throttle: Throttle
    login_ip_throttle: Throttle
    # Self-service mail links (issue 4; ASVS 2.4.1 anti-automation): /password/forgot per
    # client IP and per login or address typed (and per account mailed), and the e-mail
    # verification links a signed-in person asks for. Every request counts.
    password_reset_ip_throttle: Throttle
    password_reset_throttle: Throttle
    email_link_throttle: Throttle
    # Durable mail (idp/notify/outbox.py) and the transport the worker delivers through.
    outbox: Outbox
    mail: MailTransport
    # TOTP seeds (sealed with their own key purpose), used steps and recovery codes.
    two_factor: TwoFactorService
    # Passkeys (WebAuthn) for the issuer's host, with single-use challenges in Redis.
    passkeys: PasskeyService
    # OIDC Back-Channel Logout: the apps used from each session, and logout tokens for
    # them when it ends (queued by the session registry, delivered by the worker).
    backchannel: BackchannelLogout
    # The time the access decision (idp/access/decision.py) is taken at; aware UTC. Tests
    # replace it to run the provider at a fixed moment.
    clock: Clock = field(default=utc_now)
    # This process's metric increments on their way to Redis (idp/observability.py).
    metrics: MetricsBuffer | None = None
    # Portal apps and access restrictions kept per process while unchanged (idp/row_cache.py).
    clients: ClientCache | None = None
    restrictions: RestrictionCache | None = None

    @classmethod
    def build(cls, settings: Settings) -> Services:
        db = Database(settings.database_url, settings.database_pool_size)
        redis = connect_redis(settings, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30)
        keys = build_key_service(settings, db.side_factory)
        passwords = PasswordHashing(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_cost,
            parallelism=settings.argon2_parallelism,
        )
        tokens = TokenService(settings=settings, keys=keys)
        journal = Journal()
        # Sign-ins and tokens counted once their transaction commits, request latency:
        # added up in this process and moved to Redis once a second (/metrics).
        metrics = MetricsBuffer(redis)
        install_commit_counters(db.factory, metrics)
        backchannel = BackchannelLogout(settings=settings, tokens=tokens, journal=journal, redis=redis)
        clients = ClientCache(redis, max_age=settings.cache_seconds)
        clients.install(db.factory)
        restrictions = RestrictionCache(redis, max_age=settings.cache_seconds)
        restrictions.install(db.factory)
        return cls(
            settings=settings,
            db=db,
            redis=redis,
            passwords=passwords,
            keys=keys,
            tokens=tokens,
            journal=journal,
            sessions=SessionRegistry(redis=redis, tokens=tokens, backchannel=backchannel),
            blocklist=build_blocklist(settings.password_blocklist, settings.password_blocklist_file),
            login_account_throttle=Throttle(
                redis=redis, purpose="login:account", free_failures=settings.login_account_free_failures,
                max_delay=settings.login_max_delay, window=settings.login_account_window,
            ),
            login_ip_throttle=Throttle(
                redis=redis, purpose="login:ip", free_failures=settings.login_ip_free_failures,
                max_delay=settings.login_max_delay, window=settings.login_ip_window,
            ),
            # The school NAT allowance of sign-in, counted apart from sign-in failures.
            password_reset_ip_throttle=Throttle(
                redis=redis, purpose="password-reset:ip", free_failures=settings.login_ip_free_failures,
                max_delay=settings.login_max_delay, window=settings.login_ip_window,
            ),
            # Three links an hour per login, address or account, then growing delays.
            password_reset_throttle=Throttle(
                redis=redis, purpose="password-reset:account", free_failures=3,
                max_delay=settings.login_max_delay, window=3600,
            ),
            # Five verification mails a day per account, then growing delays (no mail bombing
            # of someone else's address from a signed-in account).
            email_link_throttle=Throttle(
                redis=redis, purpose="email-link:account", free_failures=5,
                max_delay=settings.login_max_delay, window=86400,
            ),
            outbox=build_outbox(settings),
            mail=build_mail_transport(settings),
            two_factor=TwoFactorService(
                redis=redis, passwords=passwords,
                box=SecretBox(settings.data_key or settings.secret_key, "totp-seeds"),
                school_name=settings.school_name,
            ),
            passkeys=PasskeyService(redis=redis, issuer=settings.issuer, rp_name=settings.school_name),
            backchannel=backchannel,
            metrics=metrics,
            clients=clients,
            restrictions=restrictions,
        )


def services() -> Services:
    """The current application's services (for views only; services never call this)."""
    return current_app.extensions["darbaza"]
