"""Redis unreachable: every page and protocol endpoint answers a clear 503 (a page or a
JSON error), never werkzeug's bare 500 — also when the failure comes while Flask opens
the browser session, before any error handler could act."""

from __future__ import annotations

from idp.app import create_app
from tests.conftest import free_port, make_settings


def _app(database_url: str):  # type: ignore[no-untyped-def]
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    return create_app(make_settings(database_url, dead_redis, "http://127.0.0.1:9"))


def test_a_browser_with_a_session_cookie_gets_a_clear_503_page(database_url):
    client = _app(database_url).test_client()
    client.set_cookie("darbaza", "x" * 43)
    for path in ("/", "/login", "/account"):
        response = client.get(path, headers={"Accept": "text/html"})
        assert response.status_code == 503, path
        assert "Traceback" not in response.get_data(as_text=True)
        assert "text/html" in response.headers["Content-Type"]


def test_a_protocol_endpoint_gets_a_json_503(database_url):
    client = _app(database_url).test_client()
    client.set_cookie("darbaza", "x" * 43)
    response = client.post("/token", data={"grant_type": "client_credentials"},
                           headers={"Accept": "application/json"})
    assert response.status_code == 503
    assert response.is_json and response.get_json().get("error")


def test_readyz_says_which_store_is_down(database_url):
    response = _app(database_url).test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["redis"] == "unavailable"
