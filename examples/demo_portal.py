"""The demo portal app: a small school e-journal that signs in with Darbaza.

It is an ordinary OpenID Connect relying party built on Authlib's Flask client:
the authorization code flow with PKCE (S256), the ID token checked against the
provider's JWKS, refresh-token rotation and RP-initiated logout.

Run it (``make run`` does this for you)::

    DEMO_CLIENT_FILE=var/demo-client.json \\
        gunicorn --bind 127.0.0.1:8001 'examples.demo_portal:create_app()'

Configuration: ``DEMO_CLIENT_FILE`` names a JSON file with ``client_id``,
``client_secret`` and ``issuer`` (``darbaza demo seed`` writes it); the variables
``DEMO_CLIENT_ID`` / ``DEMO_CLIENT_SECRET`` / ``DEMO_ISSUER`` set (or override) the
same values. ``DEMO_BASE_URL`` is this app's own address (default
http://127.0.0.1:8001) and ``DEMO_SECRET_KEY`` the cookie signing key (a random one
per process by default, which signs everybody out on restart). ``create_app`` also
takes the same settings as a dict, which the tests use.

What the browser session keeps: only the ID token, the refresh token and the access
token's expiry (the access token itself is not needed by this demo). The session is
Flask's signed cookie; should it grow past what browsers store (4 KB) the tokens move
to a dict in this process, and the cookie keeps only a random key to them.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import requests
from authlib.integrations.base_client.errors import MismatchingStateError, OAuthError
from authlib.integrations.flask_client import OAuth
from flask import Flask, Response, current_app, redirect, render_template, request, session, url_for
from joserfc.errors import JoseError
from werkzeug.exceptions import HTTPException

log = logging.getLogger("darbaza.demo_portal")

SCOPE = "openid profile email roles school offline_access"
DEFAULT_BASE_URL = "http://127.0.0.1:8001"
DEFAULT_LANG = "ky"
# Browsers drop cookies larger than 4096 bytes (name, value and attributes together).
COOKIE_LIMIT = 4000
HTTP_TIMEOUT = 10
ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Kyrgyzstan keeps UTC+6 all year.
BISHKEK = timezone(timedelta(hours=6), "UTC+6")

# --- user-facing strings ------------------------------------------------------------
LANGUAGES = {"ky": "Кыргызча", "ru": "Русский", "en": "English"}

STRINGS: dict[str, dict[str, str]] = {
    "ky": {
        "app_title": "Электрондук журнал (демо)",
        "brand": "Демо портал",
        "language": "Тил",
        "signed_out_lead": "Электрондук журналды көрүү үчүн мектептин аккаунту менен кириңиз.",
        "sign_in": "Мектептин аккаунту менен кирүү",
        "welcome": "Кош келиңиз, {name}!",
        "about_you": "Сиз тууралуу",
        "name": "Аты-жөнү",
        "username": "Логин",
        "roles": "Ролдор",
        "school": "Мектеп",
        "email": "Электрондук почта",
        "no_roles": "ролдор жок",
        "token_expiry": "Кирүү токенинин мөөнөтү бүтөт",
        "seconds_left": "{n} сек. калды",
        "expired": "мөөнөтү бүттү",
        "refresh": "Токендерди жаңылоо",
        "sign_out": "Чыгуу",
        "notice_refreshed": "Токендер жаңыланды.",
        "notice_signed_out": "Сиз системадан чыктыңыз.",
        "notice_signed_out_locally": (
            "Сиз бул колдонмодон чыктыңыз, бирок кирүү кызматына туташуу мүмкүн болгон жок: "
            "мектептин аккаунтунан чыгуу аягына чыккан жок."
        ),
        "notice_refresh_failed": "Токендерди жаңылоо мүмкүн болгон жок. Кайра кириңиз.",
        "notice_no_refresh_token": "Бул кирүүдө жаңылоо токени жок. Кайра кириңиз.",
        "notice_session_ended": "Кирүү сеансы бүттү. Кайра кириңиз.",
        "error_title": "Кирүү ишке ашкан жок",
        "error_access_denied": "Сиз бул колдонмого мектептин аккаунтун колдонууга уруксат берген жоксуз.",
        "error_provider": "Кирүү кызматы ката кайтарды. Кайра аракет кылып көрүңүз.",
        "error_state": "Кирүү суроо-талабы эскирген же жараксыз. Башкы бетке кайтып, кайра баштаңыз.",
        "error_token": "Кирүү кызматынан келген жооп текшерүүдөн өткөн жок. Кайра аракет кылып көрүңүз.",
        "error_code": "Ката коду",
        "unreachable_title": "Кирүү кызматы жеткиликсиз",
        "unreachable": "Мектептин кирүү кызматына азыр туташуу мүмкүн эмес. Бир мүнөттөн кийин кайра аракет кылыңыз.",
        "form_expired_title": "Форманын мөөнөтү бүттү",
        "form_expired": "Баракчаны жаңыртып, кайра аракет кылыңыз.",
        "not_found_title": "Баракча табылган жок",
        "bad_request_title": "Суроо-талап туура эмес",
        "check_address": "Даректи текшерип, кайра аракет кылыңыз.",
        "server_error_title": "Бир нерсе туура эмес болуп кетти",
        "server_error": "Бир мүнөттөн кийин кайра аракет кылыңыз.",
        "back": "Башкы бетке кайтуу",
    },
    "ru": {
        "app_title": "Электронный журнал (демо)",
        "brand": "Демо-портал",
        "language": "Язык",
        "signed_out_lead": "Чтобы открыть электронный журнал, войдите со школьной учётной записью.",
        "sign_in": "Войти со школьной учётной записью",
        "welcome": "Добро пожаловать, {name}!",
        "about_you": "О вас",
        "name": "Имя",
        "username": "Логин",
        "roles": "Роли",
        "school": "Школа",
        "email": "Электронная почта",
        "no_roles": "нет ролей",
        "token_expiry": "Токен доступа действует до",
        "seconds_left": "осталось {n} с",
        "expired": "срок истёк",
        "refresh": "Обновить токены",
        "sign_out": "Выйти",
        "notice_refreshed": "Токены обновлены.",
        "notice_signed_out": "Вы вышли из системы.",
        "notice_signed_out_locally": (
            "Вы вышли из этого приложения, но служба входа недоступна: "
            "выход из школьной учётной записи не завершён."
        ),
        "notice_refresh_failed": "Не удалось обновить токены. Войдите снова.",
        "notice_no_refresh_token": "Для этого входа нет токена обновления. Войдите снова.",
        "notice_session_ended": "Сеанс завершён. Войдите снова.",
        "error_title": "Не удалось войти",
        "error_access_denied": "Вы не разрешили этому приложению использовать вашу школьную учётную запись.",
        "error_provider": "Служба входа вернула ошибку. Попробуйте ещё раз.",
        "error_state": "Запрос на вход устарел или недействителен. Вернитесь на главную и начните заново.",
        "error_token": "Ответ службы входа не прошёл проверку. Попробуйте ещё раз.",
        "error_code": "Код ошибки",
        "unreachable_title": "Служба входа недоступна",
        "unreachable": "Сейчас не удаётся связаться со школьной службой входа. Попробуйте через минуту.",
        "form_expired_title": "Срок действия формы истёк",
        "form_expired": "Обновите страницу и попробуйте ещё раз.",
        "not_found_title": "Страница не найдена",
        "bad_request_title": "Неверный запрос",
        "check_address": "Проверьте адрес и попробуйте ещё раз.",
        "server_error_title": "Что-то пошло не так",
        "server_error": "Попробуйте ещё раз через минуту.",
        "back": "На главную",
    },
    "en": {
        "app_title": "E-journal (demo)",
        "brand": "Demo portal",
        "language": "Language",
        "signed_out_lead": "Sign in with your school account to open the e-journal.",
        "sign_in": "Sign in with your school account",
        "welcome": "Welcome, {name}!",
        "about_you": "About you",
        "name": "Name",
        "username": "Login",
        "roles": "Roles",
        "school": "School",
        "email": "E-mail",
        "no_roles": "no roles",
        "token_expiry": "Access token expires at",
        "seconds_left": "{n} s left",
        "expired": "expired",
        "refresh": "Refresh tokens",
        "sign_out": "Sign out",
        "notice_refreshed": "The tokens were refreshed.",
        "notice_signed_out": "You have signed out.",
        "notice_signed_out_locally": (
            "You have signed out of this app, but the sign-in service could not be reached: "
            "your school account may still be signed in."
        ),
        "notice_refresh_failed": "The tokens could not be refreshed. Please sign in again.",
        "notice_no_refresh_token": "This sign-in has no refresh token. Please sign in again.",
        "notice_session_ended": "Your session has ended. Please sign in again.",
        "error_title": "Sign-in did not succeed",
        "error_access_denied": "You did not allow this app to use your school account.",
        "error_provider": "The sign-in service returned an error. Please try again.",
        "error_state": "The sign-in request has expired or is not valid. Go back to the start page and try again.",
        "error_token": "The answer of the sign-in service did not pass the checks. Please try again.",
        "error_code": "Error code",
        "unreachable_title": "The sign-in service is unreachable",
        "unreachable": "The school's sign-in service cannot be reached right now. Please try again in a minute.",
        "form_expired_title": "The form has expired",
        "form_expired": "Reload the page and try again.",
        "not_found_title": "Page not found",
        "bad_request_title": "The request is not valid",
        "check_address": "Check the address and try again.",
        "server_error_title": "Something went wrong",
        "server_error": "Please try again in a minute.",
        "back": "Back to the start page",
    },
}

ROLE_LABELS: dict[str, dict[str, str]] = {
    "ky": {
        "student": "Окуучу",
        "teacher": "Мугалим",
        "parent": "Ата-эне",
        "staff": "Кызматкер",
        "tech_support": "Техникалык колдоо",
        "security_officer": "Маалыматтык коопсуздук кызматкери",
        "school_admin": "Мектеп администратору",
    },
    "ru": {
        "student": "Ученик",
        "teacher": "Учитель",
        "parent": "Родитель",
        "staff": "Сотрудник",
        "tech_support": "Техподдержка",
        "security_officer": "Специалист по информационной безопасности",
        "school_admin": "Администратор школы",
    },
    "en": {
        "student": "Student",
        "teacher": "Teacher",
        "parent": "Parent",
        "staff": "Staff",
        "tech_support": "Technical support",
        "security_officer": "Security officer",
        "school_admin": "School administrator",
    },
}


def current_lang() -> str:
    lang = session.get("lang")
    return lang if lang in STRINGS else DEFAULT_LANG


def t(key: str, **values: Any) -> str:
    """The app's string ``key`` in the current language (English if it is missing)."""
    text = STRINGS[current_lang()].get(key) or STRINGS["en"][key]
    return text.format(**values) if values else text


def role_label(role: str) -> str:
    return ROLE_LABELS[current_lang()].get(role, role)


# --- configuration -----------------------------------------------------------------
@dataclass
class DemoConfig:
    client_id: str
    client_secret: str | None
    issuer: str
    base_url: str
    secret_key: str

    @property
    def redirect_uri(self) -> str:
        return self.base_url + "/callback"

    @property
    def post_logout_redirect_uri(self) -> str:
        return self.base_url + "/"


def load_config(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> DemoConfig:
    """The JSON file in DEMO_CLIENT_FILE, then DEMO_* variables, then ``overrides``."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = env.get("DEMO_CLIENT_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"DEMO_CLIENT_FILE={path!r} cannot be read as JSON: {exc}") from exc
        for key in ("client_id", "client_secret", "issuer"):
            if data.get(key):
                values[key] = data[key]
    for key in ("client_id", "client_secret", "issuer", "base_url", "secret_key"):
        if env.get("DEMO_" + key.upper()):
            values[key] = env["DEMO_" + key.upper()]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    missing = [k for k in ("client_id", "issuer") if not values.get(k)]
    if missing:
        raise RuntimeError(
            "The demo portal is not configured: set DEMO_CLIENT_FILE (see `darbaza demo seed`) "
            "or DEMO_CLIENT_ID, DEMO_CLIENT_SECRET and DEMO_ISSUER. Missing: " + ", ".join(missing)
        )
    return DemoConfig(
        client_id=str(values["client_id"]),
        client_secret=str(values["client_secret"]) if values.get("client_secret") else None,
        issuer=str(values["issuer"]).rstrip("/"),
        base_url=str(values.get("base_url") or DEFAULT_BASE_URL).rstrip("/"),
        secret_key=str(values.get("secret_key") or secrets.token_urlsafe(32)),
    )


# --- token keeping -------------------------------------------------------------------
class ServerSideTokens:
    """Tokens that did not fit in the cookie, in this process, under random keys."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def put(self, tokens: dict[str, Any]) -> str:
        ref = secrets.token_urlsafe(24)
        with self._lock:
            while len(self._data) >= self.max_entries:
                self._data.pop(next(iter(self._data)))  # the oldest entry
            self._data[ref] = dict(tokens)
        return ref

    def get(self, ref: str) -> dict[str, Any] | None:
        with self._lock:
            value = self._data.get(ref)
            return dict(value) if value is not None else None

    def drop(self, ref: str) -> None:
        with self._lock:
            self._data.pop(ref, None)


class ProviderError(Exception):
    """The provider answered something this app cannot accept (e.g. a foreign issuer)."""


@dataclass
class Demo:
    config: DemoConfig
    oauth: OAuth
    store: ServerSideTokens

    @property
    def client(self) -> Any:
        return self.oauth.create_client("darbaza")

    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (fetched once, then cached by Authlib)."""
        meta = self.client.load_server_metadata()
        if meta.get("issuer", "").rstrip("/") != self.config.issuer:
            # Do not cache a document that names another issuer.
            self.client.server_metadata.pop("_loaded_at", None)
            raise ProviderError("the discovery document names another issuer")
        return meta


def demo() -> Demo:
    return current_app.extensions["demo_portal"]


def _cookie_size() -> int:
    app = current_app
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    value = serializer.dumps(dict(session)) if serializer is not None else ""
    # name=value plus the attributes Flask adds (Path, HttpOnly, SameSite, Expires...).
    return len(app.config["SESSION_COOKIE_NAME"]) + 1 + len(value) + 120


def save_tokens(tokens: dict[str, Any]) -> None:
    drop_tokens()
    session["tokens"] = tokens
    if _cookie_size() > COOKIE_LIMIT:
        del session["tokens"]
        session["tokens_ref"] = demo().store.put(tokens)


def load_tokens() -> dict[str, Any] | None:
    tokens = session.get("tokens")
    if isinstance(tokens, dict):
        return tokens
    ref = session.get("tokens_ref")
    return demo().store.get(ref) if isinstance(ref, str) else None


def drop_tokens() -> None:
    ref = session.pop("tokens_ref", None)
    if isinstance(ref, str):
        demo().store.drop(ref)
    session.pop("tokens", None)


def token_claims(id_token: str) -> dict[str, Any]:
    """The claims of an ID token this app already verified (when it was received).

    The token comes back from our own signed cookie or our own store, so its signature
    is not checked a second time here."""
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _keep_tokens(
    token: Mapping[str, Any], previous: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    previous = previous or {}
    expires_at = token.get("expires_at")
    if expires_at is None and token.get("expires_in") is not None:
        expires_at = int(time.time()) + int(token["expires_in"])
    return {
        "id_token": token.get("id_token") or previous.get("id_token"),
        "refresh_token": token.get("refresh_token") or previous.get("refresh_token"),
        "expires_at": int(expires_at) if expires_at is not None else None,
    }


# --- small helpers ---------------------------------------------------------------------
def csrf_token() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        session["csrf"] = token
    return token


def csrf_ok() -> bool:
    sent = request.form.get("csrf_token", "")
    expected = session.get("csrf")
    return isinstance(expected, str) and hmac.compare_digest(sent.encode(), expected.encode())


def format_time(timestamp: int | None) -> str:
    if timestamp is None:
        return "—"
    return datetime.fromtimestamp(timestamp, BISHKEK).strftime("%Y-%m-%d %H:%M:%S") + " (UTC+6)"


def message_page(
    title_key: str, message_key: str, status: int, code: str | None = None
) -> tuple[str, int]:
    # An error code from the URL is shown only when it looks like one (no text injection).
    if code is not None and not ERROR_CODE.fullmatch(code):
        code = "invalid_request"
    return render_template(
        "demo_error.html", title=t(title_key), message=t(message_key), code=code
    ), status


def unreachable_page(exc: BaseException) -> tuple[str, int]:
    log.warning("provider unreachable: %s", exc.__class__.__name__)
    return message_page("unreachable_title", "unreachable", 503)


PROVIDER_DOWN: tuple[type[Exception], ...] = (requests.RequestException, ProviderError)
PROVIDER_DOWN_OR_NO_LOGOUT: tuple[type[Exception], ...] = (*PROVIDER_DOWN, RuntimeError)


# --- the app -------------------------------------------------------------------------
def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the demo portal. ``config`` may give client_id, client_secret, issuer,
    base_url and secret_key; the rest comes from the environment (see the module doc)."""
    cfg = load_config(config)
    app = Flask(__name__, template_folder="templates")
    app.config.update(
        SECRET_KEY=cfg.secret_key,
        # Both apps may run on 127.0.0.1 (cookies ignore the port): a name of our own.
        SESSION_COOKIE_NAME="demo_portal_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=cfg.base_url.startswith("https://"),
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    oauth = OAuth(app)
    client_kwargs: dict[str, Any] = {
        "scope": SCOPE,
        "code_challenge_method": "S256",
        "default_timeout": HTTP_TIMEOUT,
    }
    if cfg.client_secret is None:
        client_kwargs["token_endpoint_auth_method"] = "none"
    oauth.register(
        name="darbaza",
        client_id=cfg.client_id,
        client_secret=cfg.client_secret,
        server_metadata_url=cfg.issuer + "/.well-known/openid-configuration",
        client_kwargs=client_kwargs,
    )
    app.extensions["demo_portal"] = Demo(config=cfg, oauth=oauth, store=ServerSideTokens())

    @app.before_request
    def _language() -> None:
        lang = request.args.get("lang")
        if lang in STRINGS and session.get("lang") != lang:
            session["lang"] = lang

    @app.context_processor
    def _template_helpers() -> dict[str, Any]:
        return {
            "t": t,
            "lang": current_lang(),
            "LANGUAGES": LANGUAGES,
            "csrf_token": csrf_token,
            "role_label": role_label,
        }

    @app.after_request
    def _headers(response: Response) -> Response:
        h = response.headers
        h.setdefault(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "base-uri 'none'; frame-ancestors 'none'",
        )
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        # The callback URL carries the code: never leak it in a Referer.
        h.setdefault("Referrer-Policy", "no-referrer")
        h["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def index() -> Any:
        notice = session.pop("notice", None)
        tokens = load_tokens()
        if tokens is None and request.args.get("state"):
            # Back from the provider's end_session with the state we sent.
            try:
                demo().client.validate_logout_response()
                notice = "signed_out"
            except OAuthError:
                pass
        if tokens is None or not tokens.get("id_token"):
            return render_template("demo_index.html", signed_in=False, notice=notice)
        claims = token_claims(tokens["id_token"])
        raw_roles = claims.get("roles")
        roles = [str(r) for r in raw_roles] if isinstance(raw_roles, list) else []
        expires_at = tokens.get("expires_at")
        left = int(expires_at - time.time()) if expires_at is not None else None
        return render_template(
            "demo_index.html",
            signed_in=True,
            notice=notice,
            claims=claims,
            roles=roles,
            expires_at=expires_at,
            expires_text=format_time(expires_at),
            seconds_left=left,
            can_refresh=bool(tokens.get("refresh_token")),
        )

    @app.get("/login")
    def login() -> Any:
        d = demo()
        # One sign-in in flight per browser: forget unfinished ones (each keeps its PKCE
        # verifier and nonce in the cookie, which would otherwise grow with every click).
        for key in [k for k in session if k.startswith("_state_darbaza_")]:
            session.pop(key)
        try:
            d.metadata()
            return d.client.authorize_redirect(d.config.redirect_uri, ui_locales=current_lang())
        except PROVIDER_DOWN as exc:
            return unreachable_page(exc)

    @app.get("/callback")
    def callback() -> Any:
        d = demo()
        error = request.args.get("error")
        if error:
            state = request.args.get("state")
            if state:
                d.client.framework.clear_state_data(session, state)
            log.info("sign-in returned error=%r", error[:64])
            key = "error_access_denied" if error == "access_denied" else "error_provider"
            return message_page("error_title", key, 400, code=error)
        try:
            meta = d.metadata()
            # RFC 9207: the response must come from the issuer we sent the user to.
            iss = request.args.get("iss")
            if iss is not None and iss.rstrip("/") != meta["issuer"].rstrip("/"):
                return message_page("error_title", "error_state", 400, code="invalid_issuer")
            token = d.client.authorize_access_token()
        except MismatchingStateError:
            return message_page("error_title", "error_state", 400, code="invalid_state")
        except OAuthError as exc:
            log.info("token request refused: %s", exc.error)
            return message_page("error_title", "error_provider", 400, code=str(exc.error))
        except PROVIDER_DOWN as exc:
            return unreachable_page(exc)
        except (JoseError, ValueError, KeyError) as exc:
            log.warning("ID token rejected: %s", exc)
            return message_page("error_title", "error_token", 400, code="invalid_id_token")
        if not token.get("id_token") or not token.get("userinfo"):
            return message_page("error_title", "error_token", 400, code="missing_id_token")
        # A new sign-in: a new form token, and nothing of a previous user's.
        lang = session.get("lang")
        session.clear()
        if lang:
            session["lang"] = lang
        save_tokens(_keep_tokens(token))
        return redirect(url_for("index"), code=303)

    @app.post("/refresh")
    def refresh() -> Any:
        if not csrf_ok():
            return message_page("form_expired_title", "form_expired", 400)
        d = demo()
        tokens = load_tokens()
        if tokens is None:
            session["notice"] = "session_ended"
            return redirect(url_for("index"), code=303)
        if not tokens.get("refresh_token"):
            session["notice"] = "no_refresh_token"
            return redirect(url_for("index"), code=303)
        old_sub = token_claims(tokens.get("id_token") or "").get("sub")
        try:
            d.metadata()
            # scope=None: ask for the scope already granted, whatever the client asked at first.
            new = d.client.fetch_access_token(
                grant_type="refresh_token", refresh_token=tokens["refresh_token"], scope=None
            )
            if new.get("id_token"):
                claims = d.client.parse_id_token(new, nonce=None)
                if claims.get("sub") != old_sub:
                    raise ValueError("the refreshed ID token is about another user")
        except OAuthError as exc:
            # invalid_grant: the token was revoked, expired or already used. Start again.
            log.info("refresh refused: %s", exc.error)
            drop_tokens()
            session["notice"] = "refresh_failed"
            return redirect(url_for("index"), code=303)
        except PROVIDER_DOWN as exc:
            return unreachable_page(exc)
        except (JoseError, ValueError, KeyError) as exc:
            log.warning("refreshed ID token rejected: %s", exc)
            drop_tokens()
            session["notice"] = "refresh_failed"
            return redirect(url_for("index"), code=303)
        save_tokens(_keep_tokens(new, tokens))
        session["notice"] = "refreshed"
        return redirect(url_for("index"), code=303)

    @app.post("/logout")
    def logout() -> Any:
        if not csrf_ok():
            return message_page("form_expired_title", "form_expired", 400)
        d = demo()
        tokens = load_tokens() or {}
        lang = session.get("lang")
        drop_tokens()
        session.clear()
        if lang:
            session["lang"] = lang
        id_token = tokens.get("id_token")
        if not id_token:
            session["notice"] = "signed_out"
            return redirect(url_for("index"), code=303)
        try:
            meta = d.metadata()
            _revoke_quietly(d, meta, tokens.get("refresh_token"))
            return d.client.logout_redirect(
                post_logout_redirect_uri=d.config.post_logout_redirect_uri,
                id_token_hint=id_token,
                client_id=d.config.client_id,
                ui_locales=current_lang(),
            )
        except PROVIDER_DOWN_OR_NO_LOGOUT as exc:
            log.warning("sign-out at the provider is not possible: %s", exc.__class__.__name__)
            session["notice"] = "signed_out_locally"
            return redirect(url_for("index"), code=303)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        if status == 404:
            return message_page("not_found_title", "check_address", 404)
        if status < 500:
            return message_page("bad_request_title", "check_address", status)
        return message_page("server_error_title", "server_error", status)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        # Logged with the stack trace; the browser gets a plain apology.
        log.exception("unhandled error on %s %s", request.method, request.path)
        try:
            return message_page("server_error_title", "server_error", 500)
        except Exception:  # the error page itself failed
            return Response("500 Internal Server Error\n", status=500, mimetype="text/plain")

    return app


def _revoke_quietly(d: Demo, meta: Mapping[str, Any], refresh_token: str | None) -> None:
    """Revoke the refresh token (best effort): the provider's sign-out also revokes the
    tokens of its session, but the user may never reach it."""
    endpoint = meta.get("revocation_endpoint")
    if not refresh_token or not endpoint:
        return
    data = {"token": refresh_token, "token_type_hint": "refresh_token"}
    auth: tuple[str, str] | None = None
    if d.config.client_secret is None:
        data["client_id"] = d.config.client_id
    else:
        auth = (d.config.client_id, d.config.client_secret)
    try:
        requests.post(endpoint, data=data, auth=auth, timeout=5)
    except requests.RequestException as exc:
        log.info("refresh token revocation failed: %s", exc.__class__.__name__)
