"""Where back-channel logout tokens may be POSTed (idp/oidc/backchannel.py): an absolute
http(s) URL without a fragment, and https when the provider itself runs on https, except
on loopback."""

from __future__ import annotations

import pytest

from idp.oidc.backchannel import undeliverable_reason


@pytest.mark.parametrize(
    "uri",
    ["https://journal.school.example/bc", "https://journal.school.example:8443/bc?tenant=7",
     "http://127.0.0.1:5001/bc", "http://localhost/bc", "http://[::1]:8080/bc"],
)
def test_https_provider_posts_to_https_or_loopback(uri):
    assert undeliverable_reason(uri, require_https=True) is None


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://journal.school.example/bc", "https is required"),
        ("http://10.0.0.5/bc", "https is required"),
        ("https://journal.school.example/bc#top", "fragment"),
        ("ftp://journal.school.example/bc", "absolute http(s)"),
        ("javascript:alert(1)", "absolute http(s)"),
        ("/relative/bc", "absolute http(s)"),
        ("https:///no-host", "absolute http(s)"),
        ("http://[::1/bc", "not a URL"),
    ],
)
def test_other_addresses_are_refused_with_the_reason(uri, reason):
    assert reason in (undeliverable_reason(uri, require_https=True) or "")


def test_plain_http_provider_may_post_over_http():
    # Development and tests: the provider on http://127.0.0.1 may reach an app over http.
    assert undeliverable_reason("http://demo-app:5001/bc", require_https=False) is None
    assert undeliverable_reason("http://demo-app:5001/bc#x", require_https=False) == "the URL has a fragment"
