"""Seeding the benchmark's database: migrations, a signing key, two clients and student
accounts (no second factor, nothing to accept) sharing one password hashed once with the
configured argon2id cost (the cost of verifying it is what sign-in measures)."""

from __future__ import annotations

import secrets
from typing import Any

REDIRECT_URI = "http://127.0.0.1:9/callback"
PASSWORD = "bench horse battery staple"  # noqa: S105 - benchmark accounts only


def seed(env: dict[str, str], *, users: int) -> dict[str, Any]:
    from idp.accounts.service import create_user
    from idp.app import create_app
    from idp.config import Settings
    from idp.migrate import upgrade
    from idp.oidc.clients import create_client

    settings = Settings.from_env(environ=env)
    upgrade(settings.database_url)
    app = create_app(settings)
    svc = app.extensions["darbaza"]
    logins = [f"bench-{i:05d}" for i in range(users)]
    with svc.db.transaction() as session:
        svc.keys.ensure_key(session)
        web, web_secret = create_client(session, name="bench web", redirect_uris=[REDIRECT_URI],
                                        grant_types=["authorization_code", "refresh_token"], trusted=True,
                                        scopes=["openid", "profile", "offline_access"])
        machine, machine_secret = create_client(session, name="bench machine", redirect_uris=[],
                                                grant_types=["client_credentials"], scopes=["openid"])
        first = create_user(session, svc.passwords, login=logins[0], display_name="Bench 0", password=PASSWORD,
                            roles=["student"])
        session.flush()
        for i, login in enumerate(logins[1:], start=1):
            user = create_user(session, svc.passwords, login=login, display_name=f"Bench {i}", password=None,
                               roles=["student"])
            user.password_hash = first.password_hash
            user.password_changed_at = first.password_changed_at
        ids = {"web": (web.client_id, web_secret), "machine": (machine.client_id, machine_secret)}
    svc.db.remove()
    svc.db.dispose()
    svc.redis.close()
    return {"clients": ids, "logins": logins, "password": PASSWORD, "redirect_uri": REDIRECT_URI,
            "argon2": {"time_cost": settings.argon2_time_cost, "memory_cost": settings.argon2_memory_cost,
                       "parallelism": settings.argon2_parallelism},
            "nonce": secrets.token_hex(4)}
