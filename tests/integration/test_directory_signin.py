"""Bind-through sign-in for directory accounts (issue 7), against a real OpenLDAP slapd:
the password of an account whose ``source`` is "directory" is checked by binding to the
directory as its entry; there is no local hash. Second factor, restrictions, throttling
and the consecutive-failure limit apply as for every account; a directory that cannot
be reached gives a clear 503 and local accounts keep working; the directory's accounts
get no password, reset link or activation code here."""

from __future__ import annotations

import dataclasses
import html
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import requests
from sqlalchemy import select

from connectors.ldap import client as ldap_client
from connectors.ldap.config import directory_config
from idp.access.models import Restriction
from idp.accounts.admin import AccountAdmin, Actor, PasswordManagedByDirectory
from idp.accounts.models import ActivationCode, SchoolClass, User
from idp.app import create_app
from idp.audit.models import AuditEvent
from idp.login.password_check import password_matches
from idp.notify.models import OutboxMessage
from tests.conftest import LiveServer, free_port, make_settings
from tests.helpers import Browser, ClientInfo, UserInfo
from tests.ldap_server import GROUPS_DN, PEOPLE_DN, READER_DN, READER_PASSWORD, Slapd

DOWN_MESSAGE = "The school directory cannot be reached right now"
MANAGED_MESSAGE = "Your password is managed by the school directory; change it there."
STAFF_MESSAGE = "This account&#39;s password is managed by the school directory"


# The directory accounts and entries this module made: other modules share the database
# and the directory (a full sync there would disable accounts whose entries are gone).
CREATED: list[tuple[int, str]] = []


def forget_directory_accounts(live: LiveServer, slapd: Slapd) -> None:
    with live.services.db.transaction() as session:
        for user_id, _dn in CREATED:
            user = session.get(User, user_id)
            if user is not None:
                user.source, user.directory_dn, user.external_id = "local", None, None
    for _user_id, dn in CREATED:
        if slapd.proc is not None:
            try:
                slapd.delete(dn)
            except Exception:  # noqa: S110 - already gone (another module wiped the directory)
                pass
    CREATED.clear()


@pytest.fixture(scope="module")
def dir_server(server: LiveServer, database_url: str, redis_url: str, slapd_server: Slapd) -> Iterator[LiveServer]:
    """The provider configured for the test directory (the shared database and Redis)."""
    port = free_port()
    settings = make_settings(
        database_url, redis_url, f"http://127.0.0.1:{port}",
        ldap_urls=[slapd_server.url], ldap_bind_dn=READER_DN, ldap_bind_password=READER_PASSWORD,
        ldap_user_base=PEOPLE_DN, ldap_group_base=GROUPS_DN, ldap_timeout_seconds=2,
    )
    live = LiveServer(create_app(settings), port)
    live.start()
    yield live
    live.stop()
    forget_directory_accounts(live, slapd_server)
    live.services.db.remove()
    live.services.db.dispose()
    live.services.redis.close()


@pytest.fixture
def directory_user(dir_server: LiveServer, slapd_server: Slapd, make_user):  # type: ignore[no-untyped-def]
    """Factory: a person in the directory and their directory account here (no local
    hash; the password is the directory's). Returns (UserInfo with the directory
    password, DN)."""

    def factory(roles: tuple[str, ...] = ("student",), *, uid: str | None = None, password: str | None = None,
                two_factor: bool | None = False, **fields: object) -> tuple[UserInfo, str]:
        uid = uid or f"dir-{secrets.token_hex(5)}"
        password = password or "directory secret " + secrets.token_hex(4)
        dn = slapd_server.add_person(uid, cn="Directory Person", password=password)
        local = make_user(roles=roles, two_factor=two_factor, login=f"d-{secrets.token_hex(5)}", **fields)
        with dir_server.services.db.transaction() as session:
            user = session.get(User, local.id)
            user.source = "directory"
            user.directory_dn = dn
            user.external_id = secrets.token_hex(16)
            user.password_hash = None
        CREATED.append((local.id, dn))
        return dataclasses.replace(local, password=password), dn

    return factory


def person(live: LiveServer) -> Browser:
    browser = Browser(live.url)
    browser.http.headers["Accept-Language"] = "en"
    return browser


def signed_in_as(browser: Browser) -> bool:
    return browser.get("/").status_code == 200


def account(live: LiveServer, user_id: int) -> User:
    with live.services.db.transaction() as session:
        user = session.get(User, user_id)
        session.expunge(user)
        return user


def events(live: LiveServer, user_id: int, action: str) -> list[AuditEvent]:
    with live.services.db.transaction() as session:
        rows = list(session.scalars(select(AuditEvent).where(
            AuditEvent.subject == f"user:{user_id}", AuditEvent.action == action).order_by(AuditEvent.seq)))
        for row in rows:
            session.expunge(row)
        return rows


def csrf_of(page: requests.Response) -> str:
    found = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', page.text)
    assert found, page.text[:1000]
    return found.group(1)


def alert_text(page: requests.Response) -> str:
    return html.unescape(page.text)


@pytest.fixture
def slapd_back(slapd_server: Slapd) -> Iterator[Slapd]:
    """The directory, started again after a test that stops it (even when it fails)."""
    yield slapd_server
    if slapd_server.proc is None:
        slapd_server.start()


def test_directory_password_signs_in_to_an_app(dir_server, directory_user, make_client):
    user, _dn = directory_user()
    assert account(dir_server, user.id).password_hash is None
    client: ClientInfo = make_client(name="E-journal", scopes=["openid", "profile"])
    browser = person(dir_server)
    params, verifier, _last = browser.authorize(client, user)
    assert "code" in params, params
    token = requests.post(dir_server.url + "/token", data={
        "grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
        "code_verifier": verifier}, auth=(client.client_id, client.client_secret), timeout=10)
    assert token.status_code == 200, token.text
    info = requests.get(dir_server.url + "/userinfo", headers={
        "Authorization": "Bearer " + token.json()["access_token"]}, timeout=10).json()
    assert info["sub"] == user.subject
    success = events(dir_server, user.id, "account:login:success")
    assert success and success[-1].details["amr"] == ["pwd"]


def test_wrong_password_refused_and_counted(dir_server, directory_user):
    user, _dn = directory_user()
    throttle = dir_server.services.login_account_throttle
    before = throttle.failures(user.login)
    response = person(dir_server).sign_in(user.login, user.password + "x")
    assert response.status_code == 401
    assert "The login or password is incorrect." in response.text
    assert throttle.failures(user.login) == before + 1
    assert account(dir_server, user.id).password_failures == 1
    assert events(dir_server, user.id, "account:login:failure")
    # The right password ends the run of failures (N13).
    browser = person(dir_server)
    assert browser.sign_in(user.login, user.password).status_code == 303
    assert signed_in_as(browser)
    assert account(dir_server, user.id).password_failures == 0


def test_consecutive_failure_limit_disables_a_directory_password(dir_server, directory_user):
    user, _dn = directory_user()
    limit = dir_server.services.settings.credential_max_failures
    with dir_server.services.db.transaction() as session:
        session.get(User, user.id).password_failures = limit - 1
    assert person(dir_server).sign_in(user.login, "wrong " + secrets.token_hex(3)).status_code == 401
    dir_server.services.login_account_throttle.reset(user.login)
    # N12: the right directory password of a disabled password is refused like a wrong one.
    response = person(dir_server).sign_in(user.login, user.password)
    assert response.status_code == 401
    assert events(dir_server, user.id, "account:credential:disabled")


def test_empty_password_never_binds_anonymously(dir_server, directory_user):
    # A simple bind with a DN and an empty password is an unauthenticated (anonymous)
    # bind that succeeds (RFC 4513 5.1.2): an empty password must never reach the directory.
    user, dn = directory_user()
    config = directory_config(dir_server.services.settings)
    assert ldap_client.check_password(config, dn, "") is False
    with dir_server.app.test_request_context():
        stored = dir_server.services.db.session.get(User, user.id)
        assert password_matches(stored, "") is False
        assert password_matches(stored, user.password) is True
        dir_server.services.db.remove()
    browser = person(dir_server)
    for empty in ("", " "):
        response = browser.submit(browser.get("/login"), "/login", login=user.login, password=empty)
        assert response.status_code in (400, 401)
        assert not signed_in_as(browser)


def test_changed_directory_password_takes_effect_at_once(dir_server, directory_user, slapd_server):
    user, dn = directory_user()
    assert person(dir_server).sign_in(user.login, user.password).status_code == 303
    new_password = "changed in the directory " + secrets.token_hex(3)
    slapd_server.modify(dn, userPassword=new_password)
    assert person(dir_server).sign_in(user.login, user.password).status_code == 401
    browser = person(dir_server)
    assert browser.sign_in(user.login, new_password).status_code == 303
    assert signed_in_as(browser)


def test_second_factor_is_still_asked(dir_server, directory_user):
    user, _dn = directory_user(two_factor=True)
    browser = person(dir_server)
    first = browser.submit(browser.get("/login"), "/login", login=user.login, password=user.password)
    assert first.status_code == 303 and first.headers["Location"].endswith("/login/second-factor")
    assert not signed_in_as(browser)
    done = browser.second_step(first, user.login)
    assert done.status_code == 303
    assert signed_in_as(browser)
    assert "otp" in events(dir_server, user.id, "account:login:success")[-1].details["amr"]


def test_restrictions_still_apply(dir_server, directory_user):
    user, _dn = directory_user()
    with dir_server.services.db.transaction() as session:
        session.add(Restriction(user_id=user.id, valid_until=datetime(2020, 1, 1), description="left the school"))
    browser = person(dir_server)
    response = browser.sign_in(user.login, user.password)
    assert response.status_code == 303 and response.headers["Location"].endswith("/login/refused")
    assert not signed_in_as(browser)


def test_required_password_change_never_blocks_a_directory_account(dir_server, directory_user):
    user, _dn = directory_user()
    with dir_server.services.db.transaction() as session:
        session.get(User, user.id).must_change_password = True
    browser = person(dir_server)
    response = browser.sign_in(user.login, user.password)
    assert response.status_code == 303
    assert "/password/change-required" not in response.headers["Location"]
    assert signed_in_as(browser)


def test_directory_down_is_said_clearly_and_local_accounts_keep_working(
    dir_server, directory_user, make_user, slapd_back
):
    user, _dn = directory_user()
    local = make_user()
    signed = person(dir_server)
    assert signed.sign_in(user.login, user.password).status_code == 303
    throttle = dir_server.services.login_account_throttle
    slapd_back.stop()
    try:
        response = person(dir_server).sign_in(user.login, user.password)
        assert response.status_code == 503
        assert DOWN_MESSAGE in alert_text(response)
        assert "local accounts are not affected" in alert_text(response)
        # Not a failed password: nothing counted against the account.
        assert throttle.failures(user.login) == 0
        assert account(dir_server, user.id).password_failures == 0
        down = [e for e in events(dir_server, user.id, "account:login:failure")
                if e.reason == "directory-unavailable"]
        assert down
        # Re-authentication says the same.
        page = signed.get("/login/reauth")
        reauth = signed.submit(page, "/login/reauth", password=user.password)
        assert reauth.status_code == 503
        assert DOWN_MESSAGE in alert_text(reauth)
        assert account(dir_server, user.id).password_failures == 0
        # A local account signs in meanwhile.
        other = person(dir_server)
        assert other.sign_in(local.login, local.password).status_code == 303
        assert signed_in_as(other)
    finally:
        slapd_back.start()
    again = person(dir_server)
    assert again.sign_in(user.login, user.password).status_code == 303
    assert signed_in_as(again)


def test_reauthentication_checks_the_directory_password(dir_server, directory_user):
    user, _dn = directory_user()
    browser = person(dir_server)
    assert browser.sign_in(user.login, user.password).status_code == 303
    wrong = browser.submit(browser.get("/login/reauth"), "/login/reauth", password="not it " + secrets.token_hex(2))
    assert wrong.status_code == 401
    right = browser.submit(browser.get("/login/reauth"), "/login/reauth", password=user.password)
    assert right.status_code == 303
    assert events(dir_server, user.id, "account:reauth:success")


def test_password_pages_refuse_a_directory_account(dir_server, directory_user):
    user, _dn = directory_user()
    browser = person(dir_server)
    assert browser.sign_in(user.login, user.password).status_code == 303
    home = browser.get("/")
    assert MANAGED_MESSAGE in html.unescape(home.text)
    assert 'href="/account/password"' not in home.text
    token = csrf_of(home)
    for refused in (browser.get("/account/password"),
                    browser.post("/account/password", data={"csrf_token": token, "current_password": user.password,
                                                            "password": "a brand new password 123",
                                                            "confirm": "a brand new password 123"})):
        assert refused.status_code == 403
        assert MANAGED_MESSAGE in html.unescape(refused.text)
    assert account(dir_server, user.id).password_hash is None


def test_forgot_password_sends_no_link_to_a_directory_account(dir_server, directory_user):
    address = f"dir-{secrets.token_hex(4)}@example.test"
    user, _dn = directory_user(email=address)
    with dir_server.services.db.transaction() as session:
        session.get(User, user.id).email_verified_at = datetime.now(UTC).replace(tzinfo=None)
    browser = person(dir_server)
    response = browser.submit(browser.get("/password/forgot"), "/password/forgot", login=user.login)
    assert response.status_code == 200
    with dir_server.services.db.transaction() as session:
        templates = list(session.scalars(select(OutboxMessage.template).where(OutboxMessage.to_address == address)))
    assert templates == ["password_reset_directory"]
    reasons = [e.reason for e in events(dir_server, user.id, "account:password:reset-requested")]
    assert reasons == ["directory-account"]


def test_no_activation_code_for_a_directory_account(dir_server, directory_user):
    user, _dn = directory_user()
    svc = dir_server.services
    actor = Actor(ref="cli:test", permissions={"support:credentials:reset"})
    with svc.db.transaction() as session:
        admin = AccountAdmin(db=session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)
        with pytest.raises(PasswordManagedByDirectory):
            admin.issue_activation_code(actor, session.get(User, user.id), "test")
    # A code left from before the account came from the directory does not set a password.
    raw = "ABCDEFGHJKMN"
    with svc.db.transaction() as session:
        session.add(ActivationCode(user_id=user.id, code_hash=svc.passwords.hash(raw),
                                   expires_at=datetime(2099, 1, 1), created_by="cli:test"))
    svc.redis.delete("throttle:activate:127.0.0.1")
    browser = person(dir_server)
    new = "river mountain apricot lamp"
    response = browser.submit(browser.get("/activate"), "/activate", login=user.login, code=raw,
                              password=new, confirm=new)
    assert response.status_code == 400
    assert account(dir_server, user.id).password_hash is None
    assert person(dir_server).sign_in(user.login, new).status_code == 401


def test_teacher_cannot_issue_a_code_for_a_directory_student(dir_server, directory_user, make_user):
    svc = dir_server.services
    name = "D" + secrets.token_hex(3).upper()
    teacher = make_user(roles=("teacher",))
    student, _dn = directory_user(roles=("student",))
    with svc.db.transaction() as session:
        school_class = SchoolClass(name=name)
        session.add(school_class)
        session.flush()
        for member in [session.get(User, teacher.id), session.get(User, student.id)]:
            assert member is not None
            member.classes.append(school_class)
        class_id = school_class.id
    browser = person(dir_server)
    assert browser.sign_in(teacher.login, teacher.password).status_code == 303
    page = browser.get(f"/teacher/classes/{class_id}")
    assert page.status_code == 200
    token = csrf_of(page)
    refused = browser.post(f"/teacher/students/{student.id}/activation-code", data={"csrf_token": token})
    assert refused.status_code == 409
    assert STAFF_MESSAGE in refused.text
    cards = browser.post(f"/teacher/classes/{class_id}/cards", data={"csrf_token": token})
    assert cards.status_code == 200
    with svc.db.transaction() as session:
        codes = session.scalars(select(ActivationCode).where(ActivationCode.user_id == student.id)).all()
    assert codes == []


def test_without_a_dn_or_a_configured_directory_no_password_works(server, dir_server, directory_user, caplog):
    user, _dn = directory_user()
    # The shared server has no directory configured (IDP_LDAP_URLS empty).
    on_plain = Browser(server.url)
    with caplog.at_level("WARNING", logger="darbaza.login"):
        assert on_plain.sign_in(user.login, user.password).status_code == 401
    assert "no school directory is configured" in caplog.text
    server.services.login_account_throttle.reset(user.login)
    with dir_server.services.db.transaction() as session:
        session.get(User, user.id).directory_dn = None
    with caplog.at_level("WARNING", logger="darbaza.login"):
        assert person(dir_server).sign_in(user.login, user.password).status_code == 401
    assert "has no directory DN" in caplog.text
    dir_server.services.login_account_throttle.reset(user.login)
