"""The admin REST API at /admin/api/v1: machine clients with client-credentials tokens
whose scopes are permissions; the console's operations as JSON; every write journaled
with the actor client:<client_id>; errors as JSON, never HTML, never 5xx."""

from __future__ import annotations

import secrets

import pytest
import requests

from idp.access.permissions import PERMISSIONS
from idp.oidc.clients import ClientError, create_client, update_client
from idp.oidc.models import Client
from tests.helpers import ClientInfo

API = "/admin/api/v1"
ALL_SCOPES = sorted(PERMISSIONS)


def machine_client(make_client, scopes):  # type: ignore[no-untyped-def]
    return make_client(grant_types=["client_credentials"], scopes=list(scopes), redirect_uris=[],
                       post_logout_redirect_uris=[], name="School IT script")


def token_for(server, client: ClientInfo, scope: str | None = None) -> str:  # type: ignore[no-untyped-def]
    data = {"grant_type": "client_credentials"}
    if scope:
        data["scope"] = scope
    response = requests.post(server.url + "/token", data=data, auth=(client.client_id, client.client_secret), timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


class Api:
    """A script calling the API with one bearer token."""

    def __init__(self, base: str, token: str | None) -> None:
        self.base = base + API
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kw):  # type: ignore[no-untyped-def]
        response = self.http.request(method, self.base + path, timeout=15, allow_redirects=False, **kw)
        assert response.status_code < 500, response.text
        assert response.headers["Content-Type"].startswith("application/json"), response.text[:300]
        return response

    def get(self, path: str, **kw):  # type: ignore[no-untyped-def]
        return self.call("GET", path, **kw)

    def post(self, path: str, **kw):  # type: ignore[no-untyped-def]
        return self.call("POST", path, **kw)


@pytest.fixture
def admin(server, make_client):  # type: ignore[no-untyped-def]
    """A script with every admin scope."""
    client = machine_client(make_client, ALL_SCOPES)
    api = Api(server.url, token_for(server, client))
    api.client_id = client.client_id  # type: ignore[attr-defined]
    return api


def journal(api: Api, **filters: str) -> list[dict]:  # type: ignore[type-arg]
    response = api.get("/audit", params={"per_page": "200", **filters})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


# --- registration: admin scopes for machine clients only --------------------------------------
def test_admin_scopes_only_for_client_credentials_only_clients(server):
    svc = server.services
    with svc.db.transaction() as session:
        with pytest.raises(ClientError):
            create_client(session, name="Mixed", redirect_uris=["https://rp.example.test/cb"],
                          grant_types=["authorization_code", "client_credentials"], scopes=["admin:users:read"])
        with pytest.raises(ClientError):
            create_client(session, name="Web", redirect_uris=["https://rp.example.test/cb"],
                          grant_types=["authorization_code"], scopes=["openid", "audit:read"])
        client, _secret = create_client(session, name="Script", redirect_uris=[],
                                        grant_types=["client_credentials"], scopes=["admin:users:read"])
        # Adding a user flow later while keeping the admin scope is refused too.
        with pytest.raises(ClientError):
            update_client(session, client, name="Script", redirect_uris=["https://rp.example.test/cb"],
                          post_logout_redirect_uris=[], backchannel_logout_uri=None,
                          grant_types=["client_credentials", "authorization_code"], scopes=["admin:users:read"],
                          trusted=False, allowed_roles=[], role_map={})
        changes = update_client(session, client, name="Script v2", redirect_uris=[], post_logout_redirect_uris=[],
                                backchannel_logout_uri=None, grant_types=["client_credentials"],
                                scopes=["admin:users:read", "audit:read"], trusted=False, allowed_roles=[],
                                role_map={})
        assert changes["scopes"][1] == ["admin:users:read", "audit:read"]


def test_user_flows_still_refuse_admin_scopes(server, browser, make_user, make_client):
    user, web_app = make_user(), make_client(trusted=True)
    params, _verifier, _ = browser.authorize(web_app, user, scope="openid admin:users:read")
    assert params.get("error") == "invalid_scope"
    assert "code" not in params
    # Even a web app that somehow holds an admin scope (written straight into the
    # database) cannot have it granted in a user flow: authorize knows only user scopes.
    from sqlalchemy import select

    with server.services.db.transaction() as session:
        row = session.scalar(select(Client).where(Client.client_id == web_app.client_id))
        row.scopes = [*row.scopes, "admin:users:read"]
    params, _verifier, _ = browser.authorize(web_app, user, scope="openid admin:users:read")
    assert params.get("error") == "invalid_scope"
    assert "code" not in params


def test_token_scope_can_be_narrowed_and_is_checked(server, make_client):
    client = machine_client(make_client, ["admin:users:read", "audit:read"])
    narrow = Api(server.url, token_for(server, client, scope="audit:read"))
    denied = narrow.get("/users")
    assert denied.status_code == 403
    assert denied.json()["error"] == "insufficient_scope"
    assert denied.json()["permission"] == "admin:users:read"
    assert 'error="insufficient_scope"' in denied.headers["WWW-Authenticate"]
    assert narrow.get("/audit").status_code == 200
    refused = requests.post(server.url + "/token", data={"grant_type": "client_credentials", "scope": "clients:read"},
                            auth=(client.client_id, client.client_secret), timeout=10)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"


# --- authentication ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/users", "/users/1", "/roles", "/classes", "/clients", "/audit"])
def test_no_token_is_401_with_a_bearer_challenge(server, path):
    response = Api(server.url, None).get(path)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"] == "missing_token"
    assert response.json()["message"]


@pytest.mark.parametrize("header", ["Bearer", "Bearer not-a-token", "Basic dXNlcjpwYXNz",
                                    "Bearer eyJhbGciOiJub25lIn0.e30.", "Bearer " + "W" * 9000])
def test_bad_tokens_are_401(server, header):
    response = requests.get(server.url + API + "/users", headers={"Authorization": header}, timeout=10)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"] in {"missing_token", "invalid_token"}


def test_revoked_token_is_401(server, make_client):
    client = machine_client(make_client, ["admin:users:read"])
    token = token_for(server, client)
    api = Api(server.url, token)
    assert api.get("/users").status_code == 200
    revoked = requests.post(server.url + "/revoke", data={"token": token},
                            auth=(client.client_id, client.client_secret), timeout=10)
    assert revoked.status_code == 200
    after = api.get("/users")
    assert after.status_code == 401
    assert after.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in after.headers["WWW-Authenticate"]


def test_deactivated_client_and_removed_scope_stop_working(server, make_client):
    client = machine_client(make_client, ["admin:users:read", "audit:read"])
    api = Api(server.url, token_for(server, client))
    from sqlalchemy import select

    with server.services.db.transaction() as session:
        row = session.scalar(select(Client).where(Client.client_id == client.client_id))
        row.scopes = ["audit:read"]
    assert api.get("/users").status_code == 403
    assert api.get("/audit").status_code == 200
    with server.services.db.transaction() as session:
        session.scalar(select(Client).where(Client.client_id == client.client_id)).active = False
    assert api.get("/audit").status_code == 401


def test_a_persons_token_is_refused(server, browser, make_user, make_client):
    user = make_user(roles=("security_officer",))
    web_app = make_client(trusted=True)
    params, verifier, _ = browser.authorize(web_app, user, scope="openid profile")
    token = requests.post(server.url + "/token", data={
        "grant_type": "authorization_code", "code": params["code"], "redirect_uri": web_app.redirect_uri,
        "code_verifier": verifier,
    }, auth=(web_app.client_id, web_app.client_secret), timeout=10).json()["access_token"]
    response = Api(server.url, token).get("/audit")
    assert response.status_code == 401


# --- the operations -----------------------------------------------------------------------------
def test_accounts_walkthrough_is_journaled_as_the_client(server, admin, make_user, browser):
    actor = f"client:{admin.client_id}"
    class_name = "T" + secrets.token_hex(3).upper()
    created_class = admin.post("/classes", json={"name": class_name.lower()})
    assert created_class.status_code == 201, created_class.text
    assert created_class.json() == {"name": class_name, "members": 0, "created_at": created_class.json()["created_at"]}
    assert admin.post("/classes", json={"name": class_name}).status_code == 409
    assert class_name in [c["name"] for c in admin.get("/classes").json()["items"]]

    login = "api-" + secrets.token_hex(4)
    created = admin.post("/users", json={"login": login.upper(), "display_name": "Айгүл Асанова",
                                         "email": "aigul@example.test", "locale": "ky", "roles": ["student"],
                                         "classes": [class_name]})
    assert created.status_code == 201, created.text
    person = created.json()
    assert person["login"] == login and person["roles"] == ["student"] and person["classes"] == [class_name]
    assert created.headers["Location"].endswith(f"{API}/users/{person['id']}")
    assert admin.post("/users", json={"login": login, "display_name": "Again"}).status_code == 409
    user_id = person["id"]

    fetched = admin.get(f"/users/{user_id}")
    assert fetched.status_code == 200 and fetched.json()["display_name"] == "Айгүл Асанова"
    listed = admin.get("/users", params={"q": login, "role": "student", "class": class_name, "state": "active"})
    assert [u["id"] for u in listed.json()["items"]] == [user_id]
    assert admin.get("/users", params={"q": login, "state": "locked"}).json()["total"] == 0

    patched = admin.call("PATCH", f"/users/{user_id}", json={"display_name": "Aigul Asanova", "email": None})
    assert patched.status_code == 200, patched.text
    assert patched.json()["display_name"] == "Aigul Asanova" and patched.json()["email"] is None
    assert patched.json()["locale"] == "ky"  # not sent, not changed

    roles = admin.call("PUT", f"/users/{user_id}/roles", json={"roles": ["student", "parent"]})
    assert roles.status_code == 200 and roles.json()["roles"] == ["parent", "student"]

    code = admin.post(f"/users/{user_id}/activation-code", json={"reason": "new pupil"})
    assert code.status_code == 200, code.text
    assert len(code.json()["code"]) == 14 and code.headers["Cache-Control"] == "no-store"

    # The person signs in in a browser; locking through the API ends that session.
    someone = make_user(roles=("student",))
    browser.sign_in(someone.login, someone.password)
    assert browser.get("/").status_code == 200
    locked = admin.post(f"/users/{someone.id}/lock", json={"reason": "reported compromised"})
    assert locked.status_code == 200, locked.text
    assert locked.json()["user"]["locked"] is True and locked.json()["sessions_ended"] >= 1
    assert browser.get("/").status_code == 302
    refused = admin.post(f"/users/{someone.id}/activation-code", json={})
    assert refused.status_code == 409 and refused.json()["error"] == "account_locked"
    unlocked = admin.post(f"/users/{someone.id}/unlock", json={"reason": "password changed with support"})
    assert unlocked.status_code == 200 and unlocked.json()["user"]["locked"] is False
    ended = admin.post(f"/users/{someone.id}/sessions/end", json={"reason": "lost phone"})
    assert ended.status_code == 200 and ended.json()["sessions_ended"] == 0

    events = journal(admin, actor=actor)
    actions = {(e["action"], e["subject"]) for e in events}
    assert ("class:create", f"class:{class_name}") in actions
    for action in ("account:create", "account:update", "account:roles", "account:activation-code:issue"):
        assert (action, f"user:{user_id}") in actions, action
    for action in ("account:lock", "account:unlock", "account:sessions:end"):
        assert (action, f"user:{someone.id}") in actions, action
    lock_event = next(e for e in events if e["action"] == "account:lock")
    assert lock_event["reason"] == "reported compromised" and lock_event["ip"] == "127.0.0.1"
    assert lock_event["request_id"] and lock_event["hash"] and lock_event["prev_hash"]


def test_listing_roles_clients_and_paging(server, admin, make_user):
    roles = admin.get("/roles").json()["items"]
    officer = next(r for r in roles if r["name"] == "security_officer")
    assert "audit:read" in officer["permissions"] and officer["builtin"] is True
    clients = admin.get("/clients").json()["items"]
    mine = next(c for c in clients if c["client_id"] == admin.client_id)
    assert "audit:read" in mine["scopes"] and not [k for k in mine if "secret" in k or "hash" in k]
    prefix = "pg-" + secrets.token_hex(3)
    for i in range(3):
        make_user(login=f"{prefix}-{i}")
    first = admin.get("/users", params={"q": prefix, "per_page": "2"}).json()
    second = admin.get("/users", params={"q": prefix, "per_page": "2", "page": "2"}).json()
    assert first["total"] == 3 and first["pages"] == 2 and len(first["items"]) == 2
    assert [u["login"] for u in first["items"] + second["items"]] == [f"{prefix}-{i}" for i in range(3)]


def test_role_escalation_is_refused(server, make_client, make_user):
    # A script that may assign roles but does not hold tech support's permissions.
    client = machine_client(make_client, ["admin:users:read", "admin:roles:assign"])
    api = Api(server.url, token_for(server, client))
    person = make_user(roles=("student",))
    response = api.call("PUT", f"/users/{person.id}/roles", json={"roles": ["tech_support"]})
    assert response.status_code == 403 and response.json()["error"] == "insufficient_scope"
    assert api.call("PUT", f"/users/{person.id}/roles", json={"roles": ["teacher"]}).status_code == 200


def test_no_activation_code_for_an_account_that_outranks_the_script(server, make_client, make_user):
    # A support script (tech support's scopes) cannot take over a school admin's account.
    client = machine_client(make_client, ["admin:users:read", "support:credentials:reset"])
    api = Api(server.url, token_for(server, client))
    chief = make_user(roles=("school_admin",))
    refused = api.post(f"/users/{chief.id}/activation-code", json={"reason": "forgot password"})
    assert refused.status_code == 403 and refused.json()["error"] == "account_outranks_caller"
    assert "admin:users:write" in refused.json()["message"]
    pupil = make_user(roles=("student",))
    assert api.post(f"/users/{pupil.id}/activation-code", json={"reason": "forgot password"}).status_code == 200


def test_audit_route_filters(server, admin, make_user):
    person = make_user()
    admin.post(f"/users/{person.id}/sessions/end", json={"reason": "filter check"})
    rows = journal(admin, subject=person.login, action="account:sessions")
    assert [r["action"] for r in rows] == ["account:sessions:end"]
    assert rows[0]["subject"] == f"user:{person.id}"
    assert journal(admin, subject=person.login, **{"from": "2999-01-01"}) == []
    bad = admin.get("/audit", params={"from": "yesterday"})
    assert bad.status_code == 400 and bad.json()["field"] == "from"


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "headers", "status", "error"),
    [
        ("{not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
        ("", {"Content-Type": "application/json"}, 400, "invalid_json"),
        ("[1, 2]", {"Content-Type": "application/json"}, 400, "invalid_json"),
        ('"reason"', {"Content-Type": "application/json"}, 400, "invalid_json"),
        ("reason=x", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "invalid_json"),
        (b"\xff\xfe\x00{", {"Content-Type": "application/json"}, 400, "invalid_json"),
        ("[" * 100_000 + "]" * 100_000, {"Content-Type": "application/json"}, 400, "invalid_json"),
        ('{"reason": 5}', {"Content-Type": "application/json"}, 422, "invalid_field"),
        ('{"reason": ["a"]}', {"Content-Type": "application/json"}, 422, "invalid_field"),
        ('{"reason": ""}', {"Content-Type": "application/json"}, 422, "invalid_field"),
        ('{"reason": "ok", "force": true}', {"Content-Type": "application/json"}, 422, "invalid_field"),
        ("{}", {"Content-Type": "application/json"}, 422, "invalid_field"),
        ('{"reason": "a\\u0000b"}', {"Content-Type": "application/json"}, 422, "invalid_field"),
        ('{"reason": "\\ud800"}', {"Content-Type": "application/json"}, 422, "invalid_field"),
        ('{"reason": "' + "x" * 1001 + '"}', {"Content-Type": "application/json"}, 422, "invalid_field"),
    ],
)
def test_malformed_bodies_are_json_errors(server, admin, make_user, data, headers, status, error):
    person = make_user()
    response = admin.post(f"/users/{person.id}/lock", data=data, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["message"]
    assert admin.get(f"/users/{person.id}").json()["locked"] is False


@pytest.mark.parametrize(
    "body",
    [
        {"login": 12, "display_name": "X"},
        {"login": "ok-login", "display_name": "X", "roles": "student"},
        {"login": "ok-login", "display_name": "X", "roles": [None]},
        {"login": "ok-login", "display_name": "X", "locale": "de"},
        {"login": "ok-login", "display_name": "X" * 256},
        {"login": "ok-login"},
        {"login": "no spaces allowed", "display_name": "X"},
        {"login": "ok-login", "display_name": "X", "roles": ["no-such-role"]},
        {"login": "ok-login", "display_name": "X", "classes": ["NO-SUCH-CLASS"]},
        {"login": "ok-login", "display_name": "X", "email": "not an address"},
        {"login": "ok-login", "display_name": "   "},
    ],
)
def test_bad_account_fields_are_422(server, admin, body):
    response = admin.post("/users", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] in {"invalid_field", "invalid_value"}
    assert admin.get("/users", params={"q": "ok-login"}).json()["total"] == 0


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/users", {"per_page": "201"}),
        ("/users", {"per_page": "0"}),
        ("/users", {"page": "abc"}),
        ("/users", {"page": "-1"}),
        ("/users", {"page": "99999999999999999999"}),
        ("/users", {"state": "asleep"}),
        ("/users", {"q": "x" * 101}),
        ("/users", {"role": "a\x00b"}),
        ("/audit", {"to": "2024-02-30"}),
        ("/audit", {"from": "2024-05-02", "to": "2024-05-01"}),
        ("/audit", {"actor": "x" * 5000}),
        ("/audit", {"per_page": "1000"}),
    ],
)
def test_bad_query_parameters_are_400(server, admin, path, params):
    response = admin.get(path, params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_parameter" and response.json()["field"]


def test_unknown_resources_and_methods_are_json(server, admin):
    assert admin.get("/users/999999999").json()["error"] == "not_found"
    assert admin.get("/users/99999999999999").status_code == 404
    assert admin.get("/users/-3").status_code == 404
    assert admin.get("/nothing/here").json()["error"] == "not_found"
    wrong = admin.call("DELETE", "/users")
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
    assert set(wrong.headers["Allow"].split(", ")) == {"GET", "POST"}
    # No CSRF token is asked for: the bearer token authenticates the script.
    assert admin.post("/classes", json={"name": "Z" + secrets.token_hex(3)}).status_code == 201
    # Outside /v1 (another version, the bare prefix): the same Error schema, not the
    # protocol endpoints' error_description.
    for path in ("/admin/api/v2/users", "/admin/api/", "/admin/api/v1x"):
        answer = requests.get(server.url + path, timeout=10)
        assert answer.status_code == 404, path
        assert answer.json()["error"] == "not_found" and answer.json()["message"], (path, answer.text)
        assert "error_description" not in answer.json()
