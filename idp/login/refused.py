"""``/login/refused``: why restrictions (policy 5.1) refused a sign-in (idp/login/refusal.py)."""

from __future__ import annotations

from typing import Any

from idp.login.refusal import show_sign_in_refusal
from idp.login.views import bp


@bp.get("/login/refused")
def refused() -> Any:
    return show_sign_in_refusal()
