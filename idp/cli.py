"""The ``darbaza`` command line: database, accounts, clients, keys, demo data, server."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click
from flask import Flask
from flask.cli import FlaskGroup, with_appcontext
from sqlalchemy import select

from idp.accounts import password_policy
from idp.accounts.models import SchoolClass, User
from idp.accounts.service import AccountError, create_user, ensure_roles
from idp.oidc.clients import ClientError, create_client
from idp.services import services


def _cli_actor() -> str:
    import getpass

    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def _create_app() -> Flask:
    from idp.app import create_app

    return create_app()


@click.group(cls=FlaskGroup, create_app=_create_app, add_default_commands=False, add_version_option=False)
def main() -> None:
    """Darbaza: the school portal's sign-in service."""


# --- db --------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@with_appcontext
def db_upgrade() -> None:
    """Apply migrations, seed the roles and make sure a signing key exists."""
    from idp.migrate import upgrade

    svc = services()
    upgrade(svc.settings.database_url)
    with svc.db.transaction() as session:
        ensure_roles(session)
        svc.keys.ensure_key(session)
    click.echo("database is up to date")


# --- users -------------------------------------------------------------------------
@main.group()
def users() -> None:
    """Accounts."""


@users.command("create")
@click.argument("login")
@click.option("--name", "display_name", required=True, help="Display name, e.g. 'Aigerim Tokonova'.")
@click.option("--role", "roles", multiple=True, help="Role name; repeat for several.")
@click.option("--email", default=None)
@click.option("--locale", type=click.Choice(["ky", "ru", "en"]), default=None)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@with_appcontext
def users_create(
    login: str, display_name: str, roles: tuple[str, ...], email: str | None, locale: str | None, password_stdin: bool
) -> None:
    """Create an account. Without --password-stdin a random password is generated and printed once."""
    svc = services()
    password = sys.stdin.readline().rstrip("\n") if password_stdin else secrets.token_urlsafe(15)
    try:
        with svc.db.transaction() as session:
            user = create_user(
                session,
                svc.passwords,
                login=login,
                display_name=display_name,
                password=password,
                roles=list(roles),
                email=email,
                locale=locale,
            )
            subject = user.subject
            login = user.login
            svc.journal.record(session, actor=_cli_actor(), action="account:create", subject=f"user:{user.id}",
                               details={"login": user.login, "roles": list(roles)})
    except AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created {login} (sub {subject})")
    if not password_stdin:
        click.echo(f"password: {password}")


def _account(session: Any, login: str) -> User:
    """The account with this login, or the command stops with a clear message."""
    from idp.accounts.service import normalise_login

    user = session.scalar(select(User).where(User.login == normalise_login(login)))
    if user is None:
        raise click.ClickException(f"no account with the login {login}")
    return user


@users.command("export")
@click.argument("login")
@click.option("--reason", required=True, help="Whose request this is and how it was made (kept in the audit journal).")
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True, path_type=Path), default=None,
              help="Write the JSON here (created with mode 0600) instead of printing it.")
@with_appcontext
def users_export(login: str, reason: str, out: Path | None) -> None:
    """Export a person's personal data as JSON, for their request (README, "Personal data").
    Journalled privacy:export:admin with the reason."""
    from idp.privacy import export_personal_data

    if not reason.strip():
        raise click.ClickException("give a reason: whose request this is and how it was made")
    svc = services()
    with svc.db.transaction() as session:
        user = _account(session, login)
        document = export_personal_data(session, user, sessions=svc.sessions.list(user.id))
        svc.journal.record(session, actor=_cli_actor(), action="privacy:export:admin", subject=f"user:{user.id}",
                           reason=reason.strip(), details={"format": document["format"], "via": "cli"})
    text = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    click.echo(f"wrote the personal data of {document['account']['login']} to {out}", err=True)


@users.command("reset-2fa")
@click.argument("login")
@click.option("--reason", required=True, help="Who asked and how you made sure it is them (kept in the audit journal).")
@with_appcontext
def users_reset_2fa(login: str, reason: str) -> None:
    """Remove a person's authenticator app, recovery codes and passkeys and end their
    sessions; they enrol again at the next sign-in. For the accounts nobody in the
    console may reset (those that hold permissions no other account holds, such as the
    security officer's). Journalled mfa:totp:reset with the operator as actor."""
    from idp.access.permissions import PERMISSIONS
    from idp.accounts.admin import AccountAdmin, Actor

    if not reason.strip():
        raise click.ClickException("give a reason: who asked and how you made sure it is them")
    svc = services()
    with svc.db.transaction() as session:
        user = _account(session, login)
        admin = AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions,
                             login_throttle=svc.login_account_throttle, two_factor=svc.two_factor)
        try:
            ended = admin.reset_two_factor(Actor(ref=_cli_actor(), permissions=set(PERMISSIONS)), user, reason)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"two-factor sign-in of {user.login} was reset; sessions ended: {ended}")


# --- roster ------------------------------------------------------------------------
@main.group()
def roster() -> None:
    """CSV roster import (format: README, "Roster import")."""


def _write_codes(path: str, lines: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("".join(line + "\n" for line in lines))


@roster.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True,
              help="Only report what would be created, updated and disabled, and the bad lines.")
@click.option("--codes-out", type=click.Path(dir_okay=False), default=None,
              help="Write the activation codes of new accounts to this file (mode 0600) instead of printing them.")
@click.option("--allow-mass-disable", is_flag=True,
              help="Apply even when more than half of the roster accounts (and more than 10) would be disabled.")
@with_appcontext
def roster_import(file: str, dry_run: bool, codes_out: str | None, allow_mass_disable: bool) -> None:
    """Import accounts from a roster CSV file. Roster accounts missing from the file are
    disabled. Exit status: 0 done, 1 bad lines (nothing changed), 2 the file cannot be
    read, 3 a mass disable was refused (nothing changed; see --allow-mass-disable)."""
    from connectors.roster.applier import ROSTER_ACTOR, MassDisableRefused, RosterRejected, apply
    from connectors.roster.parser import RosterFileError, parse
    from connectors.roster.planner import plan
    from idp.access.permissions import PERMISSIONS
    from idp.accounts.admin import AccountAdmin, Actor

    try:
        parsed = parse(Path(file).read_bytes())
    except (OSError, RosterFileError) as exc:
        click.echo(f"cannot read {file}: {exc}", err=True)
        sys.exit(2)
    svc = services()

    def report_errors(errors: list) -> None:  # type: ignore[type-arg]
        for error in errors:
            click.echo(f"line {error.line}: {error.reason}", err=True)

    if dry_run:
        with svc.db.transaction() as session:
            planned = plan(session, parsed)
            for row in planned.create:
                click.echo(f"create {row.login}")
            for item in planned.update:
                click.echo(f"update {item.row.login}: " + ", ".join(sorted(item.changes)))
            for row in planned.enable:
                click.echo(f"re-enable {row.login}")
            for gone in planned.disable:
                click.echo(f"disable {gone.login}")
            for name in planned.new_classes:
                click.echo(f"create class {name}")
            session.rollback()
        click.echo(f"would create {len(planned.create)}, update {len(planned.update)}, disable {len(planned.disable)}, "
                   f"unchanged {planned.unchanged}, re-enable {len(planned.enable)}, bad lines {len(planned.errors)}")
        if planned.mass_disable:
            click.echo(f"warning: this would disable {len(planned.disable)} of {planned.roster_active} roster "
                       "accounts; applying it needs --allow-mass-disable", err=True)
        report_errors(planned.errors)
        sys.exit(1 if planned.errors else 0)
    actor = Actor(ref=ROSTER_ACTOR, permissions=set(PERMISSIONS))
    try:
        with svc.db.transaction() as session:
            admin = AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)
            result = apply(admin, actor, parsed, allow_mass_disable=allow_mass_disable)
    except RosterRejected as exc:
        report_errors(exc.errors)
        click.echo("nothing was changed", err=True)
        sys.exit(1)
    except MassDisableRefused as exc:
        click.echo(f"refused: {exc}", err=True)
        click.echo("nothing was changed; check the file, or run again with --allow-mass-disable", err=True)
        sys.exit(3)
    click.echo(f"created {result.created}, updated {result.updated}, disabled {result.disabled}, "
               f"unchanged {result.unchanged}, re-enabled {result.enabled}")
    for login in result.disabled_logins:
        click.echo(f"disabled {login}")
    lines = [f"{c.login}\t{c.code}\t{c.expires_at:%Y-%m-%d %H:%M} UTC" for c in result.codes]
    if codes_out:
        _write_codes(codes_out, lines)
        click.echo(f"{len(lines)} activation code(s) written to {codes_out}")
    else:
        for line in lines:
            click.echo(line)


# --- directory ---------------------------------------------------------------------
@main.group()
def directory() -> None:
    """The school directory (LDAP): synchronisation (README, "School directory")."""


def _directory_failed(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@directory.command("sync")
@click.option("--dry-run", is_flag=True, help="Compute and report everything, change no account (the run is recorded).")
@click.option("--full", is_flag=True, help="Read every person (and disable accounts gone from the directory) "
                                           "instead of only what changed since the last run.")
@with_appcontext
def directory_sync(dry_run: bool, full: bool) -> None:
    """Synchronise accounts with the directory. Exit status 0 when the run completed, 1 when
    it failed or could not start."""
    from connectors.ldap.config import directory_config
    from connectors.ldap.sync import SyncDeps, SyncRefused, run_sync
    from idp.config import SettingsError

    svc = services()
    try:
        config = directory_config(svc.settings)
    except SettingsError as exc:
        _directory_failed(str(exc))
    deps = SyncDeps(factory=svc.db.factory, redis=svc.redis, journal=svc.journal, sessions=svc.sessions)
    bars: list[Any] = []

    def on_total(total: int) -> None:
        # Shown once the run has started (the number of people to read is known).
        bar = click.progressbar(length=max(total, 1), label="entries", file=sys.stderr, show_pos=True)
        bar.__enter__()
        bars.append(bar)

    def on_progress(count: int) -> None:
        if bars:
            bar = bars[0]
            if bar.pos + count > bar.length:
                bar.length = bar.pos + count
            bar.update(count)

    try:
        summary = run_sync(config, deps, full=full, trigger="cli", dry_run=dry_run,
                           on_total=on_total, on_progress=on_progress)
    except SyncRefused as exc:
        _directory_failed(str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. the database or Redis went away: a message, not a traceback
        logging.getLogger("darbaza.directory").exception("directory sync failed")
        _directory_failed(f"the sync failed: {type(exc).__name__}: {exc}")
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
    what = "dry run" if dry_run else "sync"
    resumed = f", resuming run {summary.resumed_from}" if summary.resumed_from else ""
    click.echo(f"{summary.mode} {what} {summary.id}{resumed}: {summary.status}")
    verb = "would be " if dry_run else ""
    click.echo(f"created {summary.created}, updated {summary.updated}, disabled {summary.disabled}, "
               f"unchanged {summary.unchanged}, errors {summary.error_count}"
               + (f" ({verb}nothing written)" if dry_run else ""))
    for error in summary.errors[:50]:
        click.echo(f"error: {error['dn']}: {error['reason']}")
    if summary.error_count > 50:
        click.echo(f"... and {summary.error_count - 50} more error(s): see the run in the console")
    if summary.status != "completed":
        _directory_failed(f"the run failed: {summary.message}; the next run resumes it")


@directory.command("runs")
@click.option("--limit", default=10, type=click.IntRange(1, 1000))
@with_appcontext
def directory_runs(limit: int) -> None:
    """The last synchronisation runs, newest first."""
    from connectors.ldap.models import DirectorySyncRun

    svc = services()
    rows = svc.db.session.scalars(select(DirectorySyncRun).order_by(DirectorySyncRun.id.desc()).limit(limit))
    for run in rows:
        click.echo(f"{run.id:>5} {run.started_at:%Y-%m-%d %H:%M:%S} {run.mode:11} {run.trigger:7} "
                   f"{'dry-run ' if run.dry_run else ''}{run.status:9} created {run.created}, updated {run.updated}, "
                   f"disabled {run.disabled}, unchanged {run.unchanged}, errors {run.error_count}"
                   + (f" - {run.message}" if run.message else ""))


# --- clients -----------------------------------------------------------------------
@main.group()
def clients() -> None:
    """Portal apps (OAuth clients)."""


@clients.command("create")
@click.argument("name")
@click.option("--redirect-uri", "redirect_uris", multiple=True, help="Exact redirect URI; repeat for several.")
@click.option("--post-logout-redirect-uri", "post_logout", multiple=True)
@click.option("--grant", "grants", multiple=True, help="authorization_code, refresh_token, client_credentials.")
@click.option("--scope", "scopes", multiple=True)
@click.option("--public", is_flag=True, help="A public client (no secret; PKCE only).")
@click.option("--trusted", is_flag=True, help="First-party app: skip the consent page.")
@click.option("--client-id", default=None)
@click.option("--backchannel-logout-uri", default=None,
              help="Where logout tokens are POSTed when a session that used the app ends.")
@click.option("--backchannel-logout-session-required/--no-backchannel-logout-session-required", default=True,
              help="Logout tokens carry the session id (sid); on by default.")
@with_appcontext
def clients_create(
    name: str,
    redirect_uris: tuple[str, ...],
    post_logout: tuple[str, ...],
    grants: tuple[str, ...],
    scopes: tuple[str, ...],
    public: bool,
    trusted: bool,
    client_id: str | None,
    backchannel_logout_uri: str | None,
    backchannel_logout_session_required: bool,
) -> None:
    """Register a portal app; prints its client id and (once) its secret as JSON."""
    svc = services()
    try:
        with svc.db.transaction() as session:
            client, secret = create_client(
                session,
                name=name,
                redirect_uris=list(redirect_uris),
                post_logout_redirect_uris=list(post_logout),
                grant_types=list(grants) or None,
                scopes=list(scopes) or None,
                auth_method="none" if public else "client_secret_basic",
                trusted=trusted,
                client_id=client_id,
                backchannel_logout_uri=backchannel_logout_uri,
                backchannel_logout_session_required=backchannel_logout_session_required,
            )
            out = {"client_id": client.client_id, "client_secret": secret}
            svc.journal.record(session, actor=_cli_actor(), action="client:create", subject=f"client:{client.client_id}",
                               details={"name": client.name, "redirect_uris": client.redirect_uris,
                                        "backchannel_logout_uri": client.backchannel_logout_uri})
    except ClientError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(out))


# --- keys --------------------------------------------------------------------------
@main.group()
def keys() -> None:
    """Signing keys."""


@keys.command("rotate")
@with_appcontext
def keys_rotate() -> None:
    """Start signing with new keys; the old ones stay in JWKS until their tokens expire."""
    svc = services()
    with svc.db.transaction() as session:
        rows = svc.keys.rotate(session)
        kids = {row.alg: row.kid for row in rows}
        svc.journal.record(session, actor=_cli_actor(), action="key:rotate",
                           details={"kid": kids["RS256"], "kids": kids})
    for alg, kid in kids.items():  # the RS256 key (ID tokens) last
        if alg != "RS256":
            click.echo(f"new {alg} signing key {kid}")
    click.echo(f"new signing key {kids['RS256']}")


# --- demo --------------------------------------------------------------------------
DEMO_PEOPLE = [
    ("aibek.student", "Айбек Асанов", ["student"], "ky"),
    ("aigerim.student", "Айгерим Токтогулова", ["student"], "ky"),
    ("daniyar.student", "Данияр Осмонов", ["student"], "ru"),
    ("nurgul.teacher", "Нургүл Сатыбалдиева", ["teacher"], "ky"),
    ("sergey.teacher", "Сергей Ким", ["teacher"], "ru"),
    ("gulnara.parent", "Гулнара Асанова", ["parent"], "ky"),
    ("bakyt.staff", "Бакыт Жумабеков", ["staff"], "ky"),
    ("support", "Техникалык колдоо", ["tech_support"], "ky"),
    ("security", "Маалыматтык коопсуздук", ["security_officer"], "ky"),
    ("admin", "Мектеп администратору", ["school_admin"], "ky"),
]


def _passphrase() -> str:
    # No school context words (IDP_PASSWORD_CONTEXT_WORDS): the demo follows its own policy.
    words = ["alma", "too", "jyldyz", "kitep", "kol", "shamal", "bulut", "sabak", "nan", "ala-too", "kar", "suu"]
    return "-".join(secrets.choice(words) for _ in range(4)) + "-" + str(secrets.randbelow(90) + 10)


@main.group()
def demo() -> None:
    """The demo school."""


@demo.command("seed")
@click.option("--out", "out_dir", default="var", help="Where to keep the demo logins and client secret.")
@click.option("--demo-app-url", default="http://127.0.0.1:8001")
@with_appcontext
def demo_seed(out_dir: str, demo_app_url: str) -> None:
    """Seed a demo school (people and two portal apps) once; print the demo logins every time."""
    svc = services()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logins_file = out / "demo-logins.txt"
    client_file = out / "demo-client.json"
    with svc.db.transaction() as session:
        ensure_roles(session)
        svc.keys.ensure_key(session)
        seeded = session.scalar(select(User.id).where(User.login == "admin")) is not None
        if not seeded:
            lines = []
            people = {}
            context = password_policy.context_words_from(svc.settings.password_context_words, svc.settings.school_name)
            for login, name, roles, locale in DEMO_PEOPLE:
                # The demo's own passwords pass the school's password policy.
                password = _passphrase()
                while password_policy.check_password(
                    password, min_length=15, login=login, names=[name], context_words=context, blocklist=svc.blocklist
                ):
                    password = _passphrase()
                person = create_user(
                    session, svc.passwords, login=login, display_name=name, password=password, roles=roles,
                    locale=locale, email=f"{login}@school.example.org",
                )
                # As for a real school: the address is known to be the person's. Staff
                # accounts treat the printed password as an initial one, changed at the
                # first sign-in (6.4.1) before 2FA enrolment and the obligation; pupils
                # and the parent keep theirs, so the demo app and OIDC test clients can
                # sign in with a printed login at once.
                person.email_verified_at = person.created_at
                person.must_change_password = person.requires_2fa
                people[login] = person
                lines.append(f"{login:18} {password:40} {', '.join(roles)}")
            seventh, ninth = (
                session.scalar(select(SchoolClass).where(SchoolClass.name == name)) or SchoolClass(name=name)
                for name in ("7A", "9B")
            )
            session.add_all([seventh, ninth])
            people["aibek.student"].classes = [seventh]
            people["aigerim.student"].classes = [seventh]
            people["daniyar.student"].classes = [ninth]
            people["gulnara.parent"].children = [people["aibek.student"]]
            client, secret = create_client(
                session,
                name="Demo portal (e-journal)",
                client_id="demo-portal",
                redirect_uris=[demo_app_url + "/callback"],
                post_logout_redirect_uris=[demo_app_url + "/"],
                grant_types=["authorization_code", "refresh_token"],
                scopes=["openid", "profile", "email", "roles", "school", "offline_access"],
            )
            library, _ = create_client(
                session,
                name="School library",
                client_id="school-library",
                redirect_uris=["http://127.0.0.1:8002/callback"],
                post_logout_redirect_uris=["http://127.0.0.1:8002/"],
                grant_types=["authorization_code", "refresh_token"],
                scopes=["openid", "profile", "roles"],
                auth_method="none",
                trusted=True,
            )
            fd = os.open(logins_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
            fd = os.open(client_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"client_id": client.client_id, "client_secret": secret, "issuer": svc.settings.issuer}, fh)
    click.echo("Demo school logins (login, password, roles). Pupils and the parent sign in with these")
    click.echo("at once; staff choose a new password at the first sign-in, set up an authenticator app")
    click.echo("and accept the confidentiality obligation. Mail goes to the local SMTP sink.")
    if logins_file.exists():
        click.echo(logins_file.read_text(encoding="utf-8"))
    else:
        click.echo(f"(the demo was seeded elsewhere; {logins_file} is missing)")


# --- audit -------------------------------------------------------------------------
@main.group()
def audit() -> None:
    """The audit journal."""


@audit.command("verify")
@with_appcontext
def audit_verify() -> None:
    """Check the hash chain; name the first edited, missing or reordered row."""
    svc = services()
    session = svc.db.factory()
    try:
        result = svc.journal.verify(session)
    finally:
        session.close()
    if not result.ok:
        click.echo(f"audit journal is NOT intact: {result.problem} (after {result.checked} good rows)")
        sys.exit(1)
    click.echo(f"audit journal is intact: {result.checked} rows")


# --- backup and restore ----------------------------------------------------------------
@main.command("backup")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@with_appcontext
def backup_command(out: Path) -> None:
    """Back up the database to OUT while the servers run (SQLite: online backup; PostgreSQL:
    pg_dump --format=custom), with OUT.manifest.json beside it. The secret key is not in
    it: keep IDP_SECRET_KEY (and IDP_DATA_KEY) safe separately."""
    from idp.backup import BackupError, create_backup

    svc = services()
    try:
        manifest = create_backup(svc.settings.database_url, out)
    except BackupError as exc:
        _bad_input(str(exc))
    with svc.db.transaction() as session:
        svc.journal.record(session, actor=_cli_actor(), action="data:backup:create",
                           details={"file": manifest.file, "backend": manifest.backend, "size": manifest.size,
                                    "sha256": manifest.sha256, "schema_revision": manifest.schema_revision})
    click.echo(f"backup written: {out} ({manifest.size} bytes, {manifest.backend}, "
               f"schema {manifest.schema_revision})")
    click.echo(f"sha256 {manifest.sha256}; manifest {out}.manifest.json")


@main.command("restore")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Replace the content of a database that is not empty.")
@with_appcontext
def restore_command(file: Path, yes: bool) -> None:
    """Replace the database's content with the backup FILE, bring its schema up to date and
    check it (accounts, signing keys, audit chain). Stop the servers and the worker first.
    Everyone is signed out (Darbaza's Redis database is emptied)."""
    from redis.exceptions import RedisError

    from idp.backup import (
        BackupError,
        check_backup,
        database_is_empty,
        restore_backup,
        verify_database,
    )
    from idp.migrate import upgrade

    svc = services()
    url = svc.settings.database_url
    try:
        manifest = check_backup(file, url)
        if manifest is None:
            click.echo(f"warning: no {file.name}.manifest.json beside the backup: its integrity is not checked",
                       err=True)
        if not yes and not database_is_empty(url):
            _bad_input("the database is not empty: restoring replaces everything in it "
                       "(make a backup of it first); run again with --yes")
        svc.db.remove()
        svc.db.dispose()
        restore_backup(url, file)
    except BackupError as exc:
        _bad_input(str(exc))
    svc.db.dispose()
    upgrade(url)  # an older backup reaches this version's schema
    with svc.db.transaction() as session:
        ensure_roles(session)
    signed_out = True
    try:
        svc.redis.flushdb()  # sessions, pending sign-ins, throttles: none may outlive the restore
    except RedisError as exc:
        signed_out = False
        click.echo(f"warning: Redis could not be emptied ({exc.__class__.__name__}): empty it (FLUSHDB on "
                   "IDP_REDIS_URL's database) before starting the servers, or old sessions stay valid", err=True)
    summary = verify_database(svc.db.factory, svc.settings, svc.journal)
    with svc.db.transaction() as session:
        svc.journal.record(session, actor=_cli_actor(), action="data:backup:restore", details={
            "file": file.name, "sha256": manifest.sha256 if manifest else None,
            "created_at": manifest.created_at if manifest else None,
            "schema_revision_of_backup": manifest.schema_revision if manifest else None,
            "schema_revision": summary.schema_revision, "accounts": summary.accounts,
            "signing_keys": summary.signing_keys, "audit_events": summary.audit_events,
            "audit_ok": summary.audit_ok, "problems": summary.problems, "sessions_ended": signed_out,
        })
    click.echo(f"restored {file}" + (f" (made {manifest.created_at})" if manifest else ""))
    for line in summary.lines():
        click.echo(line)
    click.echo("everyone is signed out" if signed_out else "sessions were NOT ended (see the warning)")
    if not summary.ok:
        sys.exit(1)
    if not signed_out:
        sys.exit(3)


# --- access ------------------------------------------------------------------------
@main.group()
def access() -> None:
    """Restrictions and the access decision."""


@access.command("explain")
@click.argument("login")
@click.option("--app", "client_id", default=None, help="The portal app (client id); without it, the sign-in only.")
@click.option("--at", "at", default=None, help="ISO time, e.g. 2025-09-01T08:30 (Asia/Bishkek unless an offset is given).")
@click.option("--ip", default=None, help="The person's IP address; without it network rules are not checked.")
@click.option("--scope", "scopes", multiple=True, help="A scope asked for; repeat for several (default: the app's).")
@with_appcontext
def access_explain(login: str, client_id: str | None, at: str | None, ip: str | None, scopes: tuple[str, ...]) -> None:
    """Why can (not) LOGIN sign in (to an app) now or then: the same reasons the person and
    the app get. Exit code 0 allowed, 1 refused, 2 bad input."""
    from flask_babel import force_locale

    from idp.access.decision import SCHOOL_TZ
    from idp.access.messages import reason_message
    from idp.access.networks import parse_ip
    from idp.access.restrictions import explain, find_account, find_client, parse_moment
    from idp.oidc.claims import SCOPES_SUPPORTED

    svc = services()
    db = svc.db.session

    def bad(message: str) -> None:
        click.echo(f"error: {message}", err=True)
        sys.exit(2)

    user = find_account(db, login)
    if user is None:
        bad(f"no account has the login {login!r}")
    client = None
    if client_id:
        client = find_client(db, client_id)
        if client is None:
            bad(f"no portal app has the client id {client_id!r}")
    try:
        moment = parse_moment(at, svc.clock())
    except ValueError:
        bad(f"--at {at!r} is not an ISO time such as 2025-09-01T08:30")
    if ip is not None and parse_ip(ip) is None:
        bad(f"--ip {ip!r} is not an IP address")
    unknown = [s for s in scopes if s not in SCOPES_SUPPORTED]
    if unknown:
        bad(f"unknown scope: {' '.join(unknown)} (known: {' '.join(SCOPES_SUPPORTED)})")
    assert user is not None
    result = explain(db, svc.settings, user, client=client, at=moment, ip=ip, scopes=list(scopes))
    decision = result.decision
    with force_locale("en"):
        click.echo(f"{user.login}: {'ALLOWED' if decision.allowed else 'REFUSED'}")
        where = f"{ip} ({decision.network})" if ip else "address not given (network rules not checked)"
        app = f"{client.name} ({client.client_id})" if client else "sign-in only"
        click.echo(f"  app: {app}; at: {moment.astimezone(SCHOOL_TZ):%Y-%m-%d %H:%M} Asia/Bishkek; from: {where}")
        click.echo(f"  methods assumed: {' '.join(result.amr)}")
        for reason in decision.reasons:
            source = f" (restriction #{reason.restriction_id})" if reason.restriction_id else ""
            kind = "refused" if reason.blocking else "note"
            click.echo(f"  - {kind} [{reason.code}] {reason_message(reason)}{source}")
        if client is not None:
            click.echo(f"  scopes granted: {' '.join(decision.granted_scopes) or '-'}")
        policy = decision.session
        limit = f", at most {policy.max_sessions} sessions ({policy.at_session_limit})" if policy.max_sessions else ""
        click.echo(f"  session: idle {policy.idle_timeout}s, lifetime {policy.absolute_timeout}s{limit}")
    sys.exit(0 if decision.allowed else 1)


# --- workdays ----------------------------------------------------------------------
@main.group()
def workdays() -> None:
    """The working calendar: support deadlines, school days off and working days."""


def _bad_input(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _parse_day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        _bad_input(f"{text!r} is not a date such as 2026-05-11")


@workdays.command("deadline")
@click.argument("timestamp")
@with_appcontext
def workdays_deadline(timestamp: str) -> None:
    """Support's deadline for a breach reported at TIMESTAMP (ISO 8601, any offset; without
    one, Asia/Bishkek), from the calendar in the database. The last line is the deadline,
    ISO 8601 in Asia/Bishkek."""
    from idp.workdays.calendar import SCHOOL_TZ, CalendarError, load_calendar

    try:
        moment = datetime.fromisoformat(timestamp.strip())
    except ValueError:
        _bad_input(f"{timestamp!r} is not an ISO 8601 time such as 2026-11-20T17:30:00+06:00")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=SCHOOL_TZ)
    svc = services()
    calendar = load_calendar(svc.db.session, svc.settings)
    try:
        deadline = calendar.deadline(moment)
    except (CalendarError, OverflowError):
        _bad_input(f"no deadline can be computed for {timestamp!r}")
    click.echo(f"reported: {moment.astimezone(SCHOOL_TZ).isoformat()} (Asia/Bishkek)")
    click.echo(f"support hours: {calendar.opens:%H:%M}-{calendar.closes:%H:%M} on working days")
    click.echo(deadline.isoformat())


@workdays.command("list")
@click.option("--days", default=365, type=click.IntRange(1, 3660), help="How far ahead to list public holidays.")
@with_appcontext
def workdays_list(days: int) -> None:
    """The school's days off and declared working days, and the coming public holidays."""
    from idp.workdays.calendar import SCHOOL_TZ, KyrgyzHolidays
    from idp.workdays.models import CalendarDay

    svc = services()
    rows = list(svc.db.session.scalars(select(CalendarDay).order_by(CalendarDay.day)))
    click.echo("school overrides:" if rows else "school overrides: none")
    for row in rows:
        click.echo(f"  {row.day.isoformat()} {row.kind:8} {row.note}")
    today = datetime.now(SCHOOL_TZ).date()
    click.echo(f"public holidays (KG) to {(today + timedelta(days=days)).isoformat()}:")
    for day, name in KyrgyzHolidays().between(today, today + timedelta(days=days)):
        click.echo(f"  {day.isoformat()} {name}")


def _change_day(day_text: str, kind: str | None, note: str) -> None:
    from idp.workdays.service import OverrideError, Who, remove_override, set_override

    day = _parse_day(day_text)
    svc = services()
    who = Who(actor=_cli_actor())
    try:
        with svc.db.transaction() as session:
            if kind is None:
                found, changed = remove_override(session, svc.journal, svc.settings, day=day, note=note, who=who)
                if not found:
                    _bad_input(f"{day.isoformat()} has no override")
            else:
                _, changed = set_override(session, svc.journal, svc.settings, day=day, kind=kind, note=note, who=who)
    except OverrideError as exc:
        _bad_input(str(exc))
    what = {"off": "a day off", "working": "a working day", None: "no longer overridden"}[kind]
    click.echo(f"{day.isoformat()} is {what}; {changed} open case deadline(s) recomputed")


@workdays.command("add-day-off")
@click.argument("day")
@click.option("--note", default="", help="Why (kept with the day and in the audit journal).")
@with_appcontext
def workdays_add_day_off(day: str, note: str) -> None:
    """Make DAY (YYYY-MM-DD) a school day off."""
    _change_day(day, "off", note)


@workdays.command("add-working-day")
@click.argument("day")
@click.option("--note", default="", help="Why (kept with the day and in the audit journal).")
@with_appcontext
def workdays_add_working_day(day: str, note: str) -> None:
    """Declare DAY (YYYY-MM-DD) a working day (e.g. a Saturday worked for a moved day off)."""
    _change_day(day, "working", note)


@workdays.command("remove")
@click.argument("day")
@click.option("--note", default="", help="Why (kept in the audit journal).")
@with_appcontext
def workdays_remove(day: str, note: str) -> None:
    """Remove the override of DAY (YYYY-MM-DD)."""
    _change_day(day, None, note)


# --- mail and the worker -------------------------------------------------------------
@main.group()
def mail() -> None:
    """Outgoing mail (the outbox)."""


@mail.command("deliver")
@with_appcontext
def mail_deliver() -> None:
    """Send the outbox messages that are due now, once, and say what happened."""
    svc = services()
    report = svc.outbox.deliver_due(svc.db.factory, svc.mail)
    click.echo(f"sent {report.sent}, retry later {report.retried}, failed {report.failed}")


@mail.command("sink")
@click.option("--port", default=8025, type=int, help="Port on 127.0.0.1 to accept SMTP on.")
@click.option("--out", "out_dir", default="var/mail", help="Where to keep each message as an .eml file.")
def mail_sink(port: int, out_dir: str) -> None:
    """A local SMTP server for development: prints every message it receives and keeps it in --out."""
    import signal
    import threading

    from connectors.mail.sink import describe, start_sink

    lock = threading.Lock()

    def show(message):  # type: ignore[no-untyped-def]
        with lock:
            click.echo("=" * 72 + "\n" + describe(message), nl=False)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    # aiosmtpd logs every connection at INFO; the console is for the messages themselves.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    controller = start_sink(port, Path(out_dir), show)
    click.echo(f"mail sink listening on 127.0.0.1:{port}; messages are printed here and kept in {out_dir}/")
    try:
        while not stop.wait(1):
            pass
    finally:
        controller.stop()


@main.group()
def logout() -> None:
    """Back-channel logout tokens to portal apps."""


@logout.command("deliver")
@click.option("--retry-waiting", is_flag=True,
              help="Also send the logout tokens waiting for a later retry (e.g. once an app is back).")
@with_appcontext
def logout_deliver(retry_waiting: bool) -> None:
    """POST the back-channel logout tokens that are due now, once, and say what happened."""
    svc = services()
    report = svc.backchannel.deliver_due(svc.db.factory, retry_waiting=retry_waiting)
    click.echo(f"delivered {report.delivered}, retry later {report.retried}, failed {report.failed}")


@main.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted, delete nothing.")
@click.option("--max-seconds", default=300, type=click.IntRange(1, 86400), show_default=True,
              help="Stop deleting after this long (run again for the rest).")
@with_appcontext
def prune_command(dry_run: bool, max_seconds: int) -> None:
    """Delete expired tokens and codes, and delivered mails and logout tokens older than
    IDP_DELIVERED_RETENTION_DAYS; redact sign-in events older than
    IDP_SIGNIN_EVENT_RETENTION_DAYS and delete breach cases closed more than
    IDP_CLOSED_CASE_RETENTION_DAYS ago (the worker does it every 10 minutes); print the counts."""
    import time

    from idp.prune import apply_retention, prune

    svc = services()
    started = time.monotonic()
    report = prune(svc.db.factory, retention_days=svc.settings.delivered_retention_days, dry_run=dry_run,
                   time_limit=float(max_seconds))
    verb = "would delete" if dry_run else "deleted"
    for table, count in report.counts.items():
        click.echo(f"{verb} {count} {table}")
    if report.total and not dry_run:
        with svc.db.transaction() as session:
            svc.journal.record(session, actor=_cli_actor(), action="data:retention:prune",
                               details={"counts": report.counts, "complete": report.complete})
    retained = apply_retention(
        svc.db.factory, svc.journal, signin_days=svc.settings.signin_event_retention_days,
        case_days=svc.settings.closed_case_retention_days, actor=_cli_actor(), dry_run=dry_run,
        time_limit=max(1.0, float(max_seconds) - (time.monotonic() - started)),
    )
    redact = "would redact" if dry_run else "redacted"
    click.echo(f"{redact} {retained.sign_in_events} sign-in events")
    click.echo(f"{verb} {retained.cases_deleted} closed breach cases ({redact} {retained.case_events} of their events)")
    if not (report.complete and retained.complete):
        click.echo(f"stopped after {max_seconds} s with rows left; run again")


@main.command("worker")
@click.option("--burst", is_flag=True, help="Deliver what is due, run the queued jobs, then exit.")
def worker(burst: bool) -> None:
    """Run background jobs (RQ on the configured Redis): outbox and back-channel logout
    delivery with retries."""
    from idp.config import Settings
    from idp.logs import setup_logging
    from idp.worker import run_worker

    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)
    run_worker(settings, burst=burst)


# --- serve -------------------------------------------------------------------------
@main.command("serve")
@click.option("--bind", default="127.0.0.1:8000")
@click.option("--workers", default=2, type=int)
@click.option("--threads", default=4, type=int)
def serve(bind: str, workers: int, threads: int) -> None:
    """Serve the provider with gunicorn (idp.wsgi:app)."""
    gunicorn = Path(sys.executable).with_name("gunicorn")
    args = [
        str(gunicorn),
        "idp.wsgi:app",
        "--bind", bind,
        "--workers", str(workers),
        "--threads", str(threads),
        "--worker-class", "gthread",
        # No gunicorn access log (it prints query strings, which carry codes and tokens):
        # the app logs one access line per request, in JSON (idp/logs.py).
        "--logger-class", "idp.logs.GunicornLogger",
        "--graceful-timeout", "5",
        "--no-control-socket",
    ]
    os.execv(args[0], args)  # noqa: S606 - replaces this process with gunicorn


if __name__ == "__main__":
    main()
