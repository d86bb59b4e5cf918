"""School directory synchronisation (issue 7) against a real OpenLDAP slapd: the
``darbaza directory sync`` command run like an operator runs it, the worker's job, and
the console page over HTTP.

The slapd is shared by the test process: every test puts its people in its own
``ou=run-<hex>,ou=people,...`` (the user base of its runs) and names its groups with the
same tag, so that full syncs (which disable directory accounts they do not see) only
see this test's people."""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from ldap3 import MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE
from sqlalchemy import select

from connectors.ldap.models import DirectorySyncRun
from connectors.ldap.sync import LOCK_KEY
from idp.accounts.models import SchoolClass, User
from idp.app import create_app
from idp.audit.models import AuditEvent
from idp.cli import main
from idp.oidc.models import RefreshToken
from tests.conftest import LiveServer, free_port, make_settings
from tests.helpers import Browser
from tests.ldap_server import (
    BASE_DN,
    GROUPS_DN,
    PEOPLE_DN,
    READER_DN,
    READER_PASSWORD,
    Slapd,
    escape_rdn,
)


@dataclass
class Directory:
    """One test's corner of the directory and the settings its runs use."""

    slapd: Slapd
    server: LiveServer
    tag: str
    base: str
    profile: str = "openldap"
    group_roles: dict[str, str] = field(default_factory=dict)
    group_classes: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        settings = self.server.services.settings
        env = {
            "IDP_DATABASE_URL": settings.database_url,
            "IDP_REDIS_URL": settings.redis_url,
            "IDP_SECRET_KEY": settings.secret_key,
            "IDP_ISSUER": settings.issuer,
            "IDP_ARGON2_MEMORY_COST": str(settings.argon2_memory_cost),
            "IDP_ARGON2_TIME_COST": str(settings.argon2_time_cost),
            "IDP_LDAP_URLS": self.slapd.url,
            "IDP_LDAP_PROFILE": self.profile,
            "IDP_LDAP_BIND_DN": READER_DN,
            "IDP_LDAP_BIND_PASSWORD": READER_PASSWORD,
            "IDP_LDAP_USER_BASE": self.base,
            "IDP_LDAP_GROUP_BASE": GROUPS_DN,
            "IDP_LDAP_GROUP_ROLES": json.dumps(self.group_roles),
            "IDP_LDAP_GROUP_CLASSES": json.dumps(self.group_classes),
            "IDP_LDAP_PAGE_SIZE": "3",  # several pages even for a handful of people
        }
        env.update(extra)
        return env

    def sync(self, *args: str, **env: str) -> Any:
        return CliRunner().invoke(main, ["directory", "sync", *args], env=self.env(**env), catch_exceptions=False)

    def add_person(self, uid: str, *, cn: str | None = None, password: str | None = None,
                   object_classes: tuple[str, ...] = ("inetOrgPerson",), **attrs: Any) -> str:
        dn = f"uid={escape_rdn(uid)},{self.base}"
        values: dict[str, Any] = {"uid": uid, "cn": cn or uid, "sn": (cn or uid).split()[-1]}
        if password:
            values["userPassword"] = password
        values.update(attrs)
        with self.slapd.admin() as conn:
            conn.add(dn, list(object_classes), values)
        return dn

    def add_group(self, cn: str, members: list[str]) -> str:
        return self.slapd.add_group(cn, members)

    def modify(self, dn: str, changes: dict[str, list[tuple[str, list[Any]]]]) -> None:
        with self.slapd.admin() as conn:
            conn.modify(dn, changes)


@pytest.fixture(scope="module")
def directory_server(server: LiveServer, database_url: str, redis_url: str, slapd_server: Slapd) -> Iterator[LiveServer]:
    """A provider with the school directory configured (for the console pages and the
    bind-through sign-in of synced people)."""
    port = free_port()
    settings = make_settings(database_url, redis_url, f"http://127.0.0.1:{port}", ldap_urls=[slapd_server.url],
                             ldap_bind_dn=READER_DN, ldap_bind_password=READER_PASSWORD,
                             ldap_user_base=PEOPLE_DN, ldap_group_base=GROUPS_DN, ldap_timeout_seconds=2,
                             ldap_group_roles={"cn=teachers-console,ou=groups,dc=school,dc=test": "teacher"})
    live = LiveServer(create_app(settings), port)
    live.start()
    yield live
    live.stop()
    live.services.db.remove()
    live.services.db.dispose()
    live.services.redis.close()


@pytest.fixture
def directory(directory_server: LiveServer, slapd_server: Slapd) -> Directory:
    tag = secrets.token_hex(3)
    base = f"ou=run-{tag},{PEOPLE_DN}"
    with slapd_server.admin() as conn:
        conn.add(base, ["organizationalUnit"], {"ou": f"run-{tag}"})
    return Directory(slapd=slapd_server, server=directory_server, tag=tag, base=base)


def account(server: LiveServer, login: str) -> dict[str, Any] | None:
    with server.services.db.transaction() as session:
        user = session.scalar(select(User).where(User.login == login))
        if user is None:
            return None
        return {"id": user.id, "name": user.display_name, "email": user.email, "locale": user.locale,
                "roles": user.role_names, "classes": user.class_names, "active": user.active,
                "source": user.source, "dn": user.directory_dn, "external_id": user.external_id,
                "password_hash": user.password_hash, "source_disabled_at": user.source_disabled_at}


def last_run(server: LiveServer) -> DirectorySyncRun:
    with server.services.db.transaction() as session:
        run = session.scalar(select(DirectorySyncRun).order_by(DirectorySyncRun.id.desc()).limit(1))
        assert run is not None
        session.expunge(run)
        return run


def counts(output: str) -> dict[str, int]:
    match = re.search(r"created (\d+), updated (\d+), disabled (\d+), unchanged (\d+), errors (\d+)", output)
    assert match, output
    return dict(zip(("created", "updated", "disabled", "unchanged", "errors"), map(int, match.groups()), strict=True))


def journal(server: LiveServer, user_id: int) -> list[str]:
    with server.services.db.transaction() as session:
        return list(session.scalars(select(AuditEvent.action).where(AuditEvent.subject == f"user:{user_id}")
                                    .order_by(AuditEvent.seq)))


def school(directory: Directory) -> dict[str, str]:
    """Three people, a teachers group and a class group mapped to a role and a class."""
    t = directory.tag
    dns = {
        "teacher": directory.add_person(f"{t}.teacher", cn="Нурлан Асанов", mail=f"{t}.t@school.example",
                                        preferredLanguage="ru", password="teacher directory pass"),
        "aigerim": directory.add_person(f"{t}.aigerim", cn="Айгерим Токонова", preferredLanguage="ky"),
        "bolot": directory.add_person(f"{t}.bolot", cn="Болот Ибраев", mail=f"{t}.b@school.example"),
    }
    directory.add_group(f"teachers-{t}", [dns["teacher"]])
    directory.add_group(f"students-{t}", [dns["aigerim"], dns["bolot"]])
    directory.add_group(f"class-{t}", [dns["aigerim"]])
    directory.group_roles = {f"teachers-{t}": "teacher", f"cn=students-{t},{GROUPS_DN}": "student"}
    directory.group_classes = {f"class-{t}": f"7A-{t.upper()}"}
    return dns


# --- full sync -----------------------------------------------------------------------
def test_full_sync_creates_accounts_with_roles_and_classes_and_a_rerun_changes_nothing(directory) -> None:
    t = directory.tag
    dns = school(directory)
    first = directory.sync("--full")
    assert first.exit_code == 0, first.output
    assert counts(first.output) == {"created": 3, "updated": 0, "disabled": 0, "unchanged": 0, "errors": 0}
    teacher = account(directory.server, f"{t}.teacher")
    assert teacher is not None
    assert teacher["source"] == "directory" and teacher["password_hash"] is None and teacher["active"]
    assert teacher["roles"] == ["teacher"] and teacher["classes"] == []
    assert teacher["name"] == "Нурлан Асанов" and teacher["email"] == f"{t}.t@school.example"
    assert teacher["locale"] == "ru" and teacher["dn"] == dns["teacher"]
    uuid.UUID(teacher["external_id"])  # entryUUID
    aigerim = account(directory.server, f"{t}.aigerim")
    assert aigerim is not None and aigerim["roles"] == ["student"] and aigerim["classes"] == [f"7A-{t.upper()}"]
    assert aigerim["locale"] == "ky"
    # The unknown class was created.
    with directory.server.services.db.transaction() as session:
        assert session.scalar(select(SchoolClass).where(SchoolClass.name == f"7A-{t.upper()}")) is not None
    assert "directory:account:create" in journal(directory.server, teacher["id"])
    run = last_run(directory.server)
    assert run.status == "completed" and run.mode == "full" and run.trigger == "cli" and run.cursor_after
    assert run.entries_seen == 3 and run.pages_done >= 1

    again = directory.sync("--full")
    assert again.exit_code == 0, again.output
    assert counts(again.output) == {"created": 0, "updated": 0, "disabled": 0, "unchanged": 3, "errors": 0}
    # The journal written a page at a time is still one unbroken chain.
    with directory.server.services.db.transaction() as session:
        assert directory.server.services.journal.verify(session).ok
    listed = CliRunner().invoke(main, ["directory", "runs", "--limit", "2"], env=directory.env())
    assert listed.exit_code == 0 and "full" in listed.output and "completed" in listed.output


def test_a_synced_teacher_signs_in_through_the_directory(directory) -> None:
    t = directory.tag
    school(directory)
    assert directory.sync("--full").exit_code == 0
    browser = Browser(directory.server.url)
    response = browser.sign_in(f"{t}.teacher", "teacher directory pass")
    # A teacher's role requires a second factor: the sign-in goes on to enrolment.
    assert response.status_code in (302, 303), response.text[:500]
    assert "/login" in response.headers["Location"] or response.headers["Location"].endswith("/")


# --- incremental sync ----------------------------------------------------------------
def test_incremental_sync_picks_up_only_what_changed_and_group_membership(directory) -> None:
    t = directory.tag
    dns = school(directory)
    assert directory.sync("--full").exit_code == 0
    time.sleep(1.1)  # modifyTimestamp counts seconds
    directory.modify(dns["bolot"], {"cn": [(MODIFY_REPLACE, ["Болот Ибраев-Асанов"])],
                                    "mail": [(MODIFY_DELETE, [])]})
    # Bolot joins the class group; Aigerim leaves it (only the group entry changes).
    class_dn = f"cn=class-{t},{GROUPS_DN}"
    directory.modify(class_dn, {"member": [(MODIFY_REPLACE, [dns["bolot"]])]})
    directory.modify(f"cn=teachers-{t},{GROUPS_DN}", {"member": [(MODIFY_ADD, [dns["bolot"]])]})
    result = directory.sync()
    assert result.exit_code == 0, result.output
    assert "incremental sync" in result.output
    assert counts(result.output)["created"] == 0 and counts(result.output)["disabled"] == 0
    assert counts(result.output)["updated"] == 2  # Bolot (name, e-mail, class, role) and Aigerim (class)
    bolot = account(directory.server, f"{t}.bolot")
    assert bolot is not None and bolot["name"] == "Болот Ибраев-Асанов" and bolot["email"] is None
    assert bolot["classes"] == [f"7A-{t.upper()}"] and bolot["roles"] == ["student", "teacher"]
    aigerim = account(directory.server, f"{t}.aigerim")
    assert aigerim is not None and aigerim["classes"] == [] and aigerim["roles"] == ["student"]
    teacher = account(directory.server, f"{t}.teacher")
    assert teacher is not None and journal(directory.server, teacher["id"]) == ["directory:account:create"]
    assert "directory:account:update" in journal(directory.server, bolot["id"])
    run = last_run(directory.server)
    assert run.mode == "incremental" and run.cursor_before and run.cursor_after >= run.cursor_before
    # Nothing changed since: the next incremental sync updates nobody.
    quiet = directory.sync()
    assert quiet.exit_code == 0 and counts(quiet.output)["updated"] == 0 and counts(quiet.output)["created"] == 0


def test_a_role_granted_in_the_console_is_kept_by_the_sync(directory) -> None:
    t = directory.tag
    school(directory)
    assert directory.sync("--full").exit_code == 0
    with directory.server.services.db.transaction() as session:
        from idp.accounts.models import Role

        user = session.scalar(select(User).where(User.login == f"{t}.aigerim"))
        assert user is not None
        user.roles.append(session.scalar(select(Role).where(Role.name == "parent")))
    result = directory.sync("--full")
    assert result.exit_code == 0 and counts(result.output)["updated"] == 0
    aigerim = account(directory.server, f"{t}.aigerim")
    assert aigerim is not None and aigerim["roles"] == ["parent", "student"]


# --- disabling -----------------------------------------------------------------------
def test_a_person_removed_from_the_directory_is_disabled_and_signed_out_then_comes_back(directory) -> None:
    t = directory.tag
    dns = school(directory)
    gone = directory.add_person(f"{t}.gone", cn="Leaving Student", password="leaving student pass")
    admin_disabled = directory.add_person(f"{t}.held", cn="Held By Admin")
    assert directory.sync("--full").exit_code == 0
    info = account(directory.server, f"{t}.gone")
    assert info is not None and info["active"]
    # The person signs in (bind-through) and an app holds a refresh token of theirs.
    browser = Browser(directory.server.url)
    assert browser.sign_in(f"{t}.gone", "leaving student pass").status_code in (302, 303)
    assert browser.get("/", allow_redirects=False).status_code == 200
    assert directory.server.services.sessions.list(info["id"])
    with directory.server.services.db.transaction() as session:
        session.add(RefreshToken(token_hash=secrets.token_hex(32), family_id="f", client_id="app", user_id=info["id"],
                                 issued_at=int(time.time()), expires_at=int(time.time()) + 3600))
        held = session.scalar(select(User).where(User.login == f"{t}.held"))
        assert held is not None
        held.active = False  # disabled by an administrator, not by the directory

    directory.slapd.delete(gone)
    directory.slapd.delete(admin_disabled)
    result = directory.sync("--full")
    assert result.exit_code == 0, result.output
    assert counts(result.output)["disabled"] == 1  # the administrator's one was disabled already
    info = account(directory.server, f"{t}.gone")
    assert info is not None and not info["active"] and info["source_disabled_at"] is not None
    assert directory.server.services.sessions.list(info["id"]) == []
    assert browser.get("/", allow_redirects=False).status_code in (302, 303)
    with directory.server.services.db.transaction() as session:
        tokens = list(session.scalars(select(RefreshToken).where(RefreshToken.user_id == info["id"])))
        assert tokens and all(tok.revoked_at is not None for tok in tokens)
        event = session.scalar(select(AuditEvent).where(AuditEvent.subject == f"user:{info['id']}",
                                                        AuditEvent.action == "directory:account:disable"))
        assert event is not None and event.actor == "directory-sync" and event.details["dn"] == gone
    # Nothing is deleted.
    assert account(directory.server, f"{t}.held") is not None

    # Back in the directory: the account the directory disabled comes back; the one an
    # administrator disabled does not.
    directory.add_person(f"{t}.gone", cn="Leaving Student")
    directory.add_person(f"{t}.held", cn="Held By Admin")
    back = directory.sync("--full")
    assert back.exit_code == 0, back.output
    info = account(directory.server, f"{t}.gone")
    assert info is not None and info["active"] and info["source_disabled_at"] is None
    held_info = account(directory.server, f"{t}.held")
    assert held_info is not None and not held_info["active"]
    assert "directory:account:enable" in journal(directory.server, info["id"])
    assert dns  # the rest of the school stays


def test_an_incremental_sync_does_not_disable_people_it_cannot_see(directory) -> None:
    t = directory.tag
    school(directory)
    gone = directory.add_person(f"{t}.gone")
    assert directory.sync("--full").exit_code == 0
    directory.slapd.delete(gone)
    result = directory.sync()
    assert result.exit_code == 0 and counts(result.output)["disabled"] == 0
    info = account(directory.server, f"{t}.gone")
    assert info is not None and info["active"]


def test_a_full_sync_that_finds_nobody_disables_nobody(directory) -> None:
    t = directory.tag
    school(directory)
    assert directory.sync("--full").exit_code == 0
    empty = f"ou=empty-{t},{PEOPLE_DN}"
    with directory.slapd.admin() as conn:
        conn.add(empty, ["organizationalUnit"], {"ou": f"empty-{t}"})
    result = directory.sync("--full", IDP_LDAP_USER_BASE=empty)
    assert result.exit_code == 1
    assert "listed nobody" in result.output and "Traceback" not in result.output
    info = account(directory.server, f"{t}.teacher")
    assert info is not None and info["active"]
    assert directory.sync("--full").exit_code == 0  # resumes, completes


# --- Active Directory ------------------------------------------------------------------
def test_active_directory_profile(directory) -> None:
    t = directory.tag
    directory.profile = "ad"
    guid = uuid.uuid4()
    teachers_dn = f"cn=Teachers {t},ou=groups,{BASE_DN}"
    common = {"objectCategory": "person", "uSNChanged": 1000}

    def add(name: str, flags: int, guid_value: uuid.UUID, member_of: list[str], usn: int) -> str:
        extra: dict[str, Any] = {**common, "uSNChanged": usn}
        if member_of:
            extra["memberOf"] = member_of
        return directory.add_person(name, object_classes=("user",), cn=name, displayName=f"{name} (AD)",
                                    sAMAccountName=name.upper(), userAccountControl=flags,
                                    objectGUID=guid_value.bytes_le, **extra)

    active_dn = add(f"{t}-ad1", 512, guid, [teachers_dn], 1001)
    disabled_dn = add(f"{t}-ad2", 514, uuid.uuid4(), [], 1002)
    directory.group_roles = {f"teachers {t}": "teacher"}
    result = directory.sync("--full")
    assert result.exit_code == 0, result.output
    assert counts(result.output)["created"] == 2
    first = account(directory.server, f"{t}-ad1")
    assert first is not None and first["external_id"] == str(guid) and first["name"] == f"{t}-ad1 (AD)"
    assert first["roles"] == ["teacher"] and first["active"]
    second = account(directory.server, f"{t}-ad2")
    assert second is not None and not second["active"] and second["source_disabled_at"] is not None
    assert last_run(directory.server).cursor_after == "1002"

    # userAccountControl gains the disabled bit; the other is enabled again (uSNChanged moves on).
    directory.modify(active_dn, {"userAccountControl": [(MODIFY_REPLACE, [514])],
                                 "uSNChanged": [(MODIFY_REPLACE, [1003])]})
    directory.modify(disabled_dn, {"userAccountControl": [(MODIFY_REPLACE, [512])],
                                   "uSNChanged": [(MODIFY_REPLACE, [1004])]})
    again = directory.sync()
    assert again.exit_code == 0, again.output
    assert "incremental" in again.output
    assert counts(again.output)["disabled"] == 1 and counts(again.output)["updated"] == 1
    first = account(directory.server, f"{t}-ad1")
    second = account(directory.server, f"{t}-ad2")
    assert first is not None and not first["active"]
    assert second is not None and second["active"]
    # Back to the OpenLDAP profile for later runs (its cursor is a time): a full sync.
    directory.profile = "openldap"


# --- dry run, failures, resuming, the lock ------------------------------------------------
def test_a_dry_run_changes_nothing_and_records_the_run(directory) -> None:
    t = directory.tag
    school(directory)
    result = directory.sync("--full", "--dry-run")
    assert result.exit_code == 0, result.output
    assert counts(result.output)["created"] == 3 and "nothing written" in result.output
    assert account(directory.server, f"{t}.teacher") is None
    with directory.server.services.db.transaction() as session:
        assert session.scalar(select(SchoolClass).where(SchoolClass.name == f"7A-{t.upper()}")) is None
    run = last_run(directory.server)
    assert run.dry_run and run.status == "completed" and run.created == 3
    real = directory.sync("--full")
    assert counts(real.output)["created"] == 3  # the dry run was not taken for a real one


def test_directory_down_fails_the_run_clearly_and_the_next_run_resumes_it(directory) -> None:
    t = directory.tag
    dns = school(directory)
    assert directory.sync("--full").exit_code == 0
    directory.modify(dns["bolot"], {"cn": [(MODIFY_REPLACE, ["Bolot Renamed"])]})
    before = account(directory.server, f"{t}.bolot")
    directory.slapd.stop()
    try:
        down = directory.sync("--full", IDP_LDAP_TIMEOUT_SECONDS="1")
    finally:
        directory.slapd.start()
    assert down.exit_code == 1
    assert "cannot be reached" in down.output and "Traceback" not in down.output
    failed = last_run(directory.server)
    assert failed.status == "failed" and failed.cursor_after is None and failed.message
    assert account(directory.server, f"{t}.bolot") == before  # untouched
    resumed = directory.sync()
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming run {failed.id}" in resumed.output
    run = last_run(directory.server)
    assert run.resumed_from == failed.id and run.cursor_before == failed.cursor_before
    assert run.mode == "full"  # a failed full sync is resumed as a full one
    bolot = account(directory.server, f"{t}.bolot")
    assert bolot is not None and bolot["name"] == "Bolot Renamed"


def test_an_interrupted_run_is_resumed_and_already_applied_entries_are_unchanged(directory) -> None:
    t = directory.tag
    school(directory)
    assert directory.sync("--full").exit_code == 0
    # A run killed halfway: its row stays "running" (it had applied its first pages).
    with directory.server.services.db.transaction() as session:
        done = session.scalar(select(DirectorySyncRun).order_by(DirectorySyncRun.id.desc()).limit(1))
        assert done is not None
        killed = DirectorySyncRun(mode="full", trigger="worker", status="running", cursor_before=done.cursor_before,
                                  entries_seen=2, pages_done=1, errors=[])
        session.add(killed)
        session.flush()
        killed_id = killed.id
    result = directory.sync()
    assert result.exit_code == 0, result.output
    assert counts(result.output) == {"created": 0, "updated": 0, "disabled": 0, "unchanged": 3, "errors": 0}
    with directory.server.services.db.transaction() as session:
        killed_row = session.get(DirectorySyncRun, killed_id)
        assert killed_row is not None and killed_row.status == "failed" and "interrupted" in (killed_row.message or "")
    assert last_run(directory.server).resumed_from == killed_id
    assert account(directory.server, f"{t}.teacher") is not None


def test_only_one_run_at_a_time(directory) -> None:
    school(directory)
    redis = directory.server.services.redis
    redis.set(LOCK_KEY, "someone-else", ex=60)
    try:
        refused = directory.sync("--full")
    finally:
        redis.delete(LOCK_KEY)
    assert refused.exit_code == 1 and "another directory sync is running" in refused.output
    assert "Traceback" not in refused.output


def test_not_configured_or_badly_mapped_is_a_clear_failure(directory) -> None:
    none = directory.sync(IDP_LDAP_URLS="")
    assert none.exit_code == 1 and "no directory is configured" in none.output
    bad = directory.sync(IDP_LDAP_GROUP_ROLES=json.dumps({"x": "wizard"}))
    assert bad.exit_code == 1 and "unknown role" in bad.output and "wizard" in bad.output


# --- conflicts and hostile names ---------------------------------------------------------------
def test_a_login_of_a_local_account_is_not_taken_over(directory, make_user) -> None:
    t = directory.tag
    local = make_user(login=f"{t}.local")
    dn = directory.add_person(f"{t}.local", cn="Impostor")
    directory.add_person(f"{t}.fine", cn="Fine Person")
    result = directory.sync("--full")
    assert result.exit_code == 0, result.output
    assert counts(result.output)["errors"] == 1 and counts(result.output)["created"] == 1
    assert f"error: {dn}: the login '{t}.local' belongs to an account that is not from the directory" in result.output
    info = account(directory.server, local.login)
    assert info is not None and info["source"] == "local" and info["name"] == "Test User" and info["dn"] is None
    # Two entries with one login (in two branches): the second is an error, not a merge.
    other_ou = f"ou=more,{directory.base}"
    with directory.slapd.admin() as conn:
        conn.add(other_ou, ["organizationalUnit"], {"ou": "more"})
        twin = f"uid={t}.fine,{other_ou}"
        conn.add(twin, ["inetOrgPerson"], {"uid": f"{t}.fine", "cn": "Twin", "sn": "Twin"})
    twice = directory.sync("--full")
    assert twice.exit_code == 0
    assert "another directory" in twice.output and counts(twice.output)["errors"] == 2
    fine = account(directory.server, f"{t}.fine")
    assert fine is not None and fine["name"] == "Fine Person"


def test_hostile_names_sync_without_breaking_anything(directory, console) -> None:
    t = directory.tag
    star = directory.add_person(f"{t}.star", cn="*)(uid=*")
    backslash = directory.add_person(f"{t}\\x", cn="Back Slash")
    markup = directory.add_person(f"<b>{t}</b>", cn="Markup")
    paren_group = directory.add_group(f"a)(b-{t}", [star])
    directory.group_roles = {f"a)(b-{t}": "teacher"}
    result = directory.sync("--full")
    assert result.exit_code == 0, result.output
    assert counts(result.output)["created"] == 1 and counts(result.output)["errors"] == 2
    info = account(directory.server, f"{t}.star")
    assert info is not None and info["name"] == "*)(uid=*" and info["roles"] == ["teacher"]
    run = last_run(directory.server)
    # Each bad entry is reported with its DN (as the directory spells it) and the reason.
    reasons = {e["reason"] for e in run.errors}
    assert any(repr(f"{t}\\x") in r for r in reasons) and any(repr(f"<b>{t}</b>") in r for r in reasons)
    assert all(e["dn"].endswith(directory.base) and e["dn"] != directory.base for e in run.errors)
    assert len({e["dn"] for e in run.errors}) == 2 and backslash and markup and paren_group
    # The run's page in the console shows the errors escaped.
    browser = console("school_admin")
    page = browser.get(f"/admin/directory/runs/{run.id}")
    assert page.status_code == 200
    assert f"&lt;b&gt;{t}&lt;/b&gt;" in page.text and f"<b>{t}</b>" not in page.text


# --- the worker ----------------------------------------------------------------------------
def test_the_worker_job_runs_the_sync_that_is_due(directory, monkeypatch) -> None:
    from connectors.ldap import sync as sync_module

    t = directory.tag
    school(directory)
    for name, value in directory.env(IDP_LDAP_FULL_SYNC_INTERVAL_SECONDS="0",
                                     IDP_LDAP_SYNC_INTERVAL_SECONDS="1").items():
        monkeypatch.setenv(name, value)
    time.sleep(1.1)  # the last run is more than a second old
    assert sync_module.scheduled_sync() is not None
    run = last_run(directory.server)
    assert run.trigger == "worker" and run.status == "completed"
    # Just run: not due again yet with a long interval.
    monkeypatch.setenv("IDP_LDAP_SYNC_INTERVAL_SECONDS", "3600")
    assert sync_module.scheduled_sync() is None
    # A full sync is due when none ran within its interval.
    monkeypatch.setenv("IDP_LDAP_FULL_SYNC_INTERVAL_SECONDS", "1")
    time.sleep(1.1)
    assert sync_module.scheduled_sync() == "full completed"
    assert account(directory.server, f"{t}.teacher") is not None
    # Without a directory the job does nothing.
    monkeypatch.setenv("IDP_LDAP_URLS", "")
    assert sync_module.scheduled_sync() is None


# --- the console ---------------------------------------------------------------------------
@pytest.fixture
def console(directory_server: LiveServer, make_user):  # type: ignore[no-untyped-def]
    def open_console(*roles: str) -> Browser:
        user = make_user(roles=roles)
        browser = Browser(directory_server.url)
        browser.http.headers["Accept-Language"] = "en"
        assert browser.sign_in(user.login, user.password).status_code in (302, 303)
        return browser

    return open_console


def csrf_of(page: requests.Response) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
    assert match, page.text[:2000]
    return match.group(1)


def test_console_shows_the_configuration_and_runs_and_starts_a_sync(directory, console) -> None:
    admin = console("school_admin")
    page = admin.get("/admin/directory")
    assert page.status_code == 200
    assert "School directory" in page.text and directory.slapd.url in page.text
    assert READER_DN in page.text and READER_PASSWORD not in page.text
    assert 'href="/admin/directory"' in page.text  # in the console's navigation
    # Start a dry run of a full sync from the console (the server's user base is all people).
    before = last_run(directory.server).id if directory_runs(directory) else 0
    response = admin.post("/admin/directory/sync", data={"csrf_token": csrf_of(page), "mode": "full",
                                                          "dry_run": "y"})
    assert response.status_code in (302, 303)
    run = last_run(directory.server)
    assert run.id > before and run.trigger == "console" and run.dry_run and run.mode == "full"
    detail = admin.get(response.headers["Location"])
    assert detail.status_code == 200 and f"Directory sync {run.id}" in detail.text
    overview = admin.get("/admin/directory")
    assert f'id="run-{run.id}"' in overview.text
    # Without the CSRF token nothing starts.
    refused = admin.post("/admin/directory/sync", data={"mode": "full"})
    assert refused.status_code in (302, 303, 400)
    assert last_run(directory.server).id == run.id


def directory_runs(directory: Directory) -> int:
    with directory.server.services.db.transaction() as session:
        return len(list(session.scalars(select(DirectorySyncRun.id))))


def test_console_says_so_when_the_directory_is_down(directory, console) -> None:
    school(directory)
    admin = console("school_admin")
    page = admin.get("/admin/directory")
    directory.slapd.stop()
    try:
        response = admin.post("/admin/directory/sync", data={"csrf_token": csrf_of(page), "mode": "incremental"})
    finally:
        directory.slapd.start()
    assert response.status_code in (302, 303)
    shown = admin.get(response.headers["Location"])
    assert shown.status_code == 200 and "failed" in shown.text and "cannot be reached" in shown.text
    # The next run resumes it (and completes).
    assert directory.sync("--full").exit_code == 0


def test_console_refuses_people_without_the_permission(directory, console) -> None:
    student = console("student")
    assert student.get("/admin/directory", allow_redirects=False).status_code == 403
    support = console("tech_support")  # may read accounts, not change them
    page = support.get("/admin/directory")
    assert page.status_code == 200 and 'id="sync-form"' not in page.text
    before = directory_runs(directory)
    refused = support.post("/admin/directory/sync", data={"csrf_token": csrf_of(page), "mode": "full"})
    assert refused.status_code == 403
    assert directory_runs(directory) == before
