"""Breach cases (policy 5.2.3): open a case and contain the account at once, then record
each later step of the case.

``open_case`` does everything in the caller's transaction, in the request that carries
the report, whether or not anyone is at work:

* every session of the account ends (``SessionRegistry.end_all``): each browser is signed
  out in every server process at once, every refresh and access token of the account is
  revoked (a refresh answers ``invalid_grant``, userinfo 401), and every portal app used
  from a session is queued a back-channel logout token;
* the next sign-in must set a new password (``must_change_password``);
* the account is **locked** when the report says someone else controls the account or a
  device or second factor was lost (``LOCKING_CATEGORIES``):

  ============================  ====================================  =====
  category                      what the person said                  lock
  ============================  ====================================  =====
  ``shared-password``           I gave my password to someone         no
  ``unknown-activity``          I see activity I don't recognise      yes (someone else uses it)
  ``lost-device``               I lost my phone or device             yes (a second factor may be in other hands)
  ``not-me``                    "This wasn't me" (new-device notice)  yes (someone else signed in)
  ``other``                     other                                 no
  ============================  ====================================  =====

  A shared password is known to a person the reporter named, not an intruder: the new
  password at the next sign-in takes it back. Tech support adjusts containment later
  (unlock, reset 2FA, activation code) from the console;
* the case is stored with its support deadline (one working day, from the working
  calendar) and the reporter's side of the rule: a report made more than one working
  day after the person noticed it is marked ``late``;
* the steps ``report`` and ``contain`` are stored and journalled
  (``breach:case:report``, ``breach:case:contain``);
* mail is queued in the outbox: a confirmation with the case number to the reporter (the
  account's address, and the contact given when it is an e-mail address) and a notice to
  tech support (``IDP_SUPPORT_EMAIL``). The outbox delivers it when the mail server is
  reachable: the report never waits for mail, and no report is lost when mail is down.

A report from the sign-in page for a login no account has is stored too (no account,
nothing to contain, ``reason="unknown-login"`` in the journal): the person gets the same
answer and the same confirmation mail either way (no account enumeration), and support
still sees the report should the login have been mistyped.

``step`` records a later change of a case (state, outcome, notes, identity verified ...)
with actor, time and note, journals it as ``breach:case:<action>`` and mails the
reporter when the case is resolved. The console (admin_ui/breach.py) calls it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from idp.accounts import email_address
from idp.accounts.models import User
from idp.breach.models import BreachCase, BreachCaseStep
from idp.notify.notices import local_time
from idp.notify.outbox import OutboxError, _check_address
from idp.workdays.calendar import is_late, load_calendar

if TYPE_CHECKING:
    from idp.services import Services

log = logging.getLogger("darbaza.breach")

DOORS = ("account", "sign-in-page", "not-me")
CATEGORIES = ("shared-password", "unknown-activity", "lost-device", "other", "not-me")
# The categories a person may pick on a form (``not-me`` comes only from the notice link).
FORM_CATEGORIES = ("shared-password", "unknown-activity", "lost-device", "other")
# Someone else controls the account, or a device / second factor is in other hands.
LOCKING_CATEGORIES = frozenset({"unknown-activity", "lost-device", "not-me"})
STATES = ("reported", "contained", "in_review", "resolved")
OUTCOMES = ("confirmed", "false_alarm", "duplicate")
MAX_DESCRIPTION = 2000
LOCK_REASON = "breach report {number}"

# Columns ``step`` may change; everything else of a case is fixed at the report.
STEP_FIELDS = frozenset({
    "state", "outcome", "identity_verified_at", "resolved_at", "escalated_75_at", "escalated_overdue_at",
    "deadline_at", "containment", "contained_at",
})


class BreachError(ValueError):
    """A case cannot be opened or changed as asked (unknown door, category, state ...)."""


def naive_utc(moment: datetime) -> datetime:
    """The database's form of a moment: naive UTC (a naive input is taken as UTC)."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def aware_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def mail_contact(contact: str | None) -> str | None:
    """The contact as a mail address when it is one, else None (a phone number)."""
    if not contact or "@" not in contact:
        return None
    normalised = email_address.normalise_email(contact.strip())
    if normalised is None:
        return None
    try:
        return _check_address(normalised)
    except OutboxError:
        return None


def _svc(svc: Services | None) -> Services:
    if svc is not None:
        return svc
    from idp.services import services

    return services()


def _recipients(case: BreachCase, user: User | None, reporter_locale: str | None) -> list[tuple[str, str, str | None]]:
    """Where the reporter hears from us, as (address, name, locale): the account's
    address (its name and language), and the contact given when it is another e-mail
    address. The contact was typed by whoever filed the report, so it is written to with
    the login as typed and the page's language, never the account's name or language
    (nothing in that mail says whether the account exists)."""
    found: list[tuple[str, str, str | None]] = []
    account_address = mail_contact(user.email) if user is not None else None
    if user is not None and account_address:
        found.append((account_address, user.display_name, user.locale))
    contact = mail_contact(case.contact)
    if contact and not any(email_address.same_address(contact, a) for a, _n, _l in found):
        found.append((contact, case.login_given or "", reporter_locale))
    return found


def _journal(svc: Services, db: Session, case: BreachCase, *, actor: str, action: str, reason: str | None,
             ip: str | None, request_id: str | None, details: dict[str, Any]) -> None:
    svc.journal.record(
        db, actor=actor, action=action,
        subject=f"user:{case.user_id}" if case.user_id is not None else None,
        reason=reason, ip=ip, request_id=request_id,
        details={"case": case.number, **details},
    )


def _contain(svc: Services, db: Session, user: User, case: BreachCase, *, actor: str) -> dict[str, Any]:
    """End every session and token, require a new password, lock when the category says
    so. Returns what was done (stored in ``case.containment``)."""
    ended = svc.sessions.end_all(db, user.id, reason="breach-report", actor=actor)
    user.must_change_password = True
    lock = case.category in LOCKING_CATEGORIES
    was_locked = user.locked
    if lock and not was_locked:
        user.locked = True
        user.lock_reason = LOCK_REASON.format(number=case.number)
    return {
        "sessions_ended": ended,
        "tokens_revoked": True,
        "backchannel_logout_queued": True,
        "password_change_required": True,
        "locked": bool(lock or was_locked),
        "locked_by_case": bool(lock and not was_locked),
    }


def _mail(svc: Services, db: Session, template: str, to: str, locale: str | None, context: dict[str, Any]) -> None:
    try:
        svc.outbox.enqueue(db, template=template, to=to, locale=locale, context=context)
    except OutboxError:
        # A stored address the outbox refuses: logged; the case and containment stand.
        log.warning("mail %s for a breach case not queued: the address is not usable", template)


def open_case(
    db: Session,
    *,
    user: User | None,
    door: str,
    category: str,
    description: str,
    noticed_at: datetime | None,
    contact: str | None,
    login_given: str | None,
    ip: str | None,
    actor: str,
    svc: Services | None = None,
    request_id: str | None = None,
    now: datetime | None = None,
    details: dict[str, Any] | None = None,
    reporter_locale: str | None = None,
) -> BreachCase:
    """Store a report and contain the account at once (see the module's docstring), in
    the caller's transaction; the caller commits. ``user`` is None only for a sign-in-page
    report naming a login no account has. ``noticed_at`` and ``now`` are aware (a naive
    value is taken as UTC); ``details`` are kept with the containment (e.g. the sign-in a
    "This wasn't me" link reported); ``reporter_locale`` is the language of the page the
    report was made on (for the mail to a contact address)."""
    svc = _svc(svc)
    if door not in DOORS:
        raise BreachError(f"unknown door {door!r}")
    if category not in CATEGORIES:
        raise BreachError(f"unknown category {category!r}")
    reported = aware_utc(now or svc.clock())
    noticed = aware_utc(noticed_at) if noticed_at is not None else None
    if noticed is not None and noticed > reported:
        noticed = reported  # a clock a little ahead; never "noticed after reporting"
    calendar = load_calendar(db, svc.settings)
    deadline = calendar.deadline(reported)
    case = BreachCase(
        user_id=user.id if user is not None else None,
        door=door,
        category=category,
        description=(description or "").strip()[:MAX_DESCRIPTION],
        contact=(contact or "").strip()[:320] or None,
        login_given=(login_given or "").strip()[:128] or None,
        noticed_at=naive_utc(noticed) if noticed is not None else None,
        reported_at=naive_utc(reported),
        late=bool(noticed is not None and is_late(calendar, noticed, reported)),
        state="reported",
        containment={},
        deadline_at=naive_utc(deadline),
        reporter_ip=(ip or None) and str(ip)[:64],
    )
    db.add(case)
    db.flush()  # the number
    report_details = {
        "door": door, "category": category, "late": case.late,
        "deadline": case.deadline_at.isoformat() + "Z",
        "noticed_at": case.noticed_at.isoformat() + "Z" if case.noticed_at else None,
    }
    db.add(BreachCaseStep(case_id=case.id, at=case.reported_at, actor=actor, action="report",
                          note="", details=report_details))
    _journal(svc, db, case, actor=actor, action="breach:case:report",
             reason="unknown-login" if user is None else category, ip=ip, request_id=request_id,
             details={**report_details, **({"login": case.login_given} if user is None else {})})

    if user is not None:
        containment = _contain(svc, db, user, case, actor="system")
        containment.update(details or {})
        case.containment = containment
        case.contained_at = naive_utc(svc.clock())
        case.state = "contained"
        db.add(BreachCaseStep(case_id=case.id, at=case.contained_at, actor="system", action="contain",
                              note="", details=containment))
        _journal(svc, db, case, actor="system", action="breach:case:contain", reason=category, ip=ip,
                 request_id=request_id, details=containment)
    else:
        case.containment = {"account": "unknown", **(details or {})}

    _queue_report_mails(svc, db, case, user, reporter_locale)
    return case


def _queue_report_mails(svc: Services, db: Session, case: BreachCase, user: User | None,
                        reporter_locale: str | None) -> None:
    reported = local_time(aware_utc(case.reported_at))
    deadline = local_time(aware_utc(case.deadline_at))
    # From the category, not from what happened: the same words whether or not the
    # login named an account.
    locked = case.category in LOCKING_CATEGORIES
    for address, name, locale in _recipients(case, user, reporter_locale):
        _mail(svc, db, "breach_report_received", address, locale, {
            "display_name": name,
            "case_number": case.number,
            "reported_at": reported,
            "deadline": deadline,
            "locked": locked,
        })
    support = (svc.settings.support_email or "").strip()
    if support:
        _mail(svc, db, "breach_case_new", support, svc.outbox.default_locale, {
            "case_number": case.number,
            "login": user.login if user is not None else (case.login_given or ""),
            "account_found": user is not None,
            "door": case.door,
            "category": case.category,
            "reported_at": reported,
            "noticed_at": local_time(aware_utc(case.noticed_at)) if case.noticed_at else "-",
            "deadline": deadline,
            "late": case.late,
            "contact": case.contact or "-",
            "locked": bool(case.containment.get("locked")),
            "sessions_ended": int(case.containment.get("sessions_ended", 0) or 0),
        })
    else:
        log.warning("IDP_SUPPORT_EMAIL is empty: tech support is not mailed about case %s", case.number)


def step(
    db: Session,
    case: BreachCase,
    *,
    actor: str,
    action: str,
    note: str = "",
    svc: Services | None = None,
    ip: str | None = None,
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
    **changes: Any,
) -> BreachCaseStep:
    """Record one step of ``case`` (``action`` such as ``note``, ``identity-verified``,
    ``review``, ``resolve``) with ``changes`` to its columns (``state``, ``outcome``,
    ``identity_verified_at`` ...), in the caller's transaction; journalled as
    ``breach:case:<action>``. Moving to ``resolved`` needs an outcome, sets
    ``resolved_at`` and mails the reporter that the case is resolved. A resolved case
    takes notes only."""
    svc = _svc(svc)
    unknown = set(changes) - STEP_FIELDS
    if unknown:
        raise BreachError(f"a step cannot change {', '.join(sorted(unknown))}")
    if not action or len(action) > 64 or not all(c.isalnum() or c in "-_" for c in action):
        raise BreachError("the action is a short name such as 'resolve'")
    new_state = changes.get("state")
    if new_state is not None and new_state not in STATES:
        raise BreachError(f"unknown state {new_state!r}")
    outcome = changes.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise BreachError(f"unknown outcome {outcome!r}")
    if case.state == "resolved" and (new_state not in (None, "resolved") or outcome is not None):
        raise BreachError("the case is resolved")
    now = naive_utc(svc.clock())
    resolving = new_state == "resolved" and case.state != "resolved"
    if resolving:
        if (outcome or case.outcome) is None:
            raise BreachError("resolving a case needs an outcome")
        changes.setdefault("resolved_at", now)
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for name, value in changes.items():
        if isinstance(value, datetime):
            value = naive_utc(value)
        old = getattr(case, name)
        if old != value:
            before[name], after[name] = _plain(old), _plain(value)
            setattr(case, name, value)
    record = {**(details or {}), **({"changes": {k: [before[k], after[k]] for k in after}} if after else {})}
    row = BreachCaseStep(case_id=case.id, at=now, actor=actor, action=action, note=(note or "")[:4000],
                         details=record)
    db.add(row)
    _journal(svc, db, case, actor=actor, action=f"breach:case:{action}", reason=(note or None) and note[:500],
             ip=ip, request_id=request_id, details=record)
    if resolving:
        user = db.get(User, case.user_id) if case.user_id is not None else None
        for address, name, locale in _recipients(case, user, None):
            _mail(svc, db, "breach_case_resolved", address, locale, {
                "display_name": name,
                "case_number": case.number,
                "outcome": case.outcome,
                "resolved_at": local_time(aware_utc(case.resolved_at or now)),
            })
    return row


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    return value
