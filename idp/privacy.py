"""A person's own data as one JSON document (Kyrgyz law on personal information: the
right to know what is held about you).

:func:`export_personal_data` builds it; three doors use it:

- the account page (``GET /account/data.json``, signed in with a recent sign-in),
  journalled ``privacy:export:self``;
- the console's account page (a button for holders of ``privacy:data:export``: the
  school admin and the security officer), with a required reason, journalled
  ``privacy:export:admin``; the admin API ``POST /admin/api/v1/users/{id}/personal-data``
  does the same;
- ``darbaza users export LOGIN --reason ...`` (journalled ``privacy:export:admin``).

What is in it: the account (login, names, e-mail, language, roles, classes, source,
guardians/children, times), which second factors are set up (passkey names and times,
when the authenticator app was turned on, how many recovery codes are left), the live
sessions (device, IP, place, times, apps), consents, a per-app summary of issued tokens
(counts and times), breach reports with the steps taken on them, accepted
confidentiality obligations and the journal events about or by the person.

What never is: password hashes, TOTP seeds, recovery-code and token hashes, token values,
session keys, passkey public keys or credential ids, sealed values of any kind. Staff
notes on a breach case and the IP addresses of other people are left out too; who
acted is given as a kind ("self", "user", "client", ...), not as another person's
account.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from idp.accounts.models import ObligationAcceptance, RecoveryCode, User
from idp.audit.models import AuditEvent
from idp.breach.models import BreachCase, BreachCaseStep
from idp.oidc.models import AccessToken, Client, Consent, RefreshToken
from idp.sessions.registry import SessionInfo

FORMAT = "darbaza-personal-data/1"
# The newest this many journal events are included (a busy account signs in a few
# times a day; retention keeps a year of sign-ins).
MAX_JOURNAL_EVENTS = 20_000


def _iso(moment: datetime | None) -> str | None:
    """A naive-UTC database time as ISO 8601 with ``Z``."""
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds") + "Z"


def _epoch(value: float | int | None) -> str | None:
    if value is None:
        return None
    return _iso(datetime.fromtimestamp(float(value), UTC))


def _client_names(session: Session, client_ids: Iterable[str]) -> dict[str, str]:
    wanted = set(client_ids)
    if not wanted:
        return {}
    rows = session.execute(select(Client.client_id, Client.name).where(Client.client_id.in_(wanted)))
    return {client_id: name for client_id, name in rows}


def _account(user: User) -> dict[str, Any]:
    return {
        "subject": user.subject,
        "login": user.login,
        "display_name": user.display_name,
        "email": user.email,
        "email_verified_at": _iso(user.email_verified_at),
        "locale": user.locale,
        "roles": user.role_names,
        "classes": user.class_names,
        "source": user.source,
        "active": user.active,
        "locked": user.locked,
        "lock_reason": user.lock_reason,
        "must_change_password": user.must_change_password,
        "password_set": user.password_hash is not None,
        "password_changed_at": _iso(user.password_changed_at),
        "created_at": _iso(user.created_at),
        "updated_at": _iso(user.updated_at),
        "guardians": [{"login": g.login, "display_name": g.display_name} for g in user.guardians],
        "children": [{"login": c.login, "display_name": c.display_name} for c in user.children],
    }


def _two_factor(session: Session, user: User) -> dict[str, Any]:
    codes_left = session.scalar(
        select(func.count()).select_from(RecoveryCode).where(RecoveryCode.user_id == user.id,
                                                             RecoveryCode.used_at.is_(None))
    )
    return {
        "authenticator_app": {"enabled_at": _iso(user.totp_enabled_at)} if user.has_totp else None,
        "passkeys": [
            {"name": p.name, "created_at": _iso(p.created_at), "last_used_at": _iso(p.last_used_at),
             "backed_up": p.backed_up}
            for p in sorted(user.passkeys, key=lambda p: p.created_at)
        ],
        "recovery_codes_left": int(codes_left or 0),
    }


def _sessions(infos: list[SessionInfo], names: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "device": info.device,
            "ip": info.ip,
            "place": info.network,
            "signed_in_at": _epoch(info.auth_time),
            "last_seen_at": _epoch(info.last_seen),
            "methods": list(info.amr),
            "apps": [names.get(a, a) for a in info.apps],
        }
        for info in infos
    ]


def _consents(session: Session, user: User, names: dict[str, str]) -> list[dict[str, Any]]:
    rows = session.scalars(select(Consent).where(Consent.user_id == user.id).order_by(Consent.granted_at))
    return [{"app": names.get(c.client_id, c.client_id), "client_id": c.client_id, "scopes": list(c.scopes or []),
             "granted_at": _iso(c.granted_at)} for c in rows]


def _tokens(session: Session, user: User, now: int, names: dict[str, str]) -> list[dict[str, Any]]:
    """Per app: how many tokens are still valid and when the last one was issued."""
    summary: dict[str, dict[str, Any]] = {}

    def entry(client_id: str) -> dict[str, Any]:
        return summary.setdefault(client_id, {"app": names.get(client_id, client_id), "client_id": client_id,
                                              "valid_access_tokens": 0, "valid_refresh_tokens": 0,
                                              "last_issued_at": None})

    for model, key in ((AccessToken, "valid_access_tokens"), (RefreshToken, "valid_refresh_tokens")):
        valid = (model.revoked_at.is_(None)) & (model.expires_at > now)
        if model is RefreshToken:
            valid = valid & RefreshToken.used_at.is_(None)
        rows = session.execute(
            select(model.client_id, func.count().filter(valid), func.max(model.issued_at))
            .where(model.user_id == user.id).group_by(model.client_id)
        )
        for client_id, count, last in rows:
            item = entry(client_id)
            item[key] = int(count or 0)
            if last is not None and (item["last_issued_at"] is None or last > item["last_issued_at"]):
                item["last_issued_at"] = last
    for item in summary.values():
        item["last_issued_at"] = _epoch(item["last_issued_at"])
    return sorted(summary.values(), key=lambda i: i["client_id"])


def _breach_reports(session: Session, user: User) -> list[dict[str, Any]]:
    cases = list(session.scalars(select(BreachCase).where(BreachCase.user_id == user.id).order_by(BreachCase.id)))
    steps: dict[int, list[BreachCaseStep]] = {}
    if cases:
        for step in session.scalars(select(BreachCaseStep).where(BreachCaseStep.case_id.in_([c.id for c in cases]))
                                    .order_by(BreachCaseStep.at, BreachCaseStep.id)):
            steps.setdefault(step.case_id, []).append(step)
    me = f"user:{user.id}"
    return [
        {
            "number": case.number,
            "door": case.door,
            "category": case.category,
            "description": case.description,
            "contact": case.contact,
            "noticed_at": _iso(case.noticed_at),
            "reported_at": _iso(case.reported_at),
            "state": case.state,
            "outcome": case.outcome,
            "contained_at": _iso(case.contained_at),
            "containment": case.containment or {},
            "deadline_at": _iso(case.deadline_at),
            "identity_verified_at": _iso(case.identity_verified_at),
            "resolved_at": _iso(case.resolved_at),
            "reporter_ip": case.reporter_ip,
            # What was done and when; a note only when it is the person's own words.
            "steps": [{"at": _iso(s.at), "action": s.action, **({"note": s.note} if s.actor == me and s.note else {})}
                      for s in steps.get(case.id, [])],
        }
        for case in cases
    ]


def _obligations(session: Session, user: User) -> list[dict[str, Any]]:
    rows = session.scalars(select(ObligationAcceptance).where(ObligationAcceptance.user_id == user.id)
                           .order_by(ObligationAcceptance.accepted_at))
    return [{"role": a.obligation.role.name, "version": a.obligation.version, "accepted_at": _iso(a.accepted_at),
             "ip": a.ip, "locale": a.locale, "text": a.obligation.text_for(a.locale)} for a in rows]


def _actor_kind(actor: str, me: str) -> str:
    if actor == me:
        return "self"
    return actor.split(":", 1)[0] if ":" in actor else actor


def _journal(session: Session, user: User) -> tuple[list[dict[str, Any]], bool]:
    me = f"user:{user.id}"
    rows = list(session.scalars(
        select(AuditEvent).where(or_(AuditEvent.actor == me, AuditEvent.subject == me))
        .order_by(AuditEvent.seq.desc()).limit(MAX_JOURNAL_EVENTS + 1)
    ))
    truncated = len(rows) > MAX_JOURNAL_EVENTS
    events = []
    for event in reversed(rows[:MAX_JOURNAL_EVENTS]):
        kind = _actor_kind(event.actor, me)
        events.append({
            "seq": event.seq,
            "occurred_at": _iso(event.occurred_at),
            "action": event.action,
            "by": kind,
            "about_you": event.subject == me,
            "reason": event.reason,
            # Your own IP, or the one a sign-in to your account came from; never staff's.
            "ip": event.ip if kind in ("self", "anonymous") else None,
            "details": event.details or {},
        })
    return events, truncated


def export_personal_data(
    session: Session,
    user: User,
    *,
    sessions: list[SessionInfo] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The person's data as a JSON-ready dict (format ``darbaza-personal-data/1``).
    ``sessions`` are the live sessions from the session registry
    (``services().sessions.list(user.id)``); None when they could not be read."""
    moment = now or datetime.now(UTC)
    infos = sessions or []
    client_ids: set[str] = {a for info in infos for a in info.apps}
    client_ids |= set(session.scalars(select(Consent.client_id).where(Consent.user_id == user.id)))
    for model in (AccessToken, RefreshToken):
        client_ids |= set(session.scalars(select(model.client_id).where(model.user_id == user.id).distinct()))
    names = _client_names(session, client_ids)
    events, truncated = _journal(session, user)
    return {
        "format": FORMAT,
        "generated_at": _iso(moment),
        "account": _account(user),
        "two_factor": _two_factor(session, user),
        "sessions": _sessions(infos, names) if sessions is not None else None,
        "consents": _consents(session, user, names),
        "apps": _tokens(session, user, int(moment.timestamp()), names),
        "breach_reports": _breach_reports(session, user),
        "obligations_accepted": _obligations(session, user),
        "journal": events,
        "journal_truncated": truncated,
    }
