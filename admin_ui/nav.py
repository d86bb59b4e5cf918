"""The console's navigation: each area adds its entry point with the permission it needs."""

from __future__ import annotations

from typing import Any

from flask_babel import lazy_gettext as _l

from admin_ui import bp
from admin_ui.guard import can

# (endpoint, permission, label); areas append in the order they should appear.
NAV: list[tuple[str, str, Any]] = []


def add_nav(endpoint: str, permission: str, label: Any) -> None:
    NAV.append((endpoint, permission, label))


@bp.app_context_processor
def _console_context() -> dict[str, Any]:
    return {"admin_nav": NAV, "can": can}


__all__ = ["add_nav", "NAV", "_l"]
