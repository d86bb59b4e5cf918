"""Console: the school directory (README, "School directory").

Shows the directory configuration (never the service account's password), the last
synchronisation runs with their summaries and a run's errors, and lets an administrator
start a sync now. The sync runs in the request (a school's directory syncs in seconds to
a minute; the Redis lock keeps it from overlapping with the worker's); a directory that
cannot be reached fails the run and says so in a flash message, never a 500.

Reading needs ``admin:users:read``; starting a sync ``admin:users:write``."""

from __future__ import annotations

import logging
from typing import Any

from flask import abort, flash, redirect, render_template, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import BooleanField, RadioField

from admin_ui import bp
from admin_ui.guard import record_console_event, requires
from admin_ui.nav import add_nav
from connectors.ldap.config import DirectoryConfig, directory_config
from connectors.ldap.models import DirectorySyncRun
from connectors.ldap.sync import SyncDeps, SyncRefused, lock_held, run_sync
from idp.config import SettingsError
from idp.services import services

RUNS_SHOWN = 25
log = logging.getLogger("darbaza.directory")


class SyncForm(FlaskForm):
    mode = RadioField(choices=[("incremental", _l("What changed since the last run")),
                               ("full", _l("Everything (also disables accounts gone from the directory)"))],
                      default="incremental")
    dry_run = BooleanField(default=False)


def _config() -> tuple[DirectoryConfig | None, str | None]:
    try:
        return directory_config(services().settings), None
    except SettingsError as exc:
        return None, str(exc)


@bp.get("/directory")
@requires("admin:users:read")
def directory_overview() -> Any:
    config, problem = _config()
    db = services().db.session
    runs = list(db.scalars(select(DirectorySyncRun).order_by(DirectorySyncRun.id.desc()).limit(RUNS_SHOWN)))
    return render_template("admin/directory/overview.html", config=config, problem=problem, runs=runs,
                           form=SyncForm(), running=lock_held(services().redis))


@bp.get("/directory/runs/<int:run_id>")
@requires("admin:users:read")
def directory_run(run_id: int) -> Any:
    run = services().db.session.get(DirectorySyncRun, run_id)
    if run is None:
        abort(404)
    return render_template("admin/directory/run.html", run=run)


@bp.post("/directory/sync")
@requires("admin:users:write")
def directory_sync_now() -> Any:
    form = SyncForm()
    if not form.validate_on_submit():
        flash(_("The form expired; try again."), "error")
        return redirect(url_for("admin.directory_overview"))
    config, problem = _config()
    if config is None or not config.configured:
        flash(_("No directory is configured.") if problem is None else
              _("The directory settings are not valid: %(problem)s", problem=problem), "error")
        return redirect(url_for("admin.directory_overview"))
    svc = services()
    full = form.mode.data == "full"
    dry_run = bool(form.dry_run.data)
    # Who started it, in the journal (the run's changes are journalled by the sync).
    record_console_event("directory:sync:start", subject="directory",
                         details={"mode": "full" if full else "incremental", "dry_run": dry_run})
    svc.db.session.commit()
    deps = SyncDeps(factory=svc.db.factory, redis=svc.redis, journal=svc.journal, sessions=svc.sessions)
    try:
        summary = run_sync(config, deps, full=full, trigger="console", dry_run=dry_run)
    except SyncRefused as exc:
        flash(_("The sync did not start: %(reason)s", reason=str(exc)), "error")
        return redirect(url_for("admin.directory_overview"))
    except Exception:  # noqa: BLE001 - the database or Redis failed: a message, never a 500
        log.exception("directory sync from the console failed")
        flash(_("The sync could not run; see the server log."), "error")
        return redirect(url_for("admin.directory_overview"))
    if summary.status == "completed":
        flash(_("Sync %(id)s completed: created %(created)s, updated %(updated)s, disabled %(disabled)s, "
                "unchanged %(unchanged)s, errors %(errors)s.", id=summary.id, created=summary.created,
                updated=summary.updated, disabled=summary.disabled, unchanged=summary.unchanged,
                errors=summary.error_count))
    else:
        flash(_("Sync %(id)s failed: %(message)s. The next run resumes it.", id=summary.id,
                message=summary.message or ""), "error")
    return redirect(url_for("admin.directory_run", run_id=summary.id))


add_nav("admin.directory_overview", "admin:users:read", _l("Directory"))
