"""Console access: a signed-in account holding the view's permission.

``console_access_hook`` is the one place console-wide rules plug in: the console is
opened only by a session that was signed in with two factors (issue 4)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import abort, g, redirect, render_template, request, session, url_for
from flask_login import current_user

from idp.access.permissions import PERMISSIONS
from idp.accounts.admin import Actor

F = TypeVar("F", bound=Callable[..., Any])


def console_access_hook(user: Any) -> Any | None:
    """Return a response to stop a console request, or None to let it through.

    The console needs a sign-in with a second factor (the session's ``amr`` holds
    "mfa"): a password alone, even the right one, does not open it. The page says how
    to get there: set up a second factor, or sign in again with it."""
    if "mfa" in (session.get("amr") or []):
        return None
    page = render_template("admin/needs_2fa.html", has_second_factor=bool(user.has_second_factor))
    return page, 403


def current_actor() -> Actor:
    return Actor(
        ref=f"user:{current_user.id}",
        permissions=set(current_user.permissions),
        ip=request.remote_addr,
        request_id=getattr(g, "request_id", None),
    )


def requires(permission: str) -> Callable[[F], F]:
    """Declare the permission a console view needs (checked on every request)."""
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission}")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not current_user.is_authenticated:
                return redirect(url_for("login.login", next=request.full_path.rstrip("?")), code=302)
            stop = console_access_hook(current_user)
            if stop is not None:
                return stop
            if permission not in current_user.permissions:
                abort(403)
            g.audit_actor = f"user:{current_user.id}"
            return view(*args, **kwargs)

        wrapper.required_permission = permission  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def can(permission: str) -> bool:
    return bool(current_user.is_authenticated and permission in current_user.permissions)


def record_console_event(
    action: str, *, subject: str, reason: str | None = None, details: dict[str, Any] | None = None
) -> None:
    """Journal a console change in the request's transaction, as the signed-in actor."""
    from idp.services import services

    svc = services()
    actor = current_actor()
    svc.journal.record(
        svc.db.session,
        actor=actor.ref,
        action=action,
        subject=subject,
        reason=reason,
        ip=actor.ip,
        request_id=actor.request_id,
        details=details or {},
    )
