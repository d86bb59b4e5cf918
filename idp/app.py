"""The application factory: settings, services, extensions, blueprints, errors."""

from __future__ import annotations

import logging
from datetime import UTC, timedelta
from typing import Any

from flask import Flask, Response, g, jsonify, render_template, request
from flask_babel import format_timedelta
from flask_babel import gettext as _
from flask_login import AnonymousUserMixin, LoginManager
from flask_wtf.csrf import CSRFError, CSRFProtect
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import DataError, OperationalError, SQLAlchemyError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

from idp import i18n, logs, observability, security_headers
from idp.accounts.models import User
from idp.config import Settings
from idp.login.throttle import Throttled
from idp.services import Services
from idp.sessions.store import RedisSessionInterface

log = logging.getLogger("darbaza")
csrf = CSRFProtect()

# Endpoints called by portal apps, not by a browser form: they answer OAuth JSON
# errors and are not protected by the CSRF token (they authenticate the client).
PROTOCOL_PATHS = ("/token", "/revoke", "/introspect", "/userinfo", "/.well-known/", "/jwks.json", "/admin/api/")


class RowIdConverter(IntegerConverter):
    """``<int:...>`` in routes: an id that fits the INTEGER id columns (32-bit on
    PostgreSQL). A larger one is no row (404) instead of an overflow in the database
    driver (SQLite raises OverflowError past 2**63: a 500)."""

    def __init__(self, map: Any, *args: Any, **kwargs: Any) -> None:  # noqa: A002
        kwargs.setdefault("max", 2**31 - 1)
        super().__init__(map, *args, **kwargs)


def _wants_json() -> bool:
    return request.path.startswith(PROTOCOL_PATHS)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.url_map.converters["int"] = RowIdConverter
    app.config.update(
        SECRET_KEY=settings.secret_key,
        TESTING=settings.testing,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
        MAX_CONTENT_LENGTH=1024 * 1024,
        MAX_FORM_MEMORY_SIZE=256 * 1024,
        MAX_FORM_PARTS=200,
        JSON_SORT_KEYS=False,
    )
    # JSON (or text) lines on stderr, secrets masked (idp/logs.py).
    logs.setup_logging(settings.log_level, settings.log_format)

    svc = Services.build(settings)
    app.extensions["darbaza"] = svc
    app.session_interface = RedisSessionInterface(
        svc.redis,
        idle_timeout=settings.session_idle_timeout,
        absolute_timeout=settings.session_absolute_timeout,
        secure=settings.cookie_secure,
    )
    if settings.trusted_proxies:
        # R30: only the configured number of proxies may set X-Forwarded-*.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app,
            x_for=settings.trusted_proxies,
            x_proto=settings.trusted_proxies,
            x_host=settings.trusted_proxies,
        )

    # The request id and the access line, before any hook that may refuse the request.
    logs.init_app(app, settings.trusted_proxies)
    observability.init_app(app, svc.metrics or observability.MetricsBuffer(svc.redis))  # request latency for /metrics
    csrf.init_app(app)
    i18n.init_app(app)
    security_headers.init_app(app, https=settings.is_https)

    # One LoginManager per app: its user loader closes over this app's services. A
    # module-wide one kept the loader of the app created last, so an earlier app (the
    # test server, when a CLI command built another app in the same process) loaded its
    # users through the other app's database pool, never returning those connections.
    login_manager = LoginManager(app)
    login_manager.login_view = "login.login"
    login_manager.session_protection = None  # the session id is rotated and checked server-side

    @login_manager.user_loader
    def _load_user(user_id: str) -> User | None:
        # STYLE 8: re-check the account on every request.
        from flask import session

        if session.get("uid") is None or str(session.get("uid")) != str(user_id):
            return None
        user = svc.db.session.get(User, int(user_id))
        if user is None or not user.can_sign_in:
            return None
        changed = user.password_changed_at
        if changed is not None and session.get("auth_time", 0) < changed.replace(tzinfo=UTC).timestamp() - 1:
            return None
        return user

    from idp.login.views import bp as login_bp
    from idp.oidc.server import build_server
    from idp.oidc.views import bp as oidc_bp

    app.extensions["darbaza_oauth"] = build_server(app, svc)
    app.register_blueprint(login_bp)
    app.register_blueprint(oidc_bp)
    from idp.breach.views import bp as breach_bp

    app.register_blueprint(breach_bp)
    from idp.teacher.views import bp as teacher_bp

    app.register_blueprint(teacher_bp)
    from idp.guardian.views import bp as guardian_bp

    app.register_blueprint(guardian_bp)
    import admin_ui
    from idp.oidc import cors

    admin_ui.init_app(app)
    cors.init_app(app)
    # /metrics for Prometheus (loopback or the metrics bearer token).
    app.register_blueprint(observability.bp)
    from idp.oidc import views as oidc_views

    # Protocol endpoints authenticate the client (or are the RP's own front-channel
    # request), they carry no form token of ours.
    for view in (
        oidc_views.token,
        oidc_views.revoke,
        oidc_views.introspect,
        oidc_views.userinfo,
        oidc_views.authorize,
        oidc_views.end_session,
    ):
        csrf.exempt(view)

    @app.before_request
    def _session_store_reachable() -> None:
        # The session store failed when the request began (idp/sessions/store.py): the
        # RedisError handler below answers 503 (page or JSON).
        from flask import session as flask_session

        failure = getattr(flask_session, "unavailable", None)
        if failure is not None:
            raise failure

    @app.teardown_appcontext
    def _close_db(_exc: BaseException | None) -> None:
        svc.db.remove()

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Any:
        checks = {}
        try:
            svc.db.session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except SQLAlchemyError:
            checks["database"] = "unavailable"
        try:
            svc.redis.ping()
            checks["redis"] = "ok"
        except RedisError:
            checks["redis"] = "unavailable"
        ready = all(v == "ok" for v in checks.values())
        return jsonify({"status": "ready" if ready else "unavailable", **checks}), 200 if ready else 503

    _register_errors(app)
    return app


def _error(status: int, code: str, title: str, message: str) -> Any:
    if request.path.startswith("/admin/api/"):
        # Outside the API's blueprint (an unknown version or path): the API's own Error
        # schema (admin_ui/openapi.py), as its blueprint answers.
        response = jsonify({"error": code, "message": message})
        response.status_code = status
        response.headers["Cache-Control"] = "no-store"
        return response
    if _wants_json():
        response = jsonify({"error": code, "error_description": message})
        response.status_code = status
        response.headers["Cache-Control"] = "no-store"
        return response
    try:
        return render_template("error.html", title=title, message=message), status
    except Exception:  # the error page itself failed: answer in plain text, never a trace
        log.exception("error page could not be rendered")
        return Response(f"{status} {title}\n{message}\n", status=status, mimetype="text/plain")


def _register_errors(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def _csrf(_e: CSRFError) -> Any:
        from flask import session as flask_session

        if getattr(flask_session, "unavailable", None) is not None:
            # The form token could not be checked because the session store is down
            # (CSRFProtect runs before ``_session_store_reachable``): say so, not "expired".
            return _store_down()
        return _error(
            400,
            "invalid_request",
            _("The form has expired"),
            _("The page was open too long or was sent twice. Go back, reload it and try again."),
        )

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> Any:
        status = e.code or 500
        if status == 405 and _wants_json():
            return _error(405, "invalid_request", "", "This HTTP method is not allowed here.")
        code = {400: "invalid_request", 401: "invalid_client", 403: "forbidden", 404: "not_found", 413: "invalid_request"}.get(
            status, "invalid_request" if status < 500 else "server_error"
        )
        titles = {
            400: _("The request is not valid"),
            403: _("You do not have access to this page"),
            404: _("Page not found"),
            405: _("This action is not allowed here"),
            413: _("The request is too large"),
        }
        return _error(status, code, titles.get(status, _("Something went wrong")), _("Check the address and try again."))

    @app.errorhandler(DataError)
    def _bad_data(e: DataError) -> Any:
        # A value the database refuses (a NUL byte on PostgreSQL, a number out of range):
        # the request is bad, not the server; nothing was written.
        log.warning("database refused a value on %s: %s", request.path, e.__class__.__name__)
        return _error(400, "invalid_request", _("The request is not valid"), _("Check the address and try again."))

    @app.errorhandler(Throttled)
    def _throttled(e: Throttled) -> Any:
        # The same answer whichever limit was hit and whether the login exists.
        wait = format_timedelta(timedelta(seconds=e.retry_after), threshold=1.5, add_direction=False)
        if e.purpose.startswith(("password-reset", "email-link", "breach-report")):
            # Mail links (idp/login/password_reset.py, email_change.py): not a failed sign-in.
            message = _("Too many requests. Try again in %(wait)s.", wait=wait)
        else:
            message = _("Too many failed sign-in attempts. Try again in %(wait)s.", wait=wait)
        response = _error(429, "too_many_requests", _("Too many attempts"), message)
        return _with_retry_after(response, e.retry_after)

    @app.errorhandler(RedisError)
    def _redis_down(e: RedisError) -> Any:
        log.error("redis unavailable: %s", e)
        return _store_down()

    @app.errorhandler(OperationalError)
    def _db_down(e: OperationalError) -> Any:
        log.error("database unavailable: %s", e.__class__.__name__)
        # The answer is made for an anonymous visitor: the locale and the page would load
        # the signed-in account from the database that just failed (a bare 500).
        g._login_user = AnonymousUserMixin()
        return _store_down()

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Any:
        # The outermost layer: log with the stack trace, answer without it.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "server_error", _("Something went wrong"), _("Please try again in a minute."))


def _with_retry_after(response: Any, seconds: int) -> Any:
    if isinstance(response, tuple):
        body, status = response
        return body, status, {"Retry-After": str(seconds)}
    response.headers["Retry-After"] = str(seconds)
    return response


def _store_down() -> Any:
    response = _error(
        503,
        "temporarily_unavailable",
        _("The sign-in service is temporarily unavailable"),
        _("Please try again in a minute."),
    )
    return _with_retry_after(response, 30)
