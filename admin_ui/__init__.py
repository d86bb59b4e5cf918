"""The console for school admins, tech support and the security officer (``/admin``).

Each area lives in its own module and registers its views on the one blueprint here;
every view declares the single permission it needs with ``@requires(...)``."""

from __future__ import annotations

from flask import Blueprint, Flask

bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")


def init_app(app: Flask) -> None:
    # Importing the area modules registers their views on ``bp``.
    from admin_ui import areas  # noqa: F401

    app.register_blueprint(bp)
    from admin_ui.api import api  # the JSON admin API at /admin/api/v1 (CSRF-exempt, bearer tokens)

    app.register_blueprint(api)
