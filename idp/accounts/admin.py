"""Account administration used by the console, the admin API and the CLI alike.

Every change is written to the audit journal in the same transaction, with the actor
and the reason. Services never import Flask; the caller passes an ``Actor``."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from idp.accounts.models import ActivationCode, Role, SchoolClass, User, class_members, user_roles
from idp.accounts.passwords import PasswordHashing
from idp.accounts.service import AccountError, create_user, normalise_login
from idp.audit.journal import Journal
from idp.login.throttle import Throttle
from idp.mfa.service import TwoFactorService
from idp.sessions.registry import SessionRegistry

# Unambiguous characters for codes printed on cards (no 0/O, 1/I/L).
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
ACTIVATION_CODE_DAYS = 7
ACTIVATION_MAX_FAILURES = 10
MAX_REASON = 1000


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class Actor:
    """Who acts, for permissions and the journal."""

    ref: str  # "user:12", "client:abc", "cli:root"
    permissions: set[str]
    ip: str | None = None
    request_id: str | None = None


class PermissionDenied(Exception):
    """The actor lacks a permission the action needs."""

    def __init__(self, permission: str) -> None:
        super().__init__(permission)
        self.permission = permission


class OutranksActor(PermissionDenied):
    """A credential action on an account that holds permissions the actor lacks (tech
    support resetting a school admin's second factor): taking over such an account would
    give the actor those permissions. ``missing`` lists them."""

    def __init__(self, missing: set[str]) -> None:
        super().__init__(sorted(missing)[0])
        self.missing = sorted(missing)


def require_reason(reason: str | None) -> str:
    text = (reason or "").strip()
    if not text:
        raise AccountError("a reason is required")
    if len(text) > MAX_REASON:
        raise AccountError(f"the reason must be at most {MAX_REASON} characters")
    return text


@dataclass
class AccountPage:
    items: list[User]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


class AccountAdmin:
    """Search, create, edit, lock and unlock accounts; manage classes and guardians."""

    def __init__(
        self,
        *,
        db: Session,
        journal: Journal,
        passwords: PasswordHashing,
        sessions: SessionRegistry,
        login_throttle: Throttle | None = None,
        two_factor: TwoFactorService | None = None,
    ) -> None:
        self.db = db
        self.journal = journal
        self.passwords = passwords
        self.sessions = sessions
        # The per-login sign-in throttle, cleared when support re-enables a password.
        self.login_throttle = login_throttle
        # Needed only to reset a person's second factor (support).
        self.two_factor = two_factor

    def _record(self, actor: Actor, action: str, user: User | None, reason: str | None = None, **details: object) -> None:
        self.journal.record(
            self.db,
            actor=actor.ref,
            action=action,
            subject=f"user:{user.id}" if user is not None else None,
            reason=reason,
            ip=actor.ip,
            request_id=actor.request_id,
            details=dict(details),
        )

    @staticmethod
    def _need(actor: Actor, permission: str) -> None:
        if permission not in actor.permissions:
            raise PermissionDenied(permission)

    @classmethod
    def _need_over(cls, actor: Actor, user: User, permission: str) -> None:
        """``permission``, and every permission ``user`` holds: whoever can reset an
        account's credentials can become that person, so nobody resets the credentials of
        an account that outranks them (threat model gap 6). The operator's CLI holds all."""
        cls._need(actor, permission)
        missing = user.permissions - actor.permissions
        if missing:
            raise OutranksActor(missing)

    # --- reading ------------------------------------------------------------------
    def get(self, user_id: int) -> User | None:
        return self.db.get(User, user_id)

    def search(
        self,
        *,
        text: str = "",
        role: str = "",
        class_name: str = "",
        state: str = "",
        page: int = 1,
        per_page: int = 25,
    ) -> AccountPage:
        query = select(User)
        text = text.strip()[:100]
        if text:
            # search_name is casefolded in Python (SQLite's lower() folds ASCII only);
            # wildcards typed by the admin are matched literally.
            folded = text.casefold().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern = f"%{folded}%"
            query = query.where(
                or_(User.search_name.like(pattern, escape="\\"), User.login.like(pattern, escape="\\"))
            )
        if role:
            query = query.where(User.id.in_(select(user_roles.c.user_id).join(Role).where(Role.name == role)))
        if class_name:
            query = query.where(
                User.id.in_(select(class_members.c.user_id).join(SchoolClass).where(SchoolClass.name == class_name))
            )
        if state == "locked":
            query = query.where(User.locked.is_(True))
        elif state == "active":
            query = query.where(User.locked.is_(False), User.active.is_(True))
        elif state == "disabled":
            query = query.where(User.active.is_(False))
        total = self.db.scalar(select(func.count()).select_from(query.subquery())) or 0
        page = max(1, page)
        per_page = min(max(1, per_page), 500)
        items = list(self.db.scalars(query.order_by(User.login).offset((page - 1) * per_page).limit(per_page)))
        return AccountPage(items=items, total=total, page=page, per_page=per_page)

    def iter_all(self, **filters: str) -> list[User]:
        """Every account matching the filters (for CSV export)."""
        first = self.search(page=1, per_page=500, **filters)
        items = list(first.items)
        for page in range(2, first.pages + 1):
            items.extend(self.search(page=page, per_page=500, **filters).items)
        return items

    # --- roles ----------------------------------------------------------------------
    def roles_by_name(self, names: list[str]) -> list[Role]:
        found = {r.name: r for r in self.db.scalars(select(Role).where(Role.name.in_(names)))}
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise AccountError("unknown role(s): " + ", ".join(unknown))
        return [found[n] for n in names]

    def _check_role_change(self, actor: Actor, before: set[str], after: set[str]) -> None:
        changed = before ^ after
        if not changed:
            return
        self._need(actor, "admin:roles:assign")
        # No escalation: only roles whose every permission the actor holds.
        for role in self.roles_by_name(sorted(changed)):
            missing = role.permissions - actor.permissions
            if missing:
                raise PermissionDenied(sorted(missing)[0])

    # --- writing --------------------------------------------------------------------
    def create(
        self,
        actor: Actor,
        *,
        login: str,
        display_name: str,
        email: str | None,
        locale: str | None,
        roles: list[str],
        classes: list[str] | None = None,
    ) -> User:
        self._need(actor, "admin:users:write")
        self._check_role_change(actor, set(), set(roles))
        user = create_user(
            self.db,
            self.passwords,
            login=login,
            display_name=display_name,
            password=None,
            roles=roles,
            email=email or None,
            locale=locale or None,
        )
        if classes:
            user.classes = self._classes(classes)
        self.db.flush()
        self._record(actor, "account:create", user, login=user.login, roles=sorted(roles))
        return user

    def update_profile(
        self, actor: Actor, user: User, *, display_name: str, email: str | None, locale: str | None
    ) -> None:
        self._need(actor, "admin:users:write")
        if not display_name.strip() or len(display_name) > 255:
            raise AccountError("display name must be 1-255 characters")
        email = (email or "").strip() or None
        if email is not None and (len(email) > 320 or "@" not in email or any(c in email for c in "\r\n")):
            raise AccountError("e-mail address is not valid")
        if locale and locale not in {"ky", "ru", "en"}:
            raise AccountError("locale must be ky, ru or en")
        before = {"display_name": user.display_name, "email": user.email, "locale": user.locale}
        user.display_name = display_name.strip()
        if (email or "").casefold() != (user.email or "").casefold():
            # Only the person can verify an address (a link mailed to it), and only a
            # verified address may receive a password-reset link.
            user.email_verified_at = None
        user.email = email
        user.locale = locale or None
        after = {"display_name": user.display_name, "email": user.email, "locale": user.locale}
        changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
        if changed:
            self._record(actor, "account:update", user, changes=changed)

    def set_roles(self, actor: Actor, user: User, roles: list[str]) -> None:
        before = set(user.role_names)
        after = set(roles)
        self._check_role_change(actor, before, after)
        if before == after:
            return
        user.roles = self.roles_by_name(sorted(after))
        self._record(actor, "account:roles", user, added=sorted(after - before), removed=sorted(before - after))

    def lock(self, actor: Actor, user: User, reason: str) -> int:
        """Lock the account and end all of its sessions and tokens (ASVS 7.4.2)."""
        self._need(actor, "support:accounts:lock")
        reason = require_reason(reason)
        user.locked = True
        user.lock_reason = reason
        ended = self.sessions.end_all(self.db, user.id, reason=reason, actor=actor.ref)
        self._record(actor, "account:lock", user, reason, sessions_ended=ended)
        return ended

    def unlock(self, actor: Actor, user: User, reason: str) -> None:
        self._need(actor, "support:accounts:lock")
        reason = require_reason(reason)
        user.locked = False
        user.lock_reason = None
        self._record(actor, "account:unlock", user, reason)

    def reenable_password(self, actor: Actor, user: User, reason: str) -> None:
        """Re-enable a password disabled after too many failures (N12). Support checks
        who is asking before this, as for any re-binding; the reason is journalled."""
        self._need(actor, "support:accounts:lock")
        reason = require_reason(reason)
        failures = user.password_failures
        user.password_failures = 0
        user.password_disabled_at = None
        if self.login_throttle is not None:
            # Also the growing delay, so the person can sign in at once.
            self.login_throttle.reset(user.login)
        self._record(actor, "account:credential:enable", user, reason, credential="password", failures=failures)

    def reset_two_factor(self, actor: Actor, user: User, reason: str) -> int:
        """ASVS 6.4.4: a person who lost their second factor proves who they are to tech
        support, who removes the authenticator app, the recovery codes and every passkey;
        every session ends, and the person enrols again at the next sign-in (a required
        action when a role requires 2FA). Returns the sessions ended."""
        self._need_over(actor, user, "support:credentials:reset")
        reason = require_reason(reason)
        if self.two_factor is None:
            raise RuntimeError("AccountAdmin needs the two-factor service to reset it")
        if not user.has_second_factor:
            raise AccountError("two-factor sign-in is not on for this account")
        had_totp, passkeys = user.has_totp, len(user.passkeys)
        if had_totp:
            self.two_factor.disable(self.db, user)
        user.passkeys.clear()
        ended = self.sessions.end_all(self.db, user.id)
        self._record(actor, "mfa:totp:reset", user, reason, sessions_ended=ended, totp=had_totp,
                     passkeys_removed=passkeys)
        return ended

    def end_sessions(self, actor: Actor, user: User, reason: str) -> int:
        self._need(actor, "support:sessions:end")
        reason = require_reason(reason)
        ended = self.sessions.end_all(self.db, user.id, reason=reason, actor=actor.ref)
        self._record(actor, "account:sessions:end", user, reason, sessions_ended=ended)
        return ended

    def end_session(self, actor: Actor, user: User, sid: str, reason: str) -> bool:
        """End one session of the account (tokens revoked, its portal apps told)."""
        self._need(actor, "support:sessions:end")
        reason = require_reason(reason)
        info = self.sessions.get(user.id, sid)
        if info is None or not self.sessions.end(self.db, user.id, sid, reason=reason, actor=actor.ref):
            raise AccountError("the session has already ended")
        self._record(actor, "account:session:end", user, reason, sid=sid, device=info.device, ip=info.ip)
        return True

    def require_password_change(self, actor: Actor, user: User, reason: str) -> None:
        self._need_over(actor, user, "support:credentials:reset")
        reason = require_reason(reason)
        user.must_change_password = True
        self._record(actor, "account:password:require-change", user, reason)

    def issue_activation_code(self, actor: Actor, user: User, reason: str | None = None) -> tuple[str, datetime]:
        """A one-time code (about 60 bits) for the person to set their own password.
        Earlier unused codes of the account stop working. A directory account's password
        is the directory's: no code is issued for it (``PasswordManagedByDirectory``)."""
        self._need_over(actor, user, "support:credentials:reset")
        if user.source == DIRECTORY_SOURCE:
            raise PasswordManagedByDirectory()
        now = _now()
        for old in self.db.scalars(
            select(ActivationCode).where(ActivationCode.user_id == user.id, ActivationCode.used_at.is_(None))
        ):
            old.used_at = now
        raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(12))
        code = "-".join(raw[i : i + 4] for i in range(0, 12, 4))
        expires = now + timedelta(days=ACTIVATION_CODE_DAYS)
        self.db.add(
            ActivationCode(
                user_id=user.id,
                code_hash=self.passwords.hash(raw),
                expires_at=expires,
                created_by=actor.ref,
            )
        )
        self._record(actor, "account:activation-code:issue", user, reason, expires_at=expires.isoformat())
        return code, expires

    # --- classes and guardians ---------------------------------------------------------
    def _classes(self, names: list[str]) -> list[SchoolClass]:
        cleaned = sorted({n.strip().upper() for n in names if n.strip()})
        found = {c.name: c for c in self.db.scalars(select(SchoolClass).where(SchoolClass.name.in_(cleaned)))}
        unknown = [n for n in cleaned if n not in found]
        if unknown:
            raise AccountError("unknown class(es): " + ", ".join(unknown))
        return [found[n] for n in cleaned]

    def list_classes(self) -> list[tuple[SchoolClass, int]]:
        counts: dict[int, int] = dict(
            self.db.execute(select(class_members.c.class_id, func.count()).group_by(class_members.c.class_id)).all()
        )
        return [(c, counts.get(c.id, 0)) for c in self.db.scalars(select(SchoolClass).order_by(SchoolClass.name))]

    def create_class(self, actor: Actor, name: str) -> SchoolClass:
        self._need(actor, "admin:users:write")
        name = name.strip().upper()
        if not name or len(name) > 32 or not all(ch.isalnum() or ch in "-_ " for ch in name):
            raise AccountError("class name must be 1-32 letters, digits, '-', '_' or spaces")
        if self.db.scalar(select(SchoolClass.id).where(SchoolClass.name == name)) is not None:
            raise AccountError(f"class {name} already exists")
        school_class = SchoolClass(name=name)
        self.db.add(school_class)
        self.db.flush()
        self.journal.record(self.db, actor=actor.ref, action="class:create", subject=f"class:{name}",
                            ip=actor.ip, request_id=actor.request_id)
        return school_class

    def set_classes(self, actor: Actor, user: User, names: list[str]) -> None:
        self._need(actor, "admin:users:write")
        before = set(user.class_names)
        user.classes = self._classes(names)
        after = set(user.class_names)
        if before != after:
            self._record(actor, "account:classes", user, added=sorted(after - before), removed=sorted(before - after))

    def link_guardian(self, actor: Actor, guardian: User, child: User) -> None:
        self._need(actor, "admin:users:write")
        if guardian.id == child.id:
            raise AccountError("an account cannot be its own guardian")
        if child not in guardian.children:
            guardian.children.append(child)
            self._record(actor, "account:guardian:link", child, guardian=f"user:{guardian.id}")

    def unlink_guardian(self, actor: Actor, guardian: User, child: User) -> None:
        self._need(actor, "admin:users:write")
        if child in guardian.children:
            guardian.children.remove(child)
            self._record(actor, "account:guardian:unlink", child, guardian=f"user:{guardian.id}")

    def find_by_login(self, login: str) -> User | None:
        return self.db.scalar(select(User).where(User.login == normalise_login(login)))


DIRECTORY_SOURCE = "directory"


class PasswordManagedByDirectory(AccountError):
    """The account's password is managed by the school directory (bind-through sign-in):
    no password or activation code is set for it here."""

    def __init__(self) -> None:
        super().__init__("the password is managed by the school directory")


class ActivationError(Exception):
    """The login and activation code do not match a live code (one message for all cases)."""


def redeem_activation_code(
    db: Session, passwords: PasswordHashing, journal: Journal, *, login: str, code: str, new_password: str,
    ip: str | None = None,
) -> User:
    """Set the password with a live code; the code is spent. Failures count against the code."""
    raw = code.replace("-", "").replace(" ", "").upper()
    user = db.scalar(select(User).where(User.login == normalise_login(login)))
    now = _now()
    live = None
    if user is not None:
        live = db.scalar(
            select(ActivationCode)
            .where(ActivationCode.user_id == user.id, ActivationCode.used_at.is_(None), ActivationCode.expires_at > now)
            .order_by(ActivationCode.created_at.desc())
        )
    ok = passwords.verify(live.code_hash if live else None, raw) and live is not None and len(raw) == 12
    if not ok or user is None or live is None or user.source == DIRECTORY_SOURCE:
        # A directory account never has a live code (none is issued); one left from
        # before the account came from the directory is refused like a wrong one.
        if live is not None:
            live.failed_attempts += 1
            if live.failed_attempts >= ACTIVATION_MAX_FAILURES:
                live.used_at = now
        journal.record(db, actor="anonymous", action="account:activation-code:failure",
                       subject=f"user:{user.id}" if user else None, ip=ip)
        raise ActivationError()
    if not user.can_sign_in:
        raise ActivationError()
    live.used_at = now
    user.password_hash = passwords.hash(new_password)
    # A code issued by support binds a new password: a password disabled after too many
    # failures is replaced, so its count ends (N12: re-binding re-enables).
    user.password_failures = 0
    user.password_disabled_at = None
    user.password_changed_at = now
    user.must_change_password = False
    journal.record(db, actor=f"user:{user.id}", action="account:activation-code:redeem", subject=f"user:{user.id}", ip=ip)
    return user
