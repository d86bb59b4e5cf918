"""LDAP injection (issue 7): hostile logins, passwords, names and DNs never change what
the directory is asked, against a real OpenLDAP slapd. Filters are built only with
ldap3's ``escape_filter_chars`` (``connectors.ldap.client.equals_filter``); DNs come
from the directory (or ``escape_rdn``) and are bound as they are; a password is sent
only as the bind's credential. The sign-in page also keeps its timing equalisation: an
unknown login costs the same dummy argon2id verification as a real one."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator

import pytest
from ldap3.utils.conv import escape_filter_chars

from connectors.ldap import client as ldap_client
from connectors.ldap.config import directory_config
from idp.accounts.models import User
from idp.app import create_app
from tests.conftest import LiveServer, free_port, make_settings
from tests.helpers import Browser, UserInfo
from tests.ldap_server import GROUPS_DN, PEOPLE_DN, READER_DN, READER_PASSWORD, Slapd

HOSTILE = ["*", "*)(uid=*", "admin)(|(uid=*", "\\", "x\x00y", "*)(|(objectClass=*))", "(", ")", "\\2a"]


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
    def factory(*, uid: str | None = None, password: str | None = None) -> tuple[UserInfo, str]:
        uid = uid or f"inj-{secrets.token_hex(5)}"
        password = password or "directory secret " + secrets.token_hex(4)
        dn = slapd_server.add_person(uid, cn="Hostile Name", password=password)
        local = make_user(two_factor=False, login=f"i-{secrets.token_hex(5)}")
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


def signed_in(browser: Browser) -> bool:
    return browser.get("/").status_code == 200


# --- the filter builder ------------------------------------------------------------

@pytest.mark.parametrize("value, escaped", [
    ("*)(uid=*", "\\2a\\29\\28uid=\\2a"),
    ("\\", "\\5c"),
    ("x\x00y", "x\\00y"),
    ("admin)(|(uid=*", "admin\\29\\28|\\28uid=\\2a"),
    ("plain.login", "plain.login"),
])
def test_equals_filter_escapes_like_ldap3(value, escaped):
    built = ldap_client.equals_filter("uid", value)
    assert built == f"(uid={escaped})"
    assert built == f"(uid={escape_filter_chars(value)})"
    # Exactly one pair of parentheses: the value cannot open or close a filter.
    assert built.count("(") == 1 and built.count(")") == 1


def test_hostile_search_values_find_nothing_but_the_literal_entry(slapd_server, dir_server):
    ordinary = [slapd_server.add_person(f"inj-{secrets.token_hex(4)}", password="x" * 12) for _ in range(2)]
    literal_uid = f"lit-{secrets.token_hex(3)}*)(uid=*"
    literal_dn = slapd_server.add_person(literal_uid, password="y" * 12)
    CREATED.extend((0, dn) for dn in [*ordinary, literal_dn])
    config = directory_config(dir_server.services.settings)
    conn = ldap_client.service_connection(config)
    try:
        # The control: without escaping, the same text would match every person.
        everyone = list(ldap_client.paged_search(conn, PEOPLE_DN, "(uid=*)", ["uid"], 50))
        assert {dn.lower() for dn in ordinary} <= {dn.lower() for dn, _ in everyone}
        for value in HOSTILE:
            found = list(ldap_client.paged_search(conn, PEOPLE_DN, ldap_client.equals_filter("uid", value),
                                                  ["uid"], 50))
            assert found == [], (value, found)
        # The hostile text is only ever a value: the entry whose uid is literally it.
        found = list(ldap_client.paged_search(conn, PEOPLE_DN, ldap_client.equals_filter("uid", literal_uid),
                                              ["uid"], 50))
        assert len(found) == 1 and found[0][1]["uid"] == [literal_uid]
        assert found[0][0].lower().endswith(PEOPLE_DN) and literal_dn.lower().endswith(PEOPLE_DN)
    finally:
        conn.unbind()


# --- the sign-in page -----------------------------------------------------------------

@pytest.mark.parametrize("login", HOSTILE)
def test_hostile_logins_sign_no_one_in(dir_server, directory_user, login):
    directory_user()  # the directory and the database hold people a wildcard could match
    for password in ("*", "x", "anything at all"):
        browser = person(dir_server)
        response = browser.submit(browser.get("/login"), "/login", login=login, password=password)
        assert response.status_code in (400, 401), (login, response.status_code)
        assert not signed_in(browser)


def test_hostile_directory_password_signs_in(dir_server, directory_user):
    user, _dn = directory_user(password="*)(")
    browser = person(dir_server)
    assert browser.sign_in(user.login, user.password).status_code == 303
    assert signed_in(browser)
    for wrong in ("*", "*)(uid=*", "\\", "*)(\x00"):
        other = person(dir_server)
        assert other.sign_in(user.login, wrong).status_code in (400, 401)
        assert not signed_in(other)
    dir_server.services.login_account_throttle.reset(user.login)


@pytest.mark.parametrize("special", [",", "+", "\\", '"', "=", "<>;", "#"])
def test_dns_with_escaped_characters_bind(dir_server, directory_user, special):
    uid = f"odd{special}{secrets.token_hex(3)}"
    user, dn = directory_user(uid=uid)
    assert dn.count(",") >= 3  # uid=..., ou=people, dc=school, dc=test
    browser = person(dir_server)
    assert browser.sign_in(user.login, user.password).status_code == 303, dn
    assert signed_in(browser)
    wrong = person(dir_server)
    assert wrong.sign_in(user.login, user.password + "!").status_code == 401
    dir_server.services.login_account_throttle.reset(user.login)


def test_unknown_login_still_costs_a_dummy_argon2_verification(dir_server, directory_user, make_user, monkeypatch):
    svc = dir_server.services
    calls: list[str | None] = []
    real_verify = svc.passwords.verify

    def counting(stored: str | None, password: str) -> bool:
        calls.append(stored)
        return real_verify(stored, password)

    monkeypatch.setattr(svc.passwords, "verify", counting)
    user, _dn = directory_user()
    local = make_user()
    for login, password, expected in (
        (f"nobody-{secrets.token_hex(4)}", "some password", 401),
        ("*)(uid=*", "some password", 401),
        (user.login, "not the directory password", 401),
        (user.login, user.password, 303),
        (local.login, local.password, 303),
    ):
        calls.clear()
        browser = person(dir_server)
        response = browser.submit(browser.get("/login"), "/login", login=login, password=password)
        assert response.status_code == expected, login
        # One argon2id verification each: a dummy one (None) for an unknown login and a
        # directory account, the account's hash for a local one.
        assert len(calls) == 1, (login, calls)
        assert (calls[0] is None) == (login != local.login)
    svc.login_account_throttle.reset(user.login)
