"""Portal apps in the console (policy 2.4): register, show the secret once, edit, rotate
the secret, switch off and on; the app_roles claim and allowed roles end to end."""

from __future__ import annotations

import html
import re
import secrets

import pytest
import requests
from sqlalchemy import select

from idp.access.roles import create_role
from idp.audit.models import AuditEvent
from idp.oidc.models import AccessToken, Client
from tests.helpers import Browser, ClientInfo, decode_verified

# --- helpers ---------------------------------------------------------------------------------


def csrf_of(page: requests.Response) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
    assert match, page.text[:2000]
    return match.group(1)


def console(server, make_user, *roles: str) -> Browser:
    """A browser signed in (in English) as a new account holding ``roles``."""
    user = make_user(roles=roles)
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    signed_in = browser.sign_in(user.login, user.password)
    assert signed_in.status_code in (302, 303), signed_in.text[:500]
    return browser


def register_form(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "Journal " + secrets.token_hex(4),
        "redirect_uris": "https://journal.example.test/cb",
        "post_logout_redirect_uris": "https://journal.example.test/bye",
        "backchannel_logout_uri": "",
        "scopes": ["openid", "profile", "roles"],
        "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
        "auth_method": "client_secret_basic",
        "role_map": "",
    }
    data.update(overrides)
    return data


def register(browser: Browser, **overrides: object) -> tuple[requests.Response, dict[str, object]]:
    page = browser.get("/admin/apps/new")
    assert page.status_code == 200
    data = register_form(**overrides)
    data["csrf_token"] = csrf_of(page)
    return follow_to_secret(browser, browser.post("/admin/apps/new", data=data)), data


def follow_to_secret(browser: Browser, response: requests.Response) -> requests.Response:
    """The secret is shown by the GET after the POST (post/redirect/get)."""
    if response.status_code == 303 and response.headers["Location"].endswith("/secret"):
        return browser.get(response.headers["Location"])
    return response


def shown_credentials(page: requests.Response) -> tuple[str, str]:
    client_id = re.search(r'<code id="client-id">([^<]+)</code>', page.text)
    secret = re.search(r'<code id="client-secret">([^<]+)</code>', page.text)
    assert client_id and secret, page.text[:3000]
    return client_id.group(1), secret.group(1)


def client_credentials(server, client_id: str, secret: str) -> requests.Response:
    return requests.post(
        server.url + "/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret), timeout=10
    )


def load_client(server, *, client_id: str | None = None, name: str | None = None) -> Client | None:
    with server.services.db.transaction() as session:
        query = select(Client).where(Client.client_id == client_id) if client_id else select(Client).where(Client.name == name)
        return session.scalar(query)


def events(server, action: str, subject: str) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == action, AuditEvent.subject == subject).order_by(AuditEvent.seq))
        )


def post_with_token(browser: Browser, page_url: str, post_url: str, **data: object) -> requests.Response:
    page = browser.get(page_url)
    assert page.status_code == 200, page.status_code
    return follow_to_secret(browser, browser.post(post_url, data={"csrf_token": csrf_of(page), **data}))


@pytest.fixture
def admin(server, make_user) -> Browser:
    return console(server, make_user, "school_admin")


@pytest.fixture
def service_client(make_client) -> ClientInfo:
    return make_client(grant_types=["authorization_code", "client_credentials"], scopes=["openid", "profile"])


# --- registering ---------------------------------------------------------------------------------


def test_registration_shows_the_secret_once_and_it_works_at_the_token_endpoint(server, admin):
    response, data = register(admin)
    assert response.status_code == 200
    assert "no-store" in response.headers["Cache-Control"]
    client_id, secret = shown_credentials(response)

    token = client_credentials(server, client_id, secret)
    assert token.status_code == 200 and token.json()["access_token"]

    # Shown once: neither the app page nor the list shows it again.
    page = admin.get(f"/admin/apps/{client_id}")
    assert page.status_code == 200 and data["name"] in page.text and client_id in page.text
    assert secret not in page.text
    listing = admin.get("/admin/apps")
    assert listing.status_code == 200 and data["name"] in listing.text and secret not in listing.text

    stored = load_client(server, client_id=client_id)
    assert stored is not None and stored.redirect_uris == ["https://journal.example.test/cb"]
    assert stored.scopes == ["openid", "profile", "roles"] and stored.secret_hash != secret
    (created,) = events(server, "client:create", f"client:{client_id}")
    assert created.details["name"] == data["name"] and created.actor.startswith("user:")
    assert secret not in str(created.details) and stored.secret_hash not in str(created.details)


def test_public_app_gets_no_secret(server, admin):
    response, data = register(admin, auth_method="none", grant_types=["authorization_code", "refresh_token"])
    assert response.status_code == 303
    stored = load_client(server, name=data["name"])
    assert stored is not None and stored.token_endpoint_auth_method == "none" and stored.secret_hash is None
    page = admin.get(response.headers["Location"])
    assert "client-secret" not in page.text


@pytest.mark.parametrize(
    "bad_uri",
    ["http://journal.example.test/cb", "https://journal.example.test/cb#section", "journal.example.test/cb"],
)
def test_invalid_redirect_uri_is_a_form_error_and_nothing_is_saved(server, admin, bad_uri):
    response, data = register(admin, redirect_uris="https://ok.example.test/cb\n" + bad_uri)
    assert response.status_code == 200
    assert 'class="error"' in response.text and bad_uri in response.text
    assert "client-secret" not in response.text
    # The admin's input is kept in the form, and nothing was registered.
    assert data["name"] in response.text
    assert load_client(server, name=data["name"]) is None


def test_bad_role_mapping_and_missing_choices_are_form_errors(server, admin):
    for overrides in (
        {"role_map": "teacher journal_editor"},
        {"role_map": "no_such_role=editor"},
        {"role_map": "teacher=a\nteacher=b"},
        {"scopes": []},
        {"grant_types": []},
        {"auth_method": "none"},  # a public app with client_credentials
        {"redirect_uris": ""},  # the code grant without a redirect URI
        {"scopes": ["openid", "superuser"]},
        {"backchannel_logout_uri": "http://journal.example.test/backchannel"},
        {"post_logout_redirect_uris": "https://journal.example.test/bye#top"},
        {"name": ""},
    ):
        response, data = register(admin, **overrides)
        assert response.status_code == 200, overrides
        assert 'class="error"' in response.text, overrides
        assert "client-secret" not in response.text, overrides
        if data["name"]:
            assert load_client(server, name=data["name"]) is None, overrides


def test_registration_keeps_allowed_roles_and_role_mapping(server, admin):
    response, data = register(admin, allowed_roles=["teacher", "staff"], role_map="teacher = journal_editor\nstaff=viewer",
                              trusted="y", backchannel_logout_uri="https://journal.example.test/backchannel")
    client_id, _secret = shown_credentials(response)
    stored = load_client(server, client_id=client_id)
    assert stored.allowed_roles == ["staff", "teacher"]
    assert stored.role_map == {"teacher": "journal_editor", "staff": "viewer"}
    assert stored.trusted is True and stored.backchannel_logout_uri == "https://journal.example.test/backchannel"
    page = admin.get(f"/admin/apps/{client_id}")
    assert "journal_editor" in page.text and "teacher" in page.text


# --- the app page -----------------------------------------------------------------------------------


def test_app_page_lists_the_personal_data_the_app_receives(server, admin, make_client):
    client = make_client(scopes=["openid", "email"])
    page = admin.get(f"/admin/apps/{client.client_id}")
    assert page.status_code == 200
    personal = page.text.split("The personal data this app receives", 1)[1]
    assert "<code>email</code>" in personal and "<code>sub</code>" in personal
    assert "<code>groups</code>" not in personal and "<code>name</code>" not in personal
    assert admin.get("/admin/apps/no-such-app").status_code == 404


# --- editing ---------------------------------------------------------------------------------------


def test_edit_saves_changes_and_journals_the_changed_fields(server, admin, make_client):
    client = make_client(scopes=["openid", "profile"])
    page = admin.get(f"/admin/apps/{client.client_id}/edit")
    assert page.status_code == 200 and "https://rp.example.test/cb" in page.text
    response = admin.post(
        f"/admin/apps/{client.client_id}/edit",
        data={
            "csrf_token": csrf_of(page),
            "name": "Renamed app",
            "redirect_uris": "https://rp.example.test/cb\nhttps://rp.example.test/cb2",
            "post_logout_redirect_uris": "https://rp.example.test/bye",
            # Ticked on the page (the default), as a browser sends it back.
            "backchannel_logout_session_required": "y",
            "scopes": ["openid", "profile", "email"],
            "grant_types": ["authorization_code", "refresh_token"],
            "allowed_roles": ["teacher"],
            "role_map": "teacher=editor",
        },
    )
    assert response.status_code == 303
    stored = load_client(server, client_id=client.client_id)
    assert stored.name == "Renamed app"
    assert stored.redirect_uris == ["https://rp.example.test/cb", "https://rp.example.test/cb2"]
    assert stored.scopes == ["openid", "profile", "email"]
    assert stored.allowed_roles == ["teacher"] and stored.role_map == {"teacher": "editor"}
    (updated,) = events(server, "client:update", f"client:{client.client_id}")
    assert set(updated.details["changed"]) == {"name", "redirect_uris", "scopes", "allowed_roles", "role_map"}
    assert "secret" not in str(updated.details)


def test_edit_with_an_invalid_redirect_uri_changes_nothing(server, admin, make_client):
    client = make_client(scopes=["openid", "profile"])
    page = admin.get(f"/admin/apps/{client.client_id}/edit")
    response = admin.post(
        f"/admin/apps/{client.client_id}/edit",
        data={
            "csrf_token": csrf_of(page),
            "name": "Should not be saved",
            "redirect_uris": "http://evil.example.test/cb",
            "scopes": ["openid"],
            "grant_types": ["authorization_code"],
        },
    )
    assert response.status_code == 200 and 'class="error"' in response.text
    stored = load_client(server, client_id=client.client_id)
    assert stored.name == "Test app" and stored.redirect_uris == ["https://rp.example.test/cb"]
    assert events(server, "client:update", f"client:{client.client_id}") == []


# --- rotating the secret ----------------------------------------------------------------------------


def test_rotation_needs_the_typed_client_id_and_a_reason(server, admin, service_client):
    url = f"/admin/apps/{service_client.client_id}/rotate-secret"
    for data in ({"confirm": "wrong", "reason": "leaked"}, {"confirm": service_client.client_id, "reason": ""}):
        response = post_with_token(admin, url, url, **data)
        assert response.status_code == 200 and 'class="error"' in response.text
        assert "client-secret" not in response.text
    assert client_credentials(server, service_client.client_id, service_client.client_secret).status_code == 200
    assert events(server, "client:secret:rotate", f"client:{service_client.client_id}") == []


def test_rotation_shows_a_new_secret_once_and_the_old_one_stops_working(server, admin, service_client):
    url = f"/admin/apps/{service_client.client_id}/rotate-secret"
    response = post_with_token(admin, url, url, confirm=service_client.client_id, reason="secret was in a chat")
    assert response.status_code == 200
    assert "no-store" in response.headers["Cache-Control"]
    client_id, new_secret = shown_credentials(response)
    assert client_id == service_client.client_id and new_secret != service_client.client_secret

    old = client_credentials(server, client_id, service_client.client_secret)
    assert old.status_code == 401 and old.json()["error"] == "invalid_client"
    assert client_credentials(server, client_id, new_secret).status_code == 200
    (rotated,) = events(server, "client:secret:rotate", f"client:{client_id}")
    assert rotated.reason == "secret was in a chat" and new_secret not in str(rotated.details)
    assert new_secret not in admin.get(f"/admin/apps/{client_id}").text
    # A reload of the secret page does not show it again, nor rotate again.
    again = admin.get(f"/admin/apps/{client_id}/secret")
    assert again.status_code == 303 and new_secret not in again.text
    assert client_credentials(server, client_id, new_secret).status_code == 200


# --- switching an app off and on -------------------------------------------------------------------


def test_deactivate_and_reactivate(server, admin, service_client):
    client_id = service_client.client_id
    issued = client_credentials(server, client_id, service_client.client_secret)
    assert issued.status_code == 200
    off = f"/admin/apps/{client_id}/deactivate"

    refused = post_with_token(admin, off, off, confirm="not-the-id", reason="retired")
    assert refused.status_code == 200 and 'class="error"' in refused.text
    assert load_client(server, client_id=client_id).active is True

    done = post_with_token(admin, off, off, confirm=client_id, reason="retired")
    assert done.status_code == 303
    assert load_client(server, client_id=client_id).active is False
    assert client_credentials(server, client_id, service_client.client_secret).status_code == 401
    with server.services.db.transaction() as session:
        tokens = list(session.scalars(select(AccessToken).where(AccessToken.client_id == client_id)))
    assert tokens and all(t.revoked_at is not None for t in tokens)
    (deactivated,) = events(server, "client:deactivate", f"client:{client_id}")
    assert deactivated.reason == "retired"
    assert "switched off" in admin.get(done.headers["Location"]).text

    on = f"/admin/apps/{client_id}/activate"
    assert post_with_token(admin, on, on, reason="").status_code == 200
    assert load_client(server, client_id=client_id).active is False
    assert post_with_token(admin, on, on, reason="back in use").status_code == 303
    assert load_client(server, client_id=client_id).active is True
    assert client_credentials(server, client_id, service_client.client_secret).status_code == 200
    (activated,) = events(server, "client:activate", f"client:{client_id}")
    assert activated.reason == "back in use"


# --- claims and access end to end ------------------------------------------------------------------


def exchange_code(server, client: ClientInfo, code: str, verifier: str) -> dict:
    response = requests.post(
        server.url + "/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri,
              "code_verifier": verifier},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_role_mapping_from_the_console_reaches_the_id_token_as_app_roles(server, admin, make_user):
    response, _data = register(admin, role_map="teacher=journal_editor", trusted="y",
                               grant_types=["authorization_code"], scopes=["openid", "profile", "roles"])
    client_id, secret = shown_credentials(response)
    client = ClientInfo(client_id, secret, "https://journal.example.test/cb", "https://journal.example.test/bye")
    jwks = requests.get(server.url + "/jwks.json", timeout=10).json()

    teacher = make_user(roles=("teacher",))
    params, verifier, _ = Browser(server.url).authorize(client, teacher, scope="openid roles")
    assert "code" in params, params
    _header, claims = decode_verified(exchange_code(server, client, params["code"], verifier)["id_token"], jwks)
    assert claims["app_roles"] == ["journal_editor"]
    assert claims["roles"] == ["teacher"]

    student = make_user(roles=("student",))
    params, verifier, _ = Browser(server.url).authorize(client, student, scope="openid roles")
    _header, claims = decode_verified(exchange_code(server, client, params["code"], verifier)["id_token"], jwks)
    assert claims["app_roles"] == []


def test_app_limited_to_teachers_refuses_a_student(server, admin, make_user):
    response, _data = register(admin, allowed_roles=["teacher"], trusted="y", grant_types=["authorization_code"])
    client_id, secret = shown_credentials(response)
    client = ClientInfo(client_id, secret, "https://journal.example.test/cb", "https://journal.example.test/bye")

    student = make_user(roles=("student",))
    params, _verifier, page = Browser(server.url).authorize(client, student)
    # The student is told why (the access decision, idp/access/decision.py), and the way
    # back takes the app an access_denied error.
    assert page.status_code == 403 and 'data-code="app-roles"' in page.text
    back = re.search(r'<a href="([^"]+)" id="back-to-app"', page.text)
    assert back and "error=access_denied" in html.unescape(back.group(1))
    assert "code" not in params

    teacher = make_user(roles=("teacher",))
    params, _verifier, _ = Browser(server.url).authorize(client, teacher)
    assert "code" in params and "error" not in params


# --- permissions -----------------------------------------------------------------------------------


def test_custom_role_with_clients_read_may_look_but_not_register(server, make_user, make_client):
    name = "apps_viewer_" + secrets.token_hex(3)
    with server.services.db.transaction() as session:
        create_role(session, name=name, description="Looks at the app register", permissions={"clients:read"})
    viewer = console(server, make_user, name)
    client = make_client()

    assert viewer.get("/admin/apps").status_code == 200
    assert viewer.get(f"/admin/apps/{client.client_id}").status_code == 200
    assert viewer.get("/admin/apps/new").status_code == 403
    listing = viewer.get("/admin/apps")
    before = len(re.findall(r"/admin/apps/[^\"/]+\"", listing.text))
    attempt = viewer.post("/admin/apps/new", data={"csrf_token": csrf_of(listing), **register_form(name="Sneaky app")})
    assert attempt.status_code == 403
    assert load_client(server, name="Sneaky app") is None
    # Nothing on the pages invites the viewer to change things.
    assert "/admin/apps/new" not in listing.text
    assert f"/admin/apps/{client.client_id}/edit" not in viewer.get(f"/admin/apps/{client.client_id}").text
    assert before >= 1


def routes_for(client_id: str) -> list[tuple[str, str, str]]:
    return [
        ("GET", "/admin/apps", "clients:read"),
        ("GET", f"/admin/apps/{client_id}", "clients:read"),
        ("GET", "/admin/reports/access", "clients:read"),
        ("GET", "/admin/reports/access.csv", "clients:read"),
        ("GET", "/admin/apps/new", "clients:write"),
        ("POST", "/admin/apps/new", "clients:write"),
        ("GET", f"/admin/apps/{client_id}/edit", "clients:write"),
        ("POST", f"/admin/apps/{client_id}/edit", "clients:write"),
        ("GET", f"/admin/apps/{client_id}/rotate-secret", "clients:write"),
        ("POST", f"/admin/apps/{client_id}/rotate-secret", "clients:write"),
        ("GET", f"/admin/apps/{client_id}/deactivate", "clients:write"),
        ("POST", f"/admin/apps/{client_id}/deactivate", "clients:write"),
        ("GET", f"/admin/apps/{client_id}/activate", "clients:write"),
        ("POST", f"/admin/apps/{client_id}/activate", "clients:write"),
    ]


# Per permission: a role lacking it and a role holding it (security_officer reads the
# register but may not change it).
LACKING = {"clients:read": "teacher", "clients:write": "security_officer"}
HOLDING = {"clients:read": "security_officer", "clients:write": "school_admin"}


@pytest.mark.parametrize("permission", ["clients:read", "clients:write"])
def test_permission_matrix(server, make_user, service_client, permission):
    lacking = console(server, make_user, LACKING[permission])
    holding = console(server, make_user, HOLDING[permission])
    routes = [r for r in routes_for(service_client.client_id) if r[2] == permission]
    for method, url, _perm in routes:
        for browser, allowed in ((lacking, False), (holding, True)):
            if method == "GET":
                response = browser.get(url)
            else:
                # A valid form token, so that only the permission can stop the request;
                # the body is otherwise empty, so an allowed POST just shows form errors.
                token = csrf_of(browser.get("/"))
                response = browser.post(url, data={"csrf_token": token})
            if allowed:
                assert response.status_code in (200, 303), (method, url, response.status_code)
            else:
                assert response.status_code == 403, (method, url, response.status_code)
                assert "Traceback" not in response.text
    # Nothing a refused or empty POST did changed the app.
    stored = load_client(server, client_id=service_client.client_id)
    assert stored.active is True and stored.name == "Test app"
    assert client_credentials(server, service_client.client_id, service_client.client_secret).status_code == 200


def test_console_pages_need_sign_in(server):
    anonymous = Browser(server.url)
    for url in ("/admin/apps", "/admin/apps/new", "/admin/reports/access"):
        response = anonymous.get(url)
        assert response.status_code == 302 and "/login" in response.headers["Location"]
