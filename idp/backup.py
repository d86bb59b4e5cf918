"""``darbaza backup`` and ``darbaza restore`` (issue 9; README "Backup and restore").

A backup is one file plus a manifest beside it (``<file>.manifest.json``: format,
backend, schema revision, Darbaza version, time, size and SHA-256 of the file).

- SQLite: the sqlite3 online backup API copies the database page by page into a new
  file in one read transaction: a consistent snapshot while servers keep writing (the
  database is in WAL mode, so writers are not blocked). Restore copies the file back the same way
  into the configured database, under SQLite's locks.
- PostgreSQL: ``pg_dump --format=custom`` of IDP_DATABASE_URL (a consistent snapshot,
  taken without stopping writers); restore is ``pg_restore --clean --if-exists
  --no-owner --single-transaction`` (all or nothing). The tools come from the PATH or
  the newest /usr/lib/postgresql/*/bin; the password goes to them in PGPASSWORD, never on
  the command line.

After a restore the schema is brought to this version's head (an older backup gets the
newer migrations) and the result is checked: accounts, signing keys (each must open
with the configured IDP_SECRET_KEY / IDP_DATA_KEY: the backup holds them sealed under
that key, which is not in the backup), sealed TOTP seeds, and the audit chain.

What is not in a backup: Redis (sessions, throttles, pending sign-ins, metrics
counters). A restore empties Darbaza's Redis database, which signs everyone out: a
session from after the backup could otherwise name an account id that the restored
database gives to somebody else."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from glob import glob
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

FORMAT = 1


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and what to do."""


@dataclass
class Manifest:
    format: int
    backend: str
    schema_revision: str | None
    darbaza_version: str
    created_at: str
    file: str
    size: int
    sha256: str

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackupError(f"{path} is not a Darbaza backup manifest: {exc}") from exc


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + ".manifest.json")


def backend_of(database_url: str) -> str:
    name = make_url(database_url).get_backend_name()
    if name not in ("sqlite", "postgresql"):
        raise BackupError(f"backups support SQLite and PostgreSQL, not {name}")
    return name


def sqlite_file(database_url: str) -> Path:
    database = make_url(database_url).database
    if not database or database == ":memory:":
        raise BackupError("IDP_DATABASE_URL names no SQLite file")
    return Path(database)


def libpq(database_url: str) -> tuple[str, dict[str, str]]:
    """The libpq connection string for pg_dump/pg_restore, and the environment holding the
    password (kept off the command line, where other users could read it)."""
    url: URL = make_url(database_url)
    env = {}
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    plain = url.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    if candidates:
        return candidates[-1]
    raise BackupError(f"{name} was not found: install the PostgreSQL client tools (Debian: postgresql-client), "
                      "the same major version as the server or newer")


def _run(args: list[str], env: dict[str, str]) -> None:
    try:
        done = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, check=False)  # noqa: S603
    except OSError as exc:
        raise BackupError(f"{Path(args[0]).name} could not run: {exc}") from exc
    if done.returncode != 0:
        raise BackupError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def schema_revision(database_url: str) -> str | None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("darbaza")
    except metadata.PackageNotFoundError:
        return "unknown"


# --- backup ---------------------------------------------------------------------------------
def create_backup(database_url: str, out: Path) -> Manifest:
    """Write the backup to ``out`` (refusing to overwrite) and its manifest beside it."""
    backend = backend_of(database_url)
    if out.exists() or manifest_path(out).exists():
        raise BackupError(f"{out} already exists; choose a new file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    revision = schema_revision(database_url)
    try:
        if backend == "sqlite":
            source_path = sqlite_file(database_url)
            if not source_path.exists():
                raise BackupError(f"the database {source_path} does not exist")
            source = sqlite3.connect(source_path, timeout=30)
            target = sqlite3.connect(partial)
            try:
                with target:
                    # One step: a read transaction on the source, i.e. one consistent
                    # snapshot (in WAL mode writers go on meanwhile; in steps, every write
                    # would restart the copy).
                    source.backup(target)
                # A self-contained file: no -wal beside it to lose.
                target.execute("PRAGMA journal_mode=DELETE")
            finally:
                target.close()
                source.close()
        else:
            dsn, env = libpq(database_url)
            _run([pg_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(partial), "--dbname", dsn], env)
        os.chmod(partial, 0o600)  # personal data and sealed secrets
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    manifest = Manifest(format=FORMAT, backend=backend, schema_revision=revision, darbaza_version=_version(),
                        created_at=datetime.now(UTC).isoformat(timespec="seconds"), file=out.name,
                        size=out.stat().st_size, sha256=sha256_of(out))
    path = manifest_path(out)
    path.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    os.chmod(path, 0o600)
    return manifest


# --- restore --------------------------------------------------------------------------------
def check_backup(backup: Path, database_url: str) -> Manifest | None:
    """The manifest, once the file matches it (size, SHA-256, backend); None without one."""
    if not backup.is_file():
        raise BackupError(f"{backup} is not a file")
    path = manifest_path(backup)
    if not path.exists():
        return None
    manifest = Manifest.load(path)
    if manifest.format > FORMAT:
        raise BackupError(f"{backup} was made by a newer Darbaza (backup format {manifest.format})")
    if manifest.backend != backend_of(database_url):
        raise BackupError(f"{backup} is a {manifest.backend} backup; IDP_DATABASE_URL is {backend_of(database_url)}")
    if backup.stat().st_size != manifest.size or sha256_of(backup) != manifest.sha256:
        raise BackupError(f"{backup} does not match its manifest (SHA-256 differs): damaged or changed")
    return manifest


def database_is_empty(database_url: str) -> bool:
    """No accounts and no journal: nothing a restore would destroy."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            for table in ("users", "audit_events", "clients"):
                if table in names and conn.execute(text(f"SELECT 1 FROM {table} LIMIT 1")).first():  # noqa: S608 - fixed names
                    return False
            return True
    except SQLAlchemyError:
        return True  # no database yet (a new PostgreSQL database, a missing SQLite file)
    finally:
        engine.dispose()


def restore_backup(database_url: str, backup: Path) -> None:
    """Replace the database's content with the backup's (no checks: see ``check_backup``)."""
    if backend_of(database_url) == "sqlite":
        target_path = sqlite_file(database_url)
        target_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            source = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
            problem = source.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{backup} is not a SQLite database: {exc}") from exc
        if not problem or problem[0] != "ok":
            source.close()
            raise BackupError(f"{backup} is damaged: {problem}")
        target = sqlite3.connect(target_path, timeout=30)
        try:
            with target:
                source.backup(target)
        finally:
            target.close()
            source.close()
        return
    dsn, env = libpq(database_url)
    _run([pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--no-privileges",
          "--single-transaction", "--exit-on-error", "--dbname", dsn, str(backup)], env)


@dataclass
class Summary:
    accounts: int = 0
    signing_keys: int = 0
    signing_keys_open: int = 0
    totp_seeds: int = 0
    totp_seeds_open: int = 0
    audit_events: int = 0
    audit_ok: bool = False
    audit_problem: str | None = None
    schema_revision: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [
            f"schema revision: {self.schema_revision}",
            f"accounts: {self.accounts}",
            f"signing keys: {self.signing_keys} ({self.signing_keys_open} open with the configured key)",
            f"TOTP seeds: {self.totp_seeds} ({self.totp_seeds_open} open with the configured key)",
            f"audit events: {self.audit_events}",
            "audit journal: intact" if self.audit_ok else f"audit journal: NOT intact: {self.audit_problem}",
            *(f"problem: {p}" for p in self.problems),
        ]


def _opening(box: Any, sealed_values: Any) -> tuple[int, int]:
    """(how many sealed values, how many of them ``box`` opens)."""
    total = opened = 0
    for sealed in sealed_values:
        total += 1
        try:
            box.open(sealed)
            opened += 1
        except ValueError:
            pass
    return total, opened


def verify_database(session_factory: Any, settings: Any, journal: Any) -> Summary:
    """What a restore is checked with (also usable on a live database)."""
    from idp.accounts.models import User
    from idp.audit.models import AuditEvent
    from idp.crypto import SecretBox
    from idp.oidc.models import SigningKey

    key_material = settings.data_key or settings.secret_key
    summary = Summary(schema_revision=schema_revision(settings.database_url))
    with session_factory() as db:
        summary.accounts = db.scalar(select(func.count(User.id))) or 0
        summary.audit_events = db.scalar(select(func.count(AuditEvent.id))) or 0
        summary.signing_keys, summary.signing_keys_open = _opening(
            SecretBox(key_material, "signing-keys"), db.scalars(select(SigningKey.private_key_encrypted)))
        summary.totp_seeds, summary.totp_seeds_open = _opening(
            SecretBox(key_material, "totp-seeds"),
            db.scalars(select(User.totp_secret_encrypted).where(User.totp_secret_encrypted.is_not(None))))
        result = journal.verify(db)
    summary.audit_ok, summary.audit_problem = result.ok, result.problem
    if summary.signing_keys == 0:
        summary.problems.append("no signing key")
    if summary.signing_keys_open < summary.signing_keys or summary.totp_seeds_open < summary.totp_seeds:
        summary.problems.append("sealed secrets do not open: IDP_SECRET_KEY (and IDP_DATA_KEY) must be the ones "
                                "the backup was made with")
    if not result.ok:
        summary.problems.append(f"audit journal: {result.problem}")
    return summary
