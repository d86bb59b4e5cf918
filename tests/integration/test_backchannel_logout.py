"""OpenID Connect Back-Channel Logout 1.0 (checklist P12, BC1-BC2; ASVS 7.4.1, 7.4.2, 7.4.5,
10.5.5) end to end: a small portal app on loopback receives the logout tokens and checks
them the way the spec (§2.6) tells an app to — signature against the provider's JWKS,
``typ``, ``iss``, ``aud``, ``iat``, ``exp``, ``jti``, ``events``, ``sid``/``sub`` and no
``nonce`` — when a person signs out, when support ends their sessions or locks the
account; an app that was not used from the session hears nothing, and an app that is
down gets the logout once it is back. Delivery runs as the operator runs it
(``darbaza logout deliver``)."""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import select, update
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from idp.audit.models import AuditEvent
from idp.cli import main
from idp.oidc.models import BackchannelLogoutDelivery, Client
from tests.conftest import free_port
from tests.helpers import Browser, ClientInfo, UserInfo, decode_verified

EVENT = "http://schemas.openid.net/event/backchannel-logout"


# --- a portal app's back-channel logout endpoint -------------------------------------------
@dataclass
class Received:
    method: str
    path: str
    content_type: str
    form: dict[str, list[str]]


@dataclass
class LogoutReceiver:
    """An app's ``backchannel_logout_uri`` on loopback: keeps every request and answers
    ``status`` (§2.8: 200 when the logout succeeded)."""

    port: int = field(default_factory=free_port)
    status: int = 200
    # Sent as the Location header when set (a redirecting app).
    location: str | None = None
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server: Any = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/backchannel-logout"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        with self._lock:
            self.received.append(
                Received(request.method, request.path, request.mimetype, request.form.to_dict(flat=False))
            )
        response = Response(status=self.status, headers={"Cache-Control": "no-store"})
        if self.location:
            response.headers["Location"] = self.location
        return response(environ, start_response)

    def start(self) -> LogoutReceiver:
        self._server = make_server("127.0.0.1", self.port, self, threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def rp():  # type: ignore[no-untyped-def]
    receiver = LogoutReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(autouse=True)
def no_deliveries_left_behind(server):  # type: ignore[no-untyped-def]
    """A test's undelivered logout tokens must not reach the next test's app (should it get
    the same port): each test's left-over deliveries end with it."""
    yield
    with server.services.db.transaction() as session:
        session.execute(
            update(BackchannelLogoutDelivery)
            .where(BackchannelLogoutDelivery.status.in_(["pending", "sending"]))
            .values(status="failed", last_error="left over by a test")
        )


def verified_logout_token(server, received: Received, client_id: str) -> tuple[dict, dict]:
    """Check one back-channel logout request as an app must (§2.5, §2.6, ASVS 10.5.5);
    returns the token's header and claims."""
    assert received.method == "POST" and received.path == "/backchannel-logout"
    assert received.content_type == "application/x-www-form-urlencoded"
    assert list(received.form) == ["logout_token"] and len(received.form["logout_token"]) == 1
    token = received.form["logout_token"][0]
    jwks = requests.get(server.url + "/jwks.json", timeout=10).json()
    header, claims = decode_verified(token, jwks)  # the signature, against the published keys
    assert header["alg"] == "RS256" and header["typ"] == "logout+jwt"
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    now = time.time()
    assert claims["iss"] == server.services.settings.issuer
    assert claims["aud"] == client_id or (isinstance(claims["aud"], list) and client_id in claims["aud"])
    assert isinstance(claims["iat"], int) and now - 300 <= claims["iat"] <= now + 5
    assert isinstance(claims["exp"], int) and claims["iat"] < claims["exp"] <= claims["iat"] + 300
    assert claims["exp"] > now
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert claims["events"] == {EVENT: {}}
    assert "nonce" not in claims
    assert claims.get("sid") or claims.get("sub")
    return header, claims


# --- the provider's side -----------------------------------------------------------------------
def cli(server, *args: str, extra_env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """The ``darbaza`` command as an operator runs it (tests/integration/test_cli.py)."""
    settings = server.services.settings
    env = {
        "IDP_DATABASE_URL": settings.database_url,
        "IDP_REDIS_URL": settings.redis_url,
        "IDP_SECRET_KEY": settings.secret_key,
        "IDP_ISSUER": settings.issuer,
        "IDP_ARGON2_MEMORY_COST": str(settings.argon2_memory_cost),
        "IDP_ARGON2_TIME_COST": str(settings.argon2_time_cost),
        "IDP_KEY_CACHE_SECONDS": "1",
        **(extra_env or {}),
    }
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def deliver(server, *options: str, extra_env: dict[str, str] | None = None) -> str:
    return str(cli(server, "logout", "deliver", *options, extra_env=extra_env).output)


def app_with_logout_uri(make_client, uri: str | None, **kwargs: object) -> ClientInfo:
    return make_client(backchannel_logout_uri=uri, trusted=True, scopes=["openid", "profile"], **kwargs)


def use_app(server, browser: Browser, client: ClientInfo, user: UserInfo | None) -> dict[str, Any]:
    """Sign in to the app through ``browser`` (code flow with PKCE); the ID token's claims
    and the token response."""
    params, verifier, _ = browser.authorize(client, user, scope="openid profile")
    assert "code" in params, params
    response = requests.post(
        server.url + "/token",
        data={"grant_type": "authorization_code", "code": params["code"], "redirect_uri": client.redirect_uri,
              "code_verifier": verifier},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    tokens = response.json()
    jwks = requests.get(server.url + "/jwks.json", timeout=10).json()
    _header, claims = decode_verified(tokens["id_token"], jwks)
    assert claims["sid"]
    return {"id_token": claims, "raw_id_token": tokens["id_token"]}


def deliveries(server, client_id: str) -> list[BackchannelLogoutDelivery]:
    with server.services.db.transaction() as session:
        rows = list(
            session.scalars(
                select(BackchannelLogoutDelivery)
                .where(BackchannelLogoutDelivery.client_id == client_id)
                .order_by(BackchannelLogoutDelivery.id)
            )
        )
        for row in rows:
            session.expunge(row)
        return rows


def console(server, make_user, *roles: str) -> Browser:
    person = make_user(roles=roles)
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    assert browser.sign_in(person.login, person.password).status_code == 303
    return browser


def header_of(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))))


# --- discovery (BC1) -------------------------------------------------------------------------------
def test_discovery_advertises_back_channel_logout_with_sid(server):
    meta = requests.get(server.url + "/.well-known/openid-configuration", timeout=10).json()
    assert meta["backchannel_logout_supported"] is True
    assert meta["backchannel_logout_session_supported"] is True
    assert meta["end_session_endpoint"] == server.services.settings.issuer + "/end_session"


# --- who gets a logout token -----------------------------------------------------------------------
def test_sign_out_sends_the_app_a_valid_logout_token_for_that_session(server, browser, make_user, make_client, rp):
    user = make_user()
    client = app_with_logout_uri(make_client, rp.url)
    id_token = use_app(server, browser, client, user)["id_token"]

    page = browser.get("/")
    assert browser.submit(page, "/logout").status_code == 200
    # Queued with the sign-out itself; nothing is sent before the worker runs.
    [row] = deliveries(server, client.client_id)
    assert (row.status, row.attempts, row.sid) == ("pending", 0, id_token["sid"])
    assert rp.received == []

    assert "delivered" in deliver(server)
    [received] = rp.received
    header, claims = verified_logout_token(server, received, client.client_id)
    assert claims["sid"] == id_token["sid"] and claims["sub"] == id_token["sub"] == user.subject
    # Signed by the provider's current key.
    assert header["kid"] == server.services.keys.signing_key().kid
    [row] = deliveries(server, client.client_id)
    assert (row.status, row.attempts, row.last_error) == ("delivered", 1, None)
    assert row.delivered_at is not None
    # Delivered once: another pass sends nothing.
    deliver(server, "--retry-waiting")
    assert len(rp.received) == 1


def test_rp_initiated_logout_sends_the_logout_token(server, browser, make_user, make_client, rp):
    user = make_user()
    client = app_with_logout_uri(make_client, rp.url)
    signed_in = use_app(server, browser, client, user)

    ended = browser.get("/end_session", params={"id_token_hint": signed_in["raw_id_token"],
                                                "post_logout_redirect_uri": client.post_logout_redirect_uri,
                                                "state": "s1"})
    assert ended.status_code in (200, 302, 303)
    deliver(server)
    [received] = rp.received
    _header, claims = verified_logout_token(server, received, client.client_id)
    assert claims["sid"] == signed_in["id_token"]["sid"]


def test_support_ending_the_sessions_in_the_console_sends_logout_tokens(server, make_user, make_client, rp):
    person = make_user()
    client = app_with_logout_uri(make_client, rp.url)
    first, second = Browser(server.url), Browser(server.url)
    sids = {use_app(server, b, client, person)["id_token"]["sid"] for b in (first, second)}
    assert len(sids) == 2

    support = console(server, make_user, "tech_support")
    form = support.get(f"/admin/accounts/{person.id}/sessions/end")
    done = support.submit(form, "/sessions/end", confirm_login=person.login, reason="Lost phone")
    assert done.status_code == 303
    deliver(server)
    claims = [verified_logout_token(server, r, client.client_id)[1] for r in rp.received]
    # One logout token per ended session, each naming its own session.
    assert sorted(c["sid"] for c in claims) == sorted(sids)
    assert {c["sub"] for c in claims} == {person.subject}
    assert len({c["jti"] for c in claims}) == 2


def test_locking_the_account_sends_logout_tokens(server, browser, make_user, make_client, rp):
    person = make_user()
    client = app_with_logout_uri(make_client, rp.url)
    sid = use_app(server, browser, client, person)["id_token"]["sid"]

    support = console(server, make_user, "tech_support")
    form = support.get(f"/admin/accounts/{person.id}/lock")
    done = support.submit(form, "/lock", confirm_login=person.login, reason="Shared the password " + secrets.token_hex(2))
    assert done.status_code == 303
    deliver(server)
    [received] = rp.received
    _header, claims = verified_logout_token(server, received, client.client_id)
    assert (claims["sid"], claims["sub"]) == (sid, person.subject)


def test_only_the_apps_used_from_the_ended_session_are_told(server, make_user, make_client):
    person = make_user()
    receivers = {name: LogoutReceiver().start() for name in ("used", "other_session", "never", "no_sid")}
    try:
        used = app_with_logout_uri(make_client, receivers["used"].url)
        other = app_with_logout_uri(make_client, receivers["other_session"].url)
        never = app_with_logout_uri(make_client, receivers["never"].url)
        # An app without a logout URI is used too; it simply gets nothing.
        plain = app_with_logout_uri(make_client, None)
        # An app that does not need the sid gets one all the same (the session is known).
        no_sid = app_with_logout_uri(make_client, receivers["no_sid"].url,
                                     backchannel_logout_session_required=False)
        laptop, phone = Browser(server.url), Browser(server.url)
        sid = use_app(server, laptop, used, person)["id_token"]["sid"]
        use_app(server, laptop, plain, None)
        use_app(server, laptop, no_sid, None)
        use_app(server, phone, other, person)  # the person's other session stays

        assert laptop.submit(laptop.get("/"), "/logout").status_code == 200
        deliver(server)
        assert [verified_logout_token(server, r, used.client_id)[1]["sid"] for r in receivers["used"].received] == [sid]
        assert [verified_logout_token(server, r, no_sid.client_id)[1]["sid"]
                for r in receivers["no_sid"].received] == [sid]
        assert receivers["other_session"].received == [] and receivers["never"].received == []
        assert deliveries(server, other.client_id) == [] and deliveries(server, never.client_id) == []
        assert deliveries(server, plain.client_id) == []
        assert phone.get("/").status_code == 200
    finally:
        for receiver in receivers.values():
            receiver.stop()


def test_a_switched_off_app_is_not_told(server, browser, make_user, make_client, rp):
    person = make_user()
    client = app_with_logout_uri(make_client, rp.url)
    use_app(server, browser, client, person)
    with server.services.db.transaction() as session:
        session.scalar(select(Client).where(Client.client_id == client.client_id)).active = False
    assert browser.submit(browser.get("/"), "/logout").status_code == 200
    assert deliveries(server, client.client_id) == []


# --- delivery: retries, backoff, failure ------------------------------------------------------------
def test_an_app_that_is_down_gets_the_logout_when_it_is_back(server, browser, make_user, make_client):
    person = make_user()
    receiver = LogoutReceiver()  # not started: the app is down
    client = app_with_logout_uri(make_client, receiver.url)
    sid = use_app(server, browser, client, person)["id_token"]["sid"]
    assert browser.submit(browser.get("/"), "/logout").status_code == 200

    deliver(server)
    [row] = deliveries(server, client.client_id)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error and "Connection" in row.last_error
    first_token = row.logout_token
    # It waits out its backoff: a pass now does not try again.
    deliver(server)
    [row] = deliveries(server, client.client_id)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.next_attempt_at > row.created_at

    receiver.start()
    try:
        deliver(server, "--retry-waiting")
        [received] = receiver.received
        _header, claims = verified_logout_token(server, received, client.client_id)
        assert claims["sid"] == sid
        # A retry carries a freshly minted token (the first may have expired meanwhile).
        sent = received.form["logout_token"][0]
        assert sent != first_token
        [row] = deliveries(server, client.client_id)
        assert (row.status, row.attempts, row.logout_token) == ("delivered", 2, sent)
    finally:
        receiver.stop()


def test_an_app_that_keeps_refusing_fails_after_the_last_attempt_and_is_journaled(
    server, browser, make_user, make_client, rp
):
    rp.status = 500
    person = make_user()
    client = app_with_logout_uri(make_client, rp.url)
    use_app(server, browser, client, person)
    assert browser.submit(browser.get("/"), "/logout").status_code == 200

    limit = {"IDP_BACKCHANNEL_MAX_ATTEMPTS": "2"}
    deliver(server, extra_env=limit)
    [row] = deliveries(server, client.client_id)
    assert (row.status, row.attempts) == ("pending", 1) and "HTTP 500" in (row.last_error or "")
    deliver(server, "--retry-waiting", extra_env=limit)
    [row] = deliveries(server, client.client_id)
    assert (row.status, row.attempts) == ("failed", 2)
    assert len(rp.received) == 2
    deliver(server, "--retry-waiting", extra_env=limit)
    assert len(rp.received) == 2  # a failed delivery is not tried again
    with server.services.db.transaction() as session:
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "oidc:backchannel:failed",
                                                               AuditEvent.subject == f"user:{person.id}")))
        assert len(events) == 1
        assert events[0].details["client_id"] == client.client_id and "500" in (events[0].reason or "")


def test_redirects_are_not_followed(server, browser, make_user, make_client):
    """The token goes to the registered URI only, never where a redirect points."""
    person = make_user()
    target = LogoutReceiver().start()
    redirecting = LogoutReceiver(status=307, location=target.url)
    redirecting.start()
    try:
        client = app_with_logout_uri(make_client, redirecting.url)
        use_app(server, browser, client, person)
        assert browser.submit(browser.get("/"), "/logout").status_code == 200
        deliver(server)
        assert len(redirecting.received) == 1 and target.received == []
        assert "HTTP 307" in (deliveries(server, client.client_id)[0].last_error or "")
    finally:
        target.stop()
        redirecting.stop()


def test_logout_tokens_are_signed_with_the_current_key_after_rotation(server, browser, make_user, make_client, rp):
    person = make_user()
    client = app_with_logout_uri(make_client, rp.url)
    use_app(server, browser, client, person)
    rotated = cli(server, "keys", "rotate")
    new_kid = rotated.output.split()[-1]
    time.sleep(1.2)  # the provider re-reads its keys within key_cache_seconds (1 s in tests)
    assert browser.submit(browser.get("/"), "/logout").status_code == 200
    [row] = deliveries(server, client.client_id)
    assert header_of(row.logout_token)["kid"] == new_kid
    deliver(server)
    [received] = rp.received
    header, _claims = verified_logout_token(server, received, client.client_id)
    assert header["kid"] == new_kid


# --- registering the URI ----------------------------------------------------------------------------
def test_cli_registers_the_uri_and_refuses_a_plain_http_one(server):
    good = cli(server, "clients", "create", "Journal", "--redirect-uri", "https://journal.example.test/cb",
               "--backchannel-logout-uri", "https://journal.example.test/bc?tenant=7",
               "--no-backchannel-logout-session-required")
    client_id = json.loads(good.output)["client_id"]
    with server.services.db.transaction() as session:
        stored = session.scalar(select(Client).where(Client.client_id == client_id))
        assert stored.backchannel_logout_uri == "https://journal.example.test/bc?tenant=7"
        assert stored.backchannel_logout_session_required is False
    settings = server.services.settings
    for bad in ("http://journal.example.test/bc", "https://journal.example.test/bc#frag", "ftp://journal.example.test/bc",
                "/relative/bc"):
        result = CliRunner().invoke(
            main, ["clients", "create", "Bad", "--redirect-uri", "https://journal.example.test/cb",
                   "--backchannel-logout-uri", bad],
            env={"IDP_DATABASE_URL": settings.database_url, "IDP_REDIS_URL": settings.redis_url,
                 "IDP_SECRET_KEY": settings.secret_key, "IDP_ISSUER": settings.issuer},
        )
        assert result.exit_code != 0 and "back-channel logout URI" in result.output, bad


def test_console_registers_the_uri_with_the_sid_choice_and_the_api_shows_it(server, make_user):
    admin = console(server, make_user, "school_admin")
    page = admin.get("/admin/apps/new")
    assert 'name="backchannel_logout_session_required" value="y" checked' in page.text  # on by default
    csrf = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text).group(1)
    name = "Library " + secrets.token_hex(3)
    form = {"csrf_token": csrf, "name": name, "redirect_uris": "https://library.example.test/cb",
            "backchannel_logout_uri": "https://library.example.test/backchannel", "scopes": ["openid"],
            "grant_types": ["authorization_code"], "auth_method": "client_secret_basic"}
    bad = admin.post("/admin/apps/new", data={**form, "backchannel_logout_uri": "https://library.example.test/b#x"})
    assert bad.status_code == 200 and 'class="error"' in bad.text
    assert admin.post("/admin/apps/new", data=form).status_code == 303  # the box left unticked
    with server.services.db.transaction() as session:
        stored = session.scalar(select(Client).where(Client.name == name))
        assert stored.backchannel_logout_uri == "https://library.example.test/backchannel"
        assert stored.backchannel_logout_session_required is False
        client_id = stored.client_id
    edit = admin.get(f"/admin/apps/{client_id}/edit")
    assert 'name="backchannel_logout_session_required" value="y">' in edit.text
    csrf = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', edit.text).group(1)
    saved = admin.post(f"/admin/apps/{client_id}/edit", data={**form, "csrf_token": csrf,
                                                             "backchannel_logout_session_required": "y"})
    assert saved.status_code == 303
    with server.services.db.transaction() as session:
        assert session.scalar(select(Client).where(Client.client_id == client_id)).backchannel_logout_session_required

    # The admin API (a machine client with clients:read) shows both.
    api_client = cli(server, "clients", "create", "Inventory", "--grant", "client_credentials", "--scope", "clients:read")
    creds = json.loads(api_client.output)
    token = requests.post(server.url + "/token", data={"grant_type": "client_credentials"},
                          auth=(creds["client_id"], creds["client_secret"]), timeout=10).json()["access_token"]
    listed = requests.get(server.url + "/admin/api/v1/clients", headers={"Authorization": "Bearer " + token},
                          timeout=10)
    assert listed.status_code == 200, listed.text
    [item] = [c for c in listed.json()["items"] if c["client_id"] == client_id]
    assert item["backchannel_logout_uri"] == "https://library.example.test/backchannel"
    assert item["backchannel_logout_session_required"] is True


# --- the worker ----------------------------------------------------------------------------------------
def test_the_worker_schedules_and_runs_the_delivery_job(server, browser, make_user, make_client, rp, monkeypatch):
    from redis import Redis
    from rq import Queue
    from rq.utils import import_attribute

    from idp.worker import DELIVER_BACKCHANNEL_JOB, DELIVER_OUTBOX_JOB, schedule_deliveries

    settings = server.services.settings
    redis = Redis.from_url(settings.redis_url)
    queue = Queue("test-" + secrets.token_hex(4), connection=redis)
    for key in ("darbaza:worker:outbox-scheduled", "darbaza:worker:backchannel-scheduled"):
        redis.delete(key)
    # One worker of many queues each delivery job once per interval.
    assert sorted(schedule_deliveries(redis, queue, 30)) == sorted([DELIVER_OUTBOX_JOB, DELIVER_BACKCHANNEL_JOB])
    assert schedule_deliveries(redis, queue, 30) == []
    assert sorted(job.func_name for job in queue.jobs) == sorted([DELIVER_OUTBOX_JOB, DELIVER_BACKCHANNEL_JOB])
    queue.empty()

    person = make_user()
    client = app_with_logout_uri(make_client, rp.url)
    sid = use_app(server, browser, client, person)["id_token"]["sid"]
    assert browser.submit(browser.get("/"), "/logout").status_code == 200
    # The job as RQ runs it: settings from the environment, its own database engine.
    for name, value in {"IDP_DATABASE_URL": settings.database_url, "IDP_REDIS_URL": settings.redis_url,
                        "IDP_SECRET_KEY": settings.secret_key, "IDP_ISSUER": settings.issuer}.items():
        monkeypatch.setenv(name, value)
    report = import_attribute(DELIVER_BACKCHANNEL_JOB)()
    assert report["delivered"] >= 1
    [received] = rp.received
    assert verified_logout_token(server, received, client.client_id)[1]["sid"] == sid
