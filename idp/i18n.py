"""Language choice: the switcher, the user's setting, ``ui_locales``, then Accept-Language."""

from __future__ import annotations

from flask import Flask, request, session
from flask_babel import Babel, get_locale
from flask_login import current_user
from werkzeug.exceptions import HTTPException

LANGUAGES = {"ky": "Кыргызча", "ru": "Русский", "en": "English"}
babel = Babel()


def _from_ui_locales(value: str | None) -> str | None:
    for tag in (value or "").split():
        base = tag.split("-")[0].lower()
        if base in LANGUAGES:
            return base
    return None


def _request_ui_locales() -> str | None:
    value = request.args.get("ui_locales")
    if value is None and request.method != "GET":
        try:
            value = request.form.get("ui_locales")
        except HTTPException:
            # The body itself was refused (413 too large): this runs again while the error
            # page is rendered, and must not raise a second time (that became a bare 500).
            value = None
    return value


def select_locale() -> str:
    chosen = session.get("lang")
    if chosen in LANGUAGES:
        return chosen
    if getattr(current_user, "is_authenticated", False) and current_user.locale in LANGUAGES:
        return current_user.locale
    from_request = _from_ui_locales(_request_ui_locales()) if request else None
    if from_request:
        return from_request
    remembered = session.get("ui_locales")
    if remembered in LANGUAGES:
        return remembered
    return request.accept_languages.best_match(list(LANGUAGES), default="ky") or "ky"


def init_app(app: Flask) -> None:
    app.config.setdefault("BABEL_DEFAULT_LOCALE", "ky")
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", "translations")
    babel.init_app(app, locale_selector=select_locale)

    @app.context_processor
    def _languages() -> dict[str, object]:
        return {"LANGUAGES": LANGUAGES, "get_locale": get_locale}

    from idp.access.permissions import role_label

    # A global, not a context variable: imported macros (admin forms) need it too.
    app.jinja_env.globals["role_label"] = role_label
