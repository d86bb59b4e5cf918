"""PostgreSQL bytes per row (``python -m bench row_sizes``), for docs/capacity.md.

Starts a throwaway PostgreSQL (``scripts/pg-test.sh``; or uses BENCH_DATABASE_URL when it
is a PostgreSQL URL, whose tables it fills), migrates it, and inserts BENCH_ROWS accounts
(default 10,000; the country's mix of docs/capacity.md: 41 % students in a class, 56 %
parents with an e-mail address linked to 1.2 children, 3 % teachers with TOTP and ten
recovery codes) and, per
account, what one sign-in with one portal app and one refresh leaves in the database: an
authorization code, two refresh tokens (issued, then rotated), two access-token rows and
one journal event, plus a tenth of an outbox mail. Values have the sizes the provider
writes (argon2id hashes, SHA-256 hex, ``token_urlsafe`` ids). Prints each table's
``pg_total_relation_size`` (heap, indexes and TOAST) per row."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.stack import ROOT, free_port

ROWS = int(os.environ.get("BENCH_ROWS", "10000"))
ARGON2_HASH = "$argon2id$v=19$m=65536,t=3,p=1$" + "A" * 22 + "$" + "B" * 43  # the length of a real one
TABLES = ["users", "user_roles", "class_members", "guardian_links", "recovery_codes", "authorization_codes",
          "refresh_tokens", "access_tokens", "audit_events", "outbox_messages"]


def _hex() -> str:
    return secrets.token_hex(32)


def _fill(url: str, rows: int) -> None:
    from sqlalchemy import create_engine, insert, select

    from idp.accounts.models import (
        RecoveryCode,
        Role,
        SchoolClass,
        User,
        class_members,
        guardian_links,
        user_roles,
    )
    from idp.audit.journal import Journal
    from idp.notify.models import OutboxMessage
    from idp.oidc.models import AccessToken, AuthorizationCode, RefreshToken

    engine = create_engine(url)
    now = datetime.now(UTC).replace(tzinfo=None)
    stamp = int(time.time())
    client_id = secrets.token_urlsafe(16)
    with engine.begin() as conn:
        if not conn.execute(select(Role.id).where(Role.name == "student")).first():
            conn.execute(insert(Role), [{"name": n, "description": n, "builtin": True} for n in
                                        ("student", "teacher", "parent")])
        roles = {name: rid for rid, name in conn.execute(select(Role.id, Role.name))}
        conn.execute(insert(SchoolClass), [{"name": f"{g}{c}", "created_at": now}
                                           for g in range(1, 12) for c in "АБВГДЕ"])
        classes = [cid for (cid,) in conn.execute(select(SchoolClass.id))]
        users: list[dict[str, Any]] = []
        kinds: list[str] = []
        for i in range(rows):
            kind = "student" if i % 100 < 41 else ("teacher" if i % 100 < 44 else "parent")
            kinds.append(kind)
            name = f"Айбек Асанбекович Токтогулов {i}"
            users.append({
                "subject": str(uuid.uuid4()), "login": f"a.toktogulov{i}", "display_name": name,
                "search_name": name.casefold(), "email": None if kind == "student" else f"a.toktogulov{i}@mail.kg",
                "email_verified_at": None if kind == "student" else now, "locale": "ky", "active": True,
                "locked": False, "password_hash": ARGON2_HASH, "password_changed_at": now, "created_at": now,
                "updated_at": now, "must_change_password": False, "password_failures": 0, "totp_failures": 0,
                "totp_secret_encrypted": ("v1:" + secrets.token_urlsafe(90)) if kind == "teacher" else None,
                "totp_enabled_at": now if kind == "teacher" else None, "source": "roster",
                "external_id": str(uuid.uuid4()),
            })
        conn.execute(insert(User), users)
        ids = [uid for (uid,) in conn.execute(select(User.id).order_by(User.id))][-rows:]
        conn.execute(insert(user_roles), [{"user_id": uid, "role_id": roles[k]} for uid, k in zip(ids, kinds, strict=True)])
        students = [uid for uid, k in zip(ids, kinds, strict=True) if k == "student"]
        conn.execute(insert(class_members), [{"class_id": classes[n % len(classes)], "user_id": uid}
                                             for n, uid in enumerate(students)])
        links, n = [], 0
        for uid, kind in zip(ids, kinds, strict=True):
            if kind == "parent":
                for _ in range(1 if n % 5 else 2):  # 1.2 children per parent
                    links.append({"guardian_id": uid, "child_id": students[n % len(students)]})
                    n += 1
        conn.execute(insert(guardian_links), links)
        conn.execute(insert(RecoveryCode), [{"user_id": uid, "code_hash": ARGON2_HASH, "created_at": now}
                                            for uid, k in zip(ids, kinds, strict=True) if k == "teacher"
                                            for _ in range(10)])
        codes: list[dict[str, Any]] = []
        refresh: list[dict[str, Any]] = []
        access: list[dict[str, Any]] = []
        audit: list[dict[str, Any]] = []
        for uid in ids:
            family, sid = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            common = {"family_id": family, "client_id": client_id, "user_id": uid}
            codes.append({**common, "code_hash": _hex(), "redirect_uri": "https://kundolu.edu.kg/oidc/callback",
                          "scope": "openid profile offline_access", "nonce": secrets.token_urlsafe(16),
                          "code_challenge": secrets.token_urlsafe(32), "code_challenge_method": "S256",
                          "auth_time": stamp, "amr": ["pwd"], "acr": "urn:darbaza:loa:1", "sid": sid,
                          "issued_at": stamp, "expires_at": stamp + 60, "used_at": stamp})
            for used in (stamp, None):
                refresh.append({**common, "token_hash": _hex(), "scope": "openid profile offline_access", "sid": sid,
                                "auth_time": stamp, "amr": ["pwd"], "acr": "urn:darbaza:loa:1", "issued_at": stamp,
                                "expires_at": stamp + 86400 * 30, "used_at": used, "revoked_at": None})
                access.append({**common, "jti": str(uuid.uuid4()), "sid": sid, "scope": "openid profile offline_access",
                               "issued_at": stamp, "expires_at": stamp + 600, "revoked_at": None})
            audit.append({"actor": f"user:{uid}", "subject": f"user:{uid}", "action": "account:login:success",
                          "occurred_at": now, "reason": None, "ip": "10.23.145.201",
                          "request_id": secrets.token_hex(16), "details": {"amr": ["pwd"]}})
        conn.execute(insert(AuthorizationCode), codes)
        conn.execute(insert(RefreshToken), refresh)
        conn.execute(insert(AccessToken), access)
        conn.execute(insert(OutboxMessage), [{
            "created_at": now, "template": "new_device", "locale": "ky", "to_address": f"parent{i}@mail.kg",
            "subject": "Жаңы түзмөктөн кирүү", "body_text": "Саламатсызбы! " * 60, "status": "sent",
            "attempts": 1, "next_attempt_at": now, "sent_at": now + timedelta(seconds=2),
            "message_id": f"<{uuid.uuid4()}@darbaza>"} for i in range(rows // 10)])
    # The journal is a hash chain written through its own API.
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        journal = Journal()
        for event in audit:
            journal.record(session, **{k: v for k, v in event.items() if k != "occurred_at"})
        session.commit()
    engine.dispose()


def _measure(url: str) -> dict[str, dict[str, float]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    out: dict[str, dict[str, float]] = {}
    with engine.connect() as conn:
        for table in TABLES:
            conn.execute(text(f"VACUUM ANALYZE {table}"))
            rows = int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())  # noqa: S608 - our table names
            total, heap, indexes = conn.execute(text(
                "SELECT pg_total_relation_size(:t), pg_relation_size(:t), pg_indexes_size(:t)"), {"t": table}).one()
            out[table] = {"rows": rows, "total_bytes": int(total), "heap_bytes": int(heap),
                          "index_bytes": int(indexes), "bytes_per_row": round(int(total) / rows, 1) if rows else 0.0}
    engine.dispose()
    return out


def run() -> dict[str, Any]:
    from idp.migrate import upgrade

    url = os.environ.get("BENCH_DATABASE_URL", "")
    workdir: Path | None = None
    try:
        if not url.startswith("postgresql"):
            workdir = Path(tempfile.mkdtemp(prefix="darbaza-pg-"))
            workdir.chmod(0o755)  # the script runs PostgreSQL as its own user when we are root
            url = subprocess.run([str(ROOT / "scripts/pg-test.sh"), "start", str(workdir / "pg"),  # noqa: S603
                                  str(free_port())], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        upgrade(url)
        began = time.perf_counter()
        _fill(url, ROWS)
        sizes = _measure(url)
        print(f"   {ROWS:,} accounts and their tokens in {time.perf_counter() - began:.0f} s")
        print(f"   {'table':<22}{'rows':>9}{'total B':>13}{'heap B':>12}{'index B':>12}{'B/row':>9}")
        for table, row in sizes.items():
            print(f"   {table:<22}{row['rows']:>9,}{row['total_bytes']:>13,}{row['heap_bytes']:>12,}"
                  f"{row['index_bytes']:>12,}{row['bytes_per_row']:>9}")
        return {"accounts": ROWS, "tables": sizes, "mix": {"students": 0.41, "parents": 0.56, "teachers": 0.03}}
    finally:
        if workdir is not None:
            subprocess.run([str(ROOT / "scripts/pg-test.sh"), "stop", str(workdir / "pg")], check=False)  # noqa: S603
            shutil.rmtree(workdir, ignore_errors=True)
