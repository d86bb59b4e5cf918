"""Roles (with their permissions and members) and classes in the console."""

from __future__ import annotations

import re
import secrets

import pytest
import requests
from sqlalchemy import select

from idp.access.roles import create_role, set_permissions
from idp.accounts.models import Role, SchoolClass, User
from idp.audit.models import AuditEvent
from idp.oidc.models import Client
from tests.helpers import Browser


def csrf_of(page: requests.Response) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
    assert match, page.text[:2000]
    return match.group(1)


def console(server, make_user, *roles: str) -> Browser:
    user = make_user(roles=roles)
    browser = Browser(server.url)
    browser.http.headers["Accept-Language"] = "en"
    assert browser.sign_in(user.login, user.password).status_code in (302, 303)
    return browser


def post_from(browser: Browser, url: str, **data: object) -> requests.Response:
    page = browser.get(url)
    assert page.status_code == 200, (url, page.status_code)
    return browser.post(url, data={"csrf_token": csrf_of(page), **data})


def role_named(server, name: str) -> Role | None:
    with server.services.db.transaction() as session:
        return session.scalar(select(Role).where(Role.name == name))


def custom_role(server, permissions: set[str] | None = None) -> str:
    name = f"custom_{secrets.token_hex(3)}"
    with server.services.db.transaction() as session:
        create_role(session, name=name, description="for a test", permissions=set(permissions or ()))
    return name


def events(server, action: str, subject: str) -> list[AuditEvent]:
    with server.services.db.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action, AuditEvent.subject == subject).order_by(AuditEvent.seq)))


def unique_class_name() -> str:
    return "T" + secrets.token_hex(3).upper()


@pytest.fixture
def officer(server, make_user) -> Browser:
    return console(server, make_user, "security_officer")


# --- roles ---------------------------------------------------------------------------------------


def test_roles_list_shows_permissions_and_member_counts(server, make_user):
    name = custom_role(server, {"clients:read", "reports:read"})
    make_user(roles=(name,))
    make_user(roles=(name, "teacher"))
    page = console(server, make_user, "tech_support").get("/admin/roles")
    assert page.status_code == 200
    row = re.search(rf'<tr id="role-{name}">(.*?)</tr>', page.text, re.S).group(1)
    assert "clients:read" in row and "reports:read" in row and "audit:read" not in row
    assert '<td class="members">2</td>' in row
    seeded = re.search(r'<tr id="role-tech_support">(.*?)</tr>', page.text, re.S).group(1)
    assert "support:accounts:lock" in seeded and "seeded" in seeded
    # tech_support may read roles but not change them: no links to do so.
    assert "/admin/roles/new" not in page.text


def test_create_custom_role(server, officer):
    name = "librarian_" + secrets.token_hex(3)
    response = post_from(officer, "/admin/roles/new", name=name, description="School library",
                         permissions=["clients:read", "reports:read"])
    assert response.status_code == 303
    role = role_named(server, name)
    assert role is not None and role.permissions == {"clients:read", "reports:read"} and not role.builtin
    (created,) = events(server, "role:create", f"role:{name}")
    assert created.details["permissions"] == ["clients:read", "reports:read"]
    assert name in officer.get("/admin/roles").text


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "Bad Name!"},
        {"name": "x"},
        {"name": "teacher"},  # exists
        {"name": "ok_name", "permissions": ["no:such:permission"]},
        # The security officer does not hold clients:write, so cannot grant it.
        {"name": "ok_name", "permissions": ["clients:read", "clients:write"]},
    ],
)
def test_create_role_refuses_bad_input_with_a_form_error(server, officer, fields):
    if fields["name"] == "ok_name":
        fields = {**fields, "name": "ok_name_" + secrets.token_hex(3)}
    before = role_named(server, "teacher").permissions
    response = post_from(officer, "/admin/roles/new", description="", **fields)
    assert response.status_code == 200 and 'class="error"' in response.text
    if fields["name"] != "teacher":
        assert role_named(server, fields["name"].lower()) is None
    assert role_named(server, "teacher").permissions == before


def test_changing_a_roles_permissions_changes_what_its_members_may_do(server, officer, make_user):
    name = custom_role(server, {"reports:read"})
    member = console(server, make_user, name)
    assert member.get("/admin/apps").status_code == 403

    response = post_from(officer, f"/admin/roles/{name}/edit", permissions=["clients:read"])
    assert response.status_code == 303
    assert role_named(server, name).permissions == {"clients:read"}
    assert member.get("/admin/apps").status_code == 200
    (changed,) = events(server, "role:permissions", f"role:{name}")
    assert changed.details == {"added": ["clients:read"], "removed": ["reports:read"]}


def test_role_editor_cannot_grant_permissions_they_lack(server, officer):
    name = custom_role(server)
    response = post_from(officer, f"/admin/roles/{name}/edit", permissions=["clients:write"])
    assert response.status_code == 200 and 'class="error"' in response.text
    assert role_named(server, name).permissions == set()
    assert events(server, "role:permissions", f"role:{name}") == []


def test_seeded_role_permissions_can_change(server, officer):
    before = role_named(server, "staff").permissions
    try:
        response = post_from(officer, "/admin/roles/staff/edit", permissions=sorted(before | {"reports:read"}))
        assert response.status_code == 303
        assert role_named(server, "staff").permissions == before | {"reports:read"}
    finally:
        with server.services.db.transaction() as session:
            set_permissions(session.scalar(select(Role).where(Role.name == "staff")), set(before))


@pytest.mark.parametrize("seeded", ["teacher", "school_admin"])
def test_seeded_roles_cannot_be_deleted(server, officer, seeded):
    page = officer.get(f"/admin/roles/{seeded}/delete")
    assert page.status_code == 200 and "seeded" in page.text
    response = officer.post(f"/admin/roles/{seeded}/delete",
                            data={"csrf_token": csrf_of(page), "confirm": seeded, "reason": "tidy up"})
    assert response.status_code == 200 and 'class="flash error"' in response.text
    assert role_named(server, seeded) is not None
    assert events(server, "role:delete", f"role:{seeded}") == []
    assert f"/admin/roles/{seeded}/delete" not in officer.get("/admin/roles").text


def test_delete_custom_role_needs_no_members_a_typed_name_and_a_reason(server, officer, make_user):
    name = custom_role(server, {"reports:read"})
    member = make_user(roles=(name,))
    url = f"/admin/roles/{name}/delete"

    refused = post_from(officer, url, confirm=name, reason="no longer needed")
    assert refused.status_code == 200 and 'class="flash error"' in refused.text
    assert role_named(server, name) is not None

    with server.services.db.transaction() as session:
        user = session.get(User, member.id)
        user.roles = []
    for data in ({"confirm": name.upper(), "reason": "no longer needed"}, {"confirm": name, "reason": " "}):
        response = post_from(officer, url, **data)
        assert response.status_code == 200 and 'class="error"' in response.text
        assert role_named(server, name) is not None

    done = post_from(officer, url, confirm=name, reason="no longer needed")
    assert done.status_code == 303
    assert role_named(server, name) is None
    (deleted,) = events(server, "role:delete", f"role:{name}")
    assert deleted.reason == "no longer needed" and deleted.details["permissions"] == ["reports:read"]
    assert officer.get(url).status_code == 404


def test_role_an_app_refers_to_is_not_deleted(server, officer, make_client):
    name = custom_role(server)
    client = make_client()
    with server.services.db.transaction() as session:
        session.scalar(select(Client).where(Client.client_id == client.client_id)).allowed_roles = [name]
    response = post_from(officer, f"/admin/roles/{name}/delete", confirm=name, reason="cleanup")
    assert response.status_code == 200 and 'class="flash error"' in response.text
    assert role_named(server, name) is not None


# --- classes -------------------------------------------------------------------------------------


def test_classes_list_and_class_page_show_members(server, make_user):
    name = unique_class_name()
    members = [make_user(roles=("student",), display_name=f"Pupil {i}") for i in range(3)]
    outsider = make_user(roles=("student",))
    with server.services.db.transaction() as session:
        school_class = SchoolClass(name=name)
        session.add(school_class)
        session.flush()
        for member in members:
            user = session.get(User, member.id)
            user.classes = [*user.classes, school_class]
        other_class = SchoolClass(name=unique_class_name())
        session.add(other_class)
        outsider_user = session.get(User, outsider.id)
        outsider_user.classes = [other_class]
        class_id = school_class.id

    browser = console(server, make_user, "tech_support")
    listing = browser.get("/admin/classes")
    assert listing.status_code == 200
    row = re.search(rf'<tr id="class-{class_id}">(.*?)</tr>', listing.text, re.S).group(1)
    assert name in row and '<td class="members">3</td>' in row
    assert 'action="/admin/classes/new"' not in listing.text  # tech support cannot create classes

    page = browser.get(f"/admin/classes/{class_id}")
    assert page.status_code == 200
    logins = re.findall(r'<td class="login">([^<]+)</td>', page.text)
    assert sorted(logins) == sorted(m.login for m in members)
    assert outsider.login not in page.text
    assert browser.get("/admin/classes/999999").status_code == 404


def test_create_class(server, make_user):
    admin = console(server, make_user, "school_admin")
    name = unique_class_name()
    listing = admin.get("/admin/classes")
    response = admin.post("/admin/classes/new", data={"csrf_token": csrf_of(listing), "name": f" {name.lower()} "})
    assert response.status_code == 303
    with server.services.db.transaction() as session:
        created = session.scalar(select(SchoolClass).where(SchoolClass.name == name))
    assert created is not None
    assert response.headers["Location"].endswith(f"/admin/classes/{created.id}")
    (event,) = events(server, "class:create", f"class:{name}")
    assert event.actor.startswith("user:")

    for bad in (name, "7A; DROP", "", "X" * 40):
        again = post_from(admin, "/admin/classes/new", name=bad)
        assert again.status_code == 200 and 'class="error"' in again.text, bad
    assert len(events(server, "class:create", f"class:{name}")) == 1


# --- permissions ---------------------------------------------------------------------------------


# (method, url, permission); {role} and {class_id} are filled in by the test.
ROUTES = [
    ("GET", "/admin/roles", "admin:users:read"),
    ("GET", "/admin/roles/new", "admin:roles:write"),
    ("POST", "/admin/roles/new", "admin:roles:write"),
    ("GET", "/admin/roles/{role}/edit", "admin:roles:write"),
    ("POST", "/admin/roles/{role}/edit", "admin:roles:write"),
    ("GET", "/admin/roles/{role}/delete", "admin:roles:write"),
    ("POST", "/admin/roles/{role}/delete", "admin:roles:write"),
    ("GET", "/admin/classes", "admin:users:read"),
    ("GET", "/admin/classes/{class_id}", "admin:users:read"),
    ("GET", "/admin/classes/new", "admin:users:write"),
    ("POST", "/admin/classes/new", "admin:users:write"),
]
# Per permission: a seeded role lacking it and one holding it.
LACKING = {"admin:users:read": "teacher", "admin:roles:write": "school_admin", "admin:users:write": "security_officer"}
HOLDING = {"admin:users:read": "tech_support", "admin:roles:write": "security_officer", "admin:users:write": "school_admin"}


@pytest.mark.parametrize("permission", sorted(LACKING))
def test_permission_matrix(server, make_user, permission):
    role = custom_role(server, {"reports:read"})
    with server.services.db.transaction() as session:
        school_class = SchoolClass(name=unique_class_name())
        session.add(school_class)
        session.flush()
        class_id = school_class.id
    lacking = console(server, make_user, LACKING[permission])
    holding = console(server, make_user, HOLDING[permission])
    for method, pattern, needed in ROUTES:
        if needed != permission:
            continue
        url = pattern.format(role=role, class_id=class_id)
        for browser, allowed in ((lacking, False), (holding, True)):
            if method == "GET":
                response = browser.get(url)
            else:
                # A valid token and otherwise harmless fields, so that only the
                # permission decides: an allowed request gets its form back with
                # errors, or (editing) saves the permissions the role already has.
                response = browser.post(
                    url, data={"csrf_token": csrf_of(browser.get("/")), "permissions": ["reports:read"]}
                )
            expected = (200, 303) if allowed else (403,)
            assert response.status_code in expected, (method, url, LACKING[permission] if not allowed else "holder",
                                                      response.status_code)
    # The empty and refused posts changed nothing.
    assert role_named(server, role).permissions == {"reports:read"}
