"""A person's personal-data export, produced by staff for the person's request (idp/privacy.py).

``/admin/accounts/<id>/personal-data``: holders of ``privacy:data:export`` (seeded for
the school admin and the security officer) give a reason (the request: who asked, how,
when) and get the same JSON document the person downloads from their account page.
Journalled ``privacy:export:admin`` with the reason, in the same transaction."""

from __future__ import annotations

from typing import Any

from flask import abort, render_template
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import TextAreaField
from wtforms.validators import DataRequired, Length

from admin_ui import bp
from admin_ui.guard import record_console_event, requires
from idp.accounts.admin import MAX_REASON
from idp.accounts.models import User
from idp.login.personal_data import attachment
from idp.privacy import export_personal_data
from idp.services import services


class PersonalDataForm(FlaskForm):
    reason = TextAreaField(validators=[
        DataRequired(message=_l("Enter a reason: whose request this is and how it was made.")),
        Length(max=MAX_REASON, message=_l("At most %(max)d characters.", max=MAX_REASON)),
    ])


def _page(user: User, form: PersonalDataForm, status: int = 200) -> tuple[str, int]:
    return render_template("admin/accounts/personal_data.html", user=user, form=form), status


@bp.route("/accounts/<int:user_id>/personal-data", methods=["GET", "POST"])
@requires("privacy:data:export")
def account_personal_data(user_id: int) -> Any:
    svc = services()
    db = svc.db.session
    user = db.get(User, user_id)
    if user is None:
        abort(404)
    form = PersonalDataForm()
    if not form.is_submitted():
        return _page(user, form)
    if not form.validate():
        return _page(user, form, 400)
    reason = form.reason.data.strip()
    document = export_personal_data(db, user, sessions=svc.sessions.list(user.id))
    record_console_event("privacy:export:admin", subject=f"user:{user.id}", reason=reason,
                         details={"format": document["format"], "via": "console"})
    db.commit()
    return attachment(document, user.login)
