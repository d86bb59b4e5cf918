"""Recording audit events from a request: actor, IP and request id filled in once."""

from __future__ import annotations

from typing import Any

from flask import g, has_request_context, request, session

from idp.services import services


def current_actor() -> str:
    if has_request_context():
        if getattr(g, "audit_actor", None):
            return str(g.audit_actor)
        uid = session.get("uid")
        if uid is not None:
            return f"user:{uid}"
    return "anonymous"


def audit_event(
    action: str,
    *,
    subject: str | None = None,
    reason: str | None = None,
    actor: str | None = None,
    details: dict[str, Any] | None = None,
    commit: bool = True,
) -> None:
    """Append one event to the journal in the request's database session."""
    svc = services()
    db = svc.db.session
    svc.journal.record(
        db,
        actor=actor or current_actor(),
        action=action,
        subject=subject,
        reason=reason,
        ip=request.remote_addr if has_request_context() else None,
        request_id=getattr(g, "request_id", None) if has_request_context() else None,
        details=details,
    )
    if commit:
        db.commit()
