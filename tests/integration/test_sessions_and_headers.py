"""Browser sessions (ASVS 3.3, 7.2, 7.4) and security headers (ASVS 3.4, R31) over HTTP."""

from __future__ import annotations

import requests

from tests.helpers import Browser

PAGES = ["/login", "/", "/authorize?client_id=nope", "/end_session", "/no-such-page"]


def _cookie_header(response: requests.Response) -> str:
    return response.headers.get("Set-Cookie", "")


def test_session_cookie_attributes(server, browser, make_user):
    user = make_user()
    page = browser.get("/login")
    cookie = _cookie_header(page)
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Domain" not in cookie and "Expires" not in cookie  # a browser-session cookie
    response = browser.submit(page, "/login", login=user.login, password=user.password)
    name, _, rest = _cookie_header(response).partition("=")
    value = rest.split(";")[0]
    assert len(value) >= 43  # 256 random bits, base64url (ASVS 7.2.3)


def test_session_id_rotates_at_sign_in_and_old_one_is_dead(server, browser, make_user):
    user = make_user()
    page = browser.get("/login")
    before = dict(browser.http.cookies)
    assert before, "an anonymous session carries the CSRF token"
    browser.submit(page, "/login", login=user.login, password=user.password)
    after = dict(browser.http.cookies)
    assert before != after
    # The pre-login cookie does not give the signed-in account (session fixation).
    stale = Browser(server.url)
    stale.http.cookies.update(before)
    assert stale.get("/").status_code == 302
    assert browser.get("/").status_code == 200


def test_sign_out_ends_the_server_side_session(server, browser, make_user):
    user = make_user()
    browser.sign_in(user.login, user.password)
    cookies = dict(browser.http.cookies)
    page = browser.get("/")
    assert page.status_code == 200
    browser.submit(page, "/logout")
    replay = Browser(server.url)
    replay.http.cookies.update(cookies)
    assert replay.get("/").status_code == 302  # back to the login page


def test_unknown_login_and_wrong_password_answer_the_same(server, browser, make_user):
    user = make_user()
    page = browser.get("/login")
    wrong = browser.submit(page, "/login", login=user.login, password="not the password at all")
    page = browser.get("/login")
    unknown = browser.submit(page, "/login", login="nobody-" + user.login, password="not the password at all")
    assert wrong.status_code == unknown.status_code == 401
    strip = lambda r: r.text.replace(user.login, "").replace("nobody-", "")  # noqa: E731
    import re

    def message(r: requests.Response) -> list[str]:
        return re.findall(r'<p class="error"[^>]*>(.*?)</p>', strip(r))

    assert message(wrong) == message(unknown) and message(wrong)


def test_locked_account_cannot_sign_in(server, browser, make_user):
    from idp.accounts.models import User

    user = make_user()
    with server.services.db.transaction() as session:
        session.get(User, user.id).locked = True
    page = browser.get("/login")
    response = browser.submit(page, "/login", login=user.login, password=user.password)
    assert response.status_code == 403
    assert browser.get("/").status_code == 302


def test_security_headers_on_every_page(server, browser):
    for path in PAGES:
        response = browser.get(path)
        h = response.headers
        assert "frame-ancestors 'none'" in h["Content-Security-Policy"], path
        assert "object-src 'none'" in h["Content-Security-Policy"]
        assert h["X-Frame-Options"] == "DENY"
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "no-referrer"
        if response.headers.get("Content-Type", "").startswith("text/html"):
            assert h["Cache-Control"] == "no-store"
    for path in ["/.well-known/openid-configuration", "/jwks.json"]:
        assert browser.get(path).headers["X-Content-Type-Options"] == "nosniff"


def test_forms_require_csrf_token(server, browser, make_user):
    user = make_user()
    browser.get("/login")
    response = browser.post("/login", data={"login": user.login, "password": user.password})
    assert response.status_code == 400
    assert browser.get("/").status_code == 302


def test_login_next_is_never_off_site(server, browser, make_user):
    user = make_user()
    for target in ["https://evil.test/", "//evil.test/", "/\\evil.test", "javascript:alert(1)"]:
        page = browser.get("/login", params={"next": target})
        response = browser.submit(page, "/login", login=user.login, password=user.password)
        assert response.status_code == 303
        assert response.headers["Location"] in ("/", server.url + "/")
