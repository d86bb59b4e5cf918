"""schemathesis against the admin API's OpenAPI document, over real HTTP on loopback:
what tests/integration/admin/test_openapi.py does not already check.

test_openapi.py fuzzes every operation (positive and negative data) with a token holding
every permission and checks: no 5xx, documented status codes, content types, headers and
response schemas. Here:

1. Security checks (schemathesis ``ignored_auth``, ``negative_data_rejection``,
   ``missing_required_header``, ``unsupported_method``): every operation that declares
   bearer auth refuses the same request without a token and with a wrong one; invalid
   data is refused with a 4xx, never accepted; methods the document does not list are
   refused with 405.
2. A token with one permission only (``reports:read``) against every operation: each one
   needing another permission answers 403 with the documented Error body, never a 5xx, and
   the response still keeps to the document.

Writes (POST/PATCH/PUT) go only to this module's throwaway data: ``{user_id}`` is pinned to
an account created here (generated ids would lock or re-role accounts of other tests
sharing the database); a POST /users or /classes creates accounts and classes with
generated names nobody else uses. Bounded: few examples per operation, no shrinking,
derandomized.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from admin_ui import openapi
from idp.access.permissions import PERMISSIONS
from idp.accounts.service import create_user
from idp.oidc.clients import create_client
from tests.integration.admin.test_openapi import API, OPERATIONS

# Positive data: the answer must depend on the token (ignored_auth probes the same request
# without one and with a wrong one), required headers and methods are enforced. Negative
# data: refused with a 4xx (a generated request may itself carry a broken Authorization).
SECURITY_CHECKS = {
    schemathesis.GenerationMode.POSITIVE: [not_a_server_error, ignored_auth, missing_required_header,
                                           unsupported_method],
    schemathesis.GenerationMode.NEGATIVE: [not_a_server_error, negative_data_rejection],
}
CONFORMANCE = [not_a_server_error, status_code_conformance, response_schema_conformance]
BOUNDED = settings(
    max_examples=6,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


def loopback() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def _token(server, scopes: list[str]) -> str:  # type: ignore[no-untyped-def]
    with server.services.db.transaction() as session:
        client, secret = create_client(session, name="schemathesis " + " ".join(scopes)[:40], redirect_uris=[],
                                       grant_types=["client_credentials"], scopes=scopes,
                                       client_id="st-" + secrets.token_hex(6))
        client_id = client.client_id
    response = loopback().post(server.url + "/token", data={"grant_type": "client_credentials"},
                               auth=(client_id, secret), timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@pytest.fixture(scope="module")
def full_token(server) -> str:  # type: ignore[no-untyped-def]
    return _token(server, sorted(PERMISSIONS))


@pytest.fixture(scope="module")
def narrow_token(server) -> str:  # type: ignore[no-untyped-def]
    return _token(server, ["reports:read"])


@pytest.fixture(scope="module")
def target_id(server) -> int:  # type: ignore[no-untyped-def]
    with server.services.db.transaction() as session:
        user = create_user(session, server.services.passwords, login="st-" + secrets.token_hex(5),
                           display_name="Schemathesis Target", password=None, roles=["student"])
        return int(user.id)


@pytest.fixture(scope="module")
def schema(server):  # type: ignore[no-untyped-def]
    document = loopback().get(server.url + API + "/openapi.json", timeout=10).json()
    base_url = server.url + API
    assert urlsplit(base_url).hostname == "127.0.0.1"
    loaded = schemathesis.openapi.from_dict(document)
    loaded.config.update(base_url=base_url)
    return loaded


def _run(schema, path: str, method: str, token: str, target_id: int, mode, checks, seen: list[int]) -> None:  # type: ignore[no-untyped-def]
    operation = schema[path][method]
    session = loopback()
    fixed = {"user_id": target_id} if "{user_id}" in path else None

    @BOUNDED
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    def exercise(case: schemathesis.Case) -> None:
        headers = dict(case.headers or {})
        # A negative case may carry a generated (invalid) Authorization header on purpose.
        if mode is schemathesis.GenerationMode.POSITIVE or "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {token}"
        case.headers = headers
        response = case.call(session=session, timeout=10)
        seen.append(response.status_code)
        case.validate_response(response, checks=checks)

    exercise()


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_auth_is_enforced_and_invalid_data_refused(schema, full_token, target_id, path, method, mode):
    seen: list[int] = []
    _run(schema, path, method, full_token, target_id, mode, SECURITY_CHECKS[mode], seen)
    assert seen and all(status < 500 for status in seen)


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_a_token_without_the_permission_gets_the_documented_403(server, schema, narrow_token, target_id, path,
                                                                method):
    document = openapi.document(server.url)
    needed = document["paths"][path][method.lower()].get("x-permission")
    seen: list[int] = []
    _run(schema, path, method, narrow_token, target_id, schemathesis.GenerationMode.POSITIVE, CONFORMANCE, seen)
    if needed != "reports:read":
        # Refused before anything else (the permission is checked first), always 403.
        assert set(seen) == {403}, (path, method, needed, seen)
    else:
        assert 403 not in seen


def test_no_token_and_a_wrong_token_are_refused_everywhere(server, target_id):
    """The same, by hand, for every documented operation (ignored_auth only probes an
    operation when the generated request succeeded)."""
    session = loopback()
    for path, method in OPERATIONS:
        url = server.url + API + path.replace("{user_id}", str(target_id))
        for headers in ({}, {"Authorization": "Bearer " + secrets.token_urlsafe(30)},
                        {"Authorization": "Basic Zm9vOmJhcg=="}):
            response = session.request(method, url, headers=headers, json={}, timeout=10)
            assert response.status_code == 401, (method, path, headers, response.status_code)
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
            body = response.json()
            assert body["error"] and body["message"], body
