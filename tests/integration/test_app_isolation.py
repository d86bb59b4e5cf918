"""Two apps in one process keep to their own services.

The test server shares its process with apps the tests build (CLI commands run through
click's runner, the https variant of test_rfc9700). A module-wide Flask-Login manager
kept the user loader of the app created last, so the first app loaded its signed-in users
through the other app's database pool; those connections were returned only when the
garbage collector found them, and a series of requests exhausted that pool (30-second
timeouts on PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import event

from idp.app import create_app
from tests.conftest import free_port, make_settings
from tests.helpers import Browser


def test_a_later_app_does_not_serve_the_earlier_apps_users(server, make_user, database_url, redis_url):
    user = make_user()
    browser = Browser(server.url)
    assert browser.sign_in(user.login, user.password).status_code == 303
    other = create_app(make_settings(database_url, redis_url, f"http://127.0.0.1:{free_port()}"))
    other_db = other.extensions["darbaza"].db
    checkouts: list[object] = []
    event.listen(other_db.engine, "checkout", lambda *args: checkouts.append(args))
    try:
        for _ in range(5):
            page = browser.get("/account/sessions")
            assert page.status_code == 200
        assert checkouts == []
    finally:
        other_db.dispose()
        other.extensions["darbaza"].redis.close()
