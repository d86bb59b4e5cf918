"""The provider speaks Kyrgyz (default), Russian and English: Accept-Language, ui_locales
and the language switcher choose the language of the pages."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.helpers import form_fields

TRANSLATIONS = Path(__file__).resolve().parents[2] / "idp" / "translations"
HEADINGS = {"ky": "<h1>Кирүү</h1>", "ru": "<h1>Войти</h1>", "en": "<h1>Sign in</h1>"}


@pytest.fixture(scope="module", autouse=True)
def compiled_catalogs() -> None:
    for lang in ("ky", "ru"):
        po = TRANSLATIONS / lang / "LC_MESSAGES" / "messages.po"
        mo = po.with_suffix(".mo")
        if not mo.is_file() or mo.stat().st_mtime < po.stat().st_mtime:
            pytest.fail(f"{mo} is missing or older than {po.name}: run `make translations`")


def html_lang(page: str) -> str:
    match = re.search(r'<html lang="([^"]*)"', page)
    assert match, page[:500]
    return match.group(1)


def assert_language(response: requests.Response, lang: str) -> None:
    assert response.status_code == 200, response.text[:500]
    assert HEADINGS[lang] in response.text, response.text[:2000]
    assert html_lang(response.text) == lang
    for other, heading in HEADINGS.items():
        if other != lang:
            assert heading not in response.text


def language_forms(page: str) -> dict[str, tuple[str, dict[str, str]]]:
    """The switcher's forms (one per language), by the language they choose."""
    forms = {}
    for match in re.finditer(r"<form[^>]*>.*?</form>", page, re.S):
        if 'action="/lang"' not in match.group(0)[: match.group(0).index(">") + 1]:
            continue
        action, fields = form_fields(match.group(0), "/lang")
        forms[fields["lang"]] = (action, fields)
    return forms


def test_kyrgyz_without_accept_language(server) -> None:
    response = requests.get(server.url + "/login", timeout=30, allow_redirects=False)
    assert "Accept-Language" not in response.request.headers
    assert_language(response, "ky")


@pytest.mark.parametrize(
    ("accept", "lang"),
    [
        ("ky", "ky"),
        ("ru", "ru"),
        ("ru-RU,ru;q=0.9,en-US;q=0.8,en;q=0.7", "ru"),
        ("en", "en"),
        ("de-DE,de;q=0.9", "ky"),
    ],
)
def test_accept_language(server, accept: str, lang: str) -> None:
    response = requests.get(
        server.url + "/login",
        headers={"Accept-Language": accept},
        timeout=30,
        allow_redirects=False,
    )
    assert_language(response, lang)


def test_ui_locales_overrides_accept_language(browser) -> None:
    response = browser.get("/login?ui_locales=en", headers={"Accept-Language": "ru"})
    assert_language(response, "en")
    response = browser.get("/login?ui_locales=ru")  # the browser asks for Kyrgyz
    assert_language(response, "ru")


def test_language_switcher(browser) -> None:
    page = browser.get("/login")
    assert_language(page, "ky")
    forms = language_forms(page.text)
    assert set(forms) == {"ky", "ru", "en"}
    action, fields = forms["ru"]
    assert action == "/lang"
    assert fields["csrf_token"]
    assert fields["next"].startswith("/login")

    response = browser.post(action, data=fields)
    assert response.status_code == 303, response.text[:500]
    assert urlsplit(response.headers["Location"]).path == urlsplit(fields["next"]).path == "/login"
    assert_language(browser.get(response.headers["Location"]), "ru")
    # The choice sticks for the session, over the browser's Accept-Language: ky.
    assert_language(browser.get("/login"), "ru")
    assert 'class="link current" lang="ru"' in browser.get("/login").text


def test_language_switcher_rejects_unknown_language(browser) -> None:
    page = browser.get("/login")
    action, fields = language_forms(page.text)["ru"]
    response = browser.post(action, data={**fields, "lang": "de"})
    assert response.status_code == 400
    assert_language(browser.get("/login"), "ky")


@pytest.mark.parametrize(
    ("lang", "error"),
    [("ky", "Логиниңизди киргизиңиз."), ("ru", "Введите логин."), ("en", "Enter your login.")],
)
def test_form_errors_are_translated(browser, lang: str, error: str) -> None:
    """Lazy strings (_l) of the sign-in form follow the language too."""
    headers = {"Accept-Language": lang}
    page = browser.get("/login", headers=headers)
    _action, fields = form_fields(page.text, "/login")
    response = browser.post("/login", data={**fields, "login": "", "password": ""}, headers=headers)
    assert response.status_code == 400
    assert error in response.text
    assert html_lang(response.text) == lang


@pytest.mark.parametrize(
    ("lang", "title"),
    [("ky", "Барак табылган жок"), ("ru", "Страница не найдена"), ("en", "Page not found")],
)
def test_error_pages_are_translated(server, lang: str, title: str) -> None:
    response = requests.get(
        server.url + "/no-such-page", headers={"Accept-Language": lang}, timeout=30
    )
    assert response.status_code == 404
    assert f"<h1>{title}</h1>" in response.text
