""""My data" (``GET /account/data.json``): the signed-in person downloads everything
Darbaza holds about them as one JSON document (idp/privacy.py; Kyrgyz law on personal
information). It is a bulk disclosure (IP addresses, devices, the journal), so like the
other sensitive account pages it needs a recent sign-in (``fresh_auth_required``): a
session left open on a shared computer does not hand it out. Journalled
``privacy:export:self``; never cached."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, g, redirect, request, url_for
from flask_login import current_user

from idp.login.reauth import fresh_auth_required
from idp.login.views import bp
from idp.privacy import export_personal_data
from idp.services import services


def attachment(document: dict[str, Any], login: str) -> Response:
    """The export as a download: an attachment that is never cached."""
    body = json.dumps(document, ensure_ascii=False, indent=2, sort_keys=False) + "\n"
    response = Response(body, mimetype="application/json")
    safe_login = "".join(c for c in login if c.isalnum() or c in "._-") or "account"
    response.headers["Content-Disposition"] = f'attachment; filename="darbaza-{safe_login}.json"'
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/account/data.json")
@fresh_auth_required
def personal_data() -> Any:
    if not current_user.is_authenticated:
        return redirect(url_for("login.login", next=url_for("login.personal_data")), code=302)
    svc = services()
    db = svc.db.session
    user = current_user._get_current_object()
    document = export_personal_data(db, user, sessions=svc.sessions.list(user.id))
    svc.journal.record(
        db, actor=f"user:{user.id}", action="privacy:export:self", subject=f"user:{user.id}",
        ip=request.remote_addr, request_id=getattr(g, "request_id", None),
        details={"format": document["format"]},
    )
    db.commit()
    return attachment(document, user.login)
