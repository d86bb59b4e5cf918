"""CORS: allowed for registered app origins at token/userinfo, never at /authorize."""

from __future__ import annotations

import requests


def test_token_endpoint_allows_registered_origin_only(server, make_client):
    make_client(redirect_uris=["https://spa.example.test/callback"], auth_method="none")
    pre = requests.options(server.url + "/token", headers={"Origin": "https://spa.example.test",
                           "Access-Control-Request-Method": "POST"}, timeout=10)
    assert pre.headers.get("Access-Control-Allow-Origin") == "https://spa.example.test"
    other = requests.options(server.url + "/token", headers={"Origin": "https://evil.test",
                             "Access-Control-Request-Method": "POST"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in other.headers
    post = requests.post(server.url + "/token", data={"grant_type": "authorization_code"},
                         headers={"Origin": "https://spa.example.test"}, timeout=10)
    assert post.headers.get("Access-Control-Allow-Origin") == "https://spa.example.test"


def test_authorize_never_has_cors(server, make_client):
    make_client(redirect_uris=["https://spa2.example.test/callback"])
    for method in ("GET", "OPTIONS"):
        response = requests.request(method, server.url + "/authorize", headers={"Origin": "https://spa2.example.test"},
                                    timeout=10, allow_redirects=False)
        assert "Access-Control-Allow-Origin" not in response.headers
