"""Directory sync of a school of 20,000 people (issue 7): a real slapd loaded with
generated people and groups (``slapadd`` before it starts), a fresh SQLite database and a
Redis, then a full sync (time, peak memory) and, after 100 people changed, an
incremental sync (time, accounts touched: must be 100).

Everything listens on 127.0.0.1 and is stopped at the end. ``DARBAZA_BENCH_PEOPLE``
changes the size (default 20000)."""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ldap3 import MODIFY_REPLACE

PEOPLE = int(os.environ.get("DARBAZA_BENCH_PEOPLE", "20000"))
CHANGED = 100
CLASSES = 40
TEACHERS = 800
TIME_LIMIT = 900  # seconds for the whole benchmark


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ldif(path: Path, people: int) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Write the directory as LDIF; returns the person DNs and the group mappings."""
    from tests.ldap_server import BASE_DN, GROUPS_DN, PEOPLE_DN, READER_DN, READER_PASSWORD

    old = datetime(2025, 1, 1, tzinfo=UTC)
    stamp = 0

    def op_attrs() -> str:
        # Old, increasing change times (a directory filled long ago): the full sync's
        # cursor is the newest of them.
        nonlocal stamp
        stamp += 1
        moment = (old + timedelta(seconds=stamp)).strftime("%Y%m%d%H%M%SZ")
        return (f"entryUUID: {uuid.uuid4()}\ncreatorsName: cn=admin,{BASE_DN}\ncreateTimestamp: {moment}\n"
                f"modifiersName: cn=admin,{BASE_DN}\nmodifyTimestamp: {moment}\n"
                f"entryCSN: {moment[:-1]}.000000Z#000000#000#000000\n")

    chunks = [
        f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\no: Bench School\ndc: school\n{op_attrs()}",
        f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n{op_attrs()}",
        f"dn: {GROUPS_DN}\nobjectClass: organizationalUnit\nou: groups\n{op_attrs()}",
        f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: reader\n"
        f"userPassword: {READER_PASSWORD}\n{op_attrs()}",
    ]
    dns: list[str] = []
    for i in range(people):
        uid = f"p{i:05d}"
        dn = f"uid={uid},{PEOPLE_DN}"
        dns.append(dn)
        chunks.append(f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: Person {i}\nsn: {i}\n"
                      f"mail: {uid}@school.example\npreferredLanguage: {('ky', 'ru', 'en')[i % 3]}\n{op_attrs()}")
    teachers, students = dns[:min(TEACHERS, people // 10)], dns[min(TEACHERS, people // 10):]
    groups = {"teachers": teachers, "students": students}
    for c in range(CLASSES):
        groups[f"class-{c}"] = students[c::CLASSES]
    for cn, members in groups.items():
        if not members:
            continue
        lines = "".join(f"member: {m}\n" for m in members)
        chunks.append(f"dn: cn={cn},{GROUPS_DN}\nobjectClass: groupOfNames\ncn: {cn}\n{lines}{op_attrs()}")
    path.write_text("\n".join(chunks))
    roles = {"teachers": "teacher", "students": "student"}
    classes = {f"class-{c}": f"{5 + c % 7}{'ABCDEF'[c // 7]}" for c in range(CLASSES)}
    return dns, roles, classes


def run() -> dict[str, object]:
    from redis import Redis

    from connectors.ldap.config import directory_config
    from connectors.ldap.sync import SyncDeps, run_sync
    from idp.accounts.service import ensure_roles
    from idp.audit.journal import Journal
    from idp.config import Settings
    from idp.db import Database
    from idp.migrate import upgrade
    from idp.sessions.jobs import build_registry
    from tests.ldap_server import GROUPS_DN, PEOPLE_DN, READER_DN, READER_PASSWORD, Slapd

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="darbaza-bench-ldap-"))
    slapd: Slapd | None = None
    redis_proc: subprocess.Popen[bytes] | None = None
    figures: dict[str, object] = {"people": PEOPLE}
    try:
        slapd = Slapd(workdir / "slapd")
        t0 = time.monotonic()
        dns, group_roles, group_classes = _ldif(workdir / "people.ldif", PEOPLE)
        subprocess.run(  # noqa: S603 - fixed argv
            [shutil.which("slapadd") or "/usr/sbin/slapadd", "-q", "-f", str(slapd.workdir / "slapd.conf"),
             "-l", str(workdir / "people.ldif")], check=True, capture_output=True, timeout=300)
        slapd.start()
        figures["load_seconds"] = round(time.monotonic() - t0, 2)
        print(f"   directory loaded: {PEOPLE} people, {len(group_roles) + len(group_classes)} groups "
              f"in {figures['load_seconds']} s (slapadd)", flush=True)

        redis_port = _free_port()
        redis_proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(redis_port),
             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        redis = Redis(host="127.0.0.1", port=redis_port, socket_timeout=10)
        deadline = time.time() + 10
        while True:
            try:
                redis.ping()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

        db_url = f"sqlite:///{workdir / 'darbaza.sqlite3'}"
        upgrade(db_url)
        settings = Settings.from_env(
            environ={}, database_url=db_url, redis_url=f"redis://127.0.0.1:{redis_port}/0",
            secret_key=secrets.token_hex(32), issuer="http://127.0.0.1:9",
            ldap_urls=[slapd.url], ldap_bind_dn=READER_DN, ldap_bind_password=READER_PASSWORD,
            ldap_user_base=PEOPLE_DN, ldap_group_base=GROUPS_DN,
            ldap_group_roles=group_roles, ldap_group_classes=group_classes,
        )
        database = Database(db_url, pool_size=2)
        with database.factory() as db:
            ensure_roles(db)
            db.commit()
        deps = SyncDeps(factory=database.factory, redis=redis, journal=Journal(),
                        sessions=build_registry(settings, database, redis))
        config = directory_config(settings)

        rss_before = _rss_mb()
        t0 = time.monotonic()
        full = run_sync(config, deps, full=True, trigger="cli")
        full_seconds = time.monotonic() - t0
        assert full.status == "completed", full.message
        figures.update({
            "full_seconds": round(full_seconds, 2), "full_created": full.created, "full_errors": full.error_count,
            "full_per_second": round(full.created / full_seconds, 1) if full_seconds else None,
            "max_rss_mb_before": round(rss_before, 1), "max_rss_mb_after_full": round(_rss_mb(), 1),
        })
        print(f"   full sync: {full.created} created, {full.error_count} errors in {full_seconds:.1f} s "
              f"({figures['full_per_second']}/s); peak RSS {rss_before:.0f} -> {_rss_mb():.0f} MB", flush=True)
        if time.monotonic() - started > TIME_LIMIT:
            raise TimeoutError("the benchmark ran past its time limit")

        time.sleep(1.1)  # a new second: modifyTimestamp has a resolution of one second
        changed = dns[:: max(1, len(dns) // CHANGED)][:CHANGED]
        with slapd.admin() as conn:
            for dn in changed:
                conn.modify(dn, {"cn": [(MODIFY_REPLACE, [f"Renamed {dn.split(',')[0][4:]}"])]})
        t0 = time.monotonic()
        incremental = run_sync(config, deps, full=False, trigger="cli")
        inc_seconds = time.monotonic() - t0
        assert incremental.status == "completed", incremental.message
        figures.update({
            "incremental_seconds": round(inc_seconds, 2), "incremental_touched": incremental.touched,
            "incremental_entries_read": incremental.entries_seen, "changed_in_directory": len(changed),
            "max_rss_mb_end": round(_rss_mb(), 1),
        })
        print(f"   incremental sync after {len(changed)} changes: {incremental.touched} account(s) touched, "
              f"{incremental.entries_seen} entries read, in {inc_seconds:.2f} s", flush=True)
        if incremental.touched != len(changed):
            print(f"   WARNING: expected {len(changed)} accounts touched", file=sys.stderr)
        database.dispose()
        redis.close()
    finally:
        if slapd is not None:
            slapd.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


if __name__ == "__main__":
    print(run())
