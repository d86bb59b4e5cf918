"""Roster import in the console: upload a CSV file, read the dry-run report, apply.

The uploaded file is kept in the signed-in server-side session (Redis) between the
report and "apply", bound by its SHA-256 shown in the apply form; the activation codes
of new accounts are shown once, on a page that is not cached. The report lists the
roster accounts that would be disabled; when that is more than half of them (a mass
disable, see connectors/roster/planner.py) applying needs the confirmation checkbox."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from flask import make_response, render_template, session
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from wtforms import BooleanField, HiddenField

from admin_ui import bp
from admin_ui.guard import current_actor, requires
from admin_ui.nav import add_nav
from connectors.roster.applier import MassDisableRefused, RosterRejected, apply
from connectors.roster.parser import RosterFileError, parse
from connectors.roster.planner import plan
from idp.accounts.admin import AccountAdmin
from idp.services import services

SESSION_KEY = "roster_upload"


class UploadForm(FlaskForm):
    file = FileField(validators=[FileRequired(message=_l("Choose a CSV file."))])


class ApplyForm(FlaskForm):
    digest = HiddenField()
    # Shown only when the import would disable more than half of the roster accounts.
    allow_mass_disable = BooleanField()


def _admin() -> AccountAdmin:
    svc = services()
    return AccountAdmin(db=svc.db.session, journal=svc.journal, passwords=svc.passwords, sessions=svc.sessions)


def _no_store(body: str, status: int = 200) -> Any:
    response = make_response(body, status)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/roster", methods=["GET", "POST"])
@requires("admin:users:write")
def roster_upload() -> Any:
    form = UploadForm()
    if not form.validate_on_submit():
        return render_template("admin/roster/upload.html", form=form, problem=None)
    data = form.file.data.read()
    try:
        parsed = parse(data)
    except RosterFileError as exc:
        return render_template("admin/roster/upload.html", form=form,
                               problem=_("The file cannot be read: %(reason)s", reason=str(exc))), 400
    db = services().db.session
    planned = plan(db, parsed)
    db.rollback()
    digest = hashlib.sha256(data).hexdigest()
    if planned.ok:
        session[SESSION_KEY] = {"digest": digest, "data": base64.b64encode(data).decode("ascii")}
    else:
        session.pop(SESSION_KEY, None)
    return render_template("admin/roster/report.html", plan=planned, apply_form=ApplyForm(digest=digest), problem=None)


@bp.post("/roster/apply")
@requires("admin:users:write")
def roster_apply() -> Any:
    form = ApplyForm()
    stored = session.get(SESSION_KEY)
    if not form.validate_on_submit() or not stored or stored.get("digest") != form.digest.data:
        return render_template("admin/roster/upload.html", form=UploadForm(),
                               problem=_("Upload the file again: the checked file is no longer there.")), 400
    db = services().db.session
    try:
        result = apply(_admin(), current_actor(), parse(base64.b64decode(stored["data"])),
                       allow_mass_disable=bool(form.allow_mass_disable.data))
    except MassDisableRefused as exc:
        db.rollback()
        # The checked file stays in the session: the same report, now asking to confirm.
        return render_template("admin/roster/report.html", plan=exc.plan, apply_form=ApplyForm(digest=form.digest.data),
                               problem=_("Nothing was changed: confirm that %(count)s accounts are to be disabled.",
                                         count=len(exc.plan.disable))), 400
    except (RosterRejected, RosterFileError) as exc:
        db.rollback()
        errors = exc.errors if isinstance(exc, RosterRejected) else []
        return render_template("admin/roster/upload.html", form=UploadForm(), errors=errors,
                               problem=_("Nothing was changed.")), 400
    db.commit()
    session.pop(SESSION_KEY, None)
    return _no_store(render_template("admin/roster/done.html", result=result))


add_nav("admin.roster_upload", "admin:users:write", _l("Roster import"))
