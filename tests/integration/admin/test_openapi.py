"""The admin API's OpenAPI document: valid OpenAPI 3.1, describing every route with the
permission it needs, and the live API keeps to it under generated input (schemathesis,
on loopback only, bounded in examples and time)."""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from admin_ui import openapi
from idp.access.permissions import PERMISSIONS
from idp.accounts.service import create_user
from idp.oidc.clients import create_client

API = openapi.API_PREFIX
# Collected from the document itself (its paths do not depend on the issuer).
OPERATIONS = [
    (path, method.upper())
    for path, item in openapi.document("http://127.0.0.1")["paths"].items()
    for method in item
    if path != "/openapi.json"
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
FUZZ_SETTINGS = settings(
    max_examples=20,
    deadline=timedelta(seconds=5),
    derandomize=True,  # the same examples on every run: a failure here is never flaky luck
    database=None,  # write nothing into the work tree
    phases=[Phase.explicit, Phase.generate],  # no shrinking: it is unbounded in time
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


def loopback_session(token: str | None = None) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: loopback only
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


@pytest.fixture(scope="module")
def document(server) -> dict:  # type: ignore[no-untyped-def, type-arg]
    response = loopback_session().get(server.url + API + "/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    return dict(response.json())


@pytest.fixture(scope="module")
def admin_token(server) -> str:  # type: ignore[no-untyped-def]
    """A script holding every admin scope, so that every operation is really exercised."""
    with server.services.db.transaction() as session:
        client, secret = create_client(
            session, name="Fuzzing script", redirect_uris=[], grant_types=["client_credentials"],
            scopes=sorted(PERMISSIONS), client_id="fuzz-" + secrets.token_hex(6),
        )
        client_id = client.client_id
    response = loopback_session().post(server.url + "/token", data={"grant_type": "client_credentials"},
                                       auth=(client_id, secret), timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def test_document_is_valid_openapi_3_1(document):
    validate(document)  # openapi-spec-validator picks the 3.1 validator from the version
    assert document["openapi"].startswith("3.1.")
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert set(document["components"]["schemas"]["Error"]["required"]) == {"error", "message"}


def test_document_describes_every_route_with_its_permission(server, document):
    routes = {}
    for rule in server.app.url_map.iter_rules():
        if not rule.endpoint.startswith("admin_api.") or rule.endpoint == "admin_api.unknown_path":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule.removeprefix(API))
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes[(path, method.lower())] = server.app.view_functions[rule.endpoint]
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert set(routes) == documented
    for (path, method), view in routes.items():
        operation = document["paths"][path][method]
        permission = getattr(view, "required_permission", None)
        assert operation.get("x-permission") == permission, (path, method)
        if permission is None:
            assert operation["security"] == [], (path, method)
            continue
        assert operation["security"] == [{"bearerAuth": [permission]}]
        assert {"401", "403"} <= set(operation["responses"]), (path, method)
        for name in re.findall(r"\{(\w+)\}", path):
            assert any(p["$ref"].endswith("/UserId") for p in operation["parameters"]), name


def test_every_error_response_uses_the_error_schema(document):
    responses = document["components"]["responses"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    name = response["$ref"].rsplit("/", 1)[1]
                    schema = responses[name]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)
    assert responses["Unauthorized"]["headers"]["WWW-Authenticate"]["required"] is True


@pytest.fixture(scope="module")
def own_user_id(server) -> int:  # type: ignore[no-untyped-def]
    """The account the fuzzer may lock, rename and re-role: generated ids would hit the
    accounts of other tests running in the same database."""
    with server.services.db.transaction() as session:
        user = create_user(session, server.services.passwords, login="fuzz-" + secrets.token_hex(5),
                           display_name="Fuzz Target", password=None, roles=["student"])
        return int(user.id)


@pytest.fixture(scope="module")
def api_schema(server, document):  # type: ignore[no-untyped-def]
    base_url = server.url + API
    assert urlsplit(base_url).hostname == "127.0.0.1"
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=base_url)
    return schema


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_live_api_keeps_to_the_document(api_schema, admin_token, own_user_id, path, method, mode):
    """Generated requests (valid and invalid) never get a 5xx, and every answer has a
    documented status, content type, headers and body. Odd ids (0, negative, huge) are
    covered in test_admin_api."""
    operation = api_schema[path][method]
    session = loopback_session(admin_token)
    fixed = {"user_id": own_user_id} if "{user_id}" in path else None

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    def exercise(case: schemathesis.Case) -> None:
        response = case.call(session=session, timeout=10)
        case.validate_response(response, checks=CHECKS)

    exercise()
