"""Account and role models."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from flask_login import UserMixin
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import Mapped, Session, joinedload, mapped_column, relationship

from idp.db import Base


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


user_roles = Table(
    "user_roles",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
)

SEEDED_ROLES: dict[str, str] = {
    "student": "Student",
    "teacher": "Teacher",
    "parent": "Parent or guardian",
    "staff": "School staff",
    "tech_support": "Technical support",
    "security_officer": "Information security officer",
    "school_admin": "School administrator",
}


# Employees (policy 2.5) and everyone who can open the console: always two factors.
SEEDED_ROLES_REQUIRING_2FA = frozenset({"teacher", "staff", "tech_support", "security_officer", "school_admin"})


class_members = Table(
    "class_members",
    Base.metadata,
    Column("class_id", ForeignKey("school_classes.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)

guardian_links = Table(
    "guardian_links",
    Base.metadata,
    Column("guardian_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("child_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)


class RolePermission(Base):
    """The one table mapping roles to permissions."""

    __tablename__ = "role_permissions"

    role_id: Mapped[int] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True)
    permission: Mapped[str] = mapped_column(String(64), primary_key=True)


class Role(Base):
    __tablename__ = "roles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    # Seeded roles cannot be deleted or renamed; their permissions can be changed.
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Everyone with this role must sign in with a second factor (TOTP or a passkey);
    # without one, enrolment is a required action at the next sign-in. Seeded on for
    # the school's employees (SEEDED_ROLES_REQUIRING_2FA).
    requires_2fa: Mapped[bool] = mapped_column(Boolean, default=False)
    grants: Mapped[list[RolePermission]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def permissions(self) -> set[str]:
        return {g.permission for g in self.grants}


class SchoolClass(Base):
    """A class such as "7A"; its members get it in the ``groups`` claim."""

    __tablename__ = "school_classes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class User(UserMixin, Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # OIDC `sub`: random, stable, never reused even if the login name changes.
    subject: Mapped[str] = mapped_column(String(36), unique=True, default=lambda: str(uuid.uuid4()))
    # Login names are compared case-insensitively; this column holds the folded form.
    login: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    display_name: Mapped[str] = mapped_column(String(255))
    # casefold(display_name), kept by the ORM, for case-insensitive search in any script.
    search_name: Mapped[str] = mapped_column(String(255), default="", index=True)
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    # When the person proved they read this address (a link sent to it); only a
    # verified address can receive a password-reset link.
    email_verified_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    locale: Mapped[str | None] = mapped_column(String(8), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    lock_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    password_changed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    # Required action: the next sign-in must set a new password first.
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    # NIST 800-63B-4 §3.2.2: consecutive failures per credential; at the limit the
    # credential is disabled until tech support re-enables it.
    password_failures: Mapped[int] = mapped_column(Integer, default=0)
    password_disabled_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    # TOTP (issue 4): the seed encrypted at rest (SecretBox purpose "totp-seeds", N20);
    # enabled once the first code confirmed it. The last used time step lives in Redis
    # (``totp-step:{user_id}``), not here.
    totp_secret_encrypted: Mapped[str | None] = mapped_column(String(255), nullable=True)
    totp_enabled_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # The TOTP credential's own consecutive-failure counter (N12/N19, idp/login/throttle.py).
    totp_failures: Mapped[int] = mapped_column(Integer, default=0)
    totp_disabled_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    # Where the account comes from: "local" (created here), "roster" (a CSV roster import
    # manages it) or "directory" (an LDAP directory manages it; the password is checked by
    # binding to the directory, there is no local hash). ``external_id`` is the directory's
    # stable id (entryUUID / objectGUID), ``directory_dn`` the entry's last known DN.
    # ``source_disabled_at``: when the roster or the directory disabled it (an account
    # disabled by its source comes back when the source lists it again; one disabled by
    # an administrator does not).
    source: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    external_id: Mapped[str | None] = mapped_column(String(128), nullable=True, unique=True)
    directory_dn: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    source_disabled_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    roles: Mapped[list[Role]] = relationship(secondary=user_roles, lazy="selectin")
    passkeys: Mapped[list[Passkey]] = relationship(
        # Loaded when used (sign-in, the 2FA page): token and userinfo requests load the
        # account on every call and never need its passkeys (bench/load.py).
        lazy="select", cascade="all, delete-orphan", passive_deletes=True, order_by="Passkey.id"
    )
    classes: Mapped[list[SchoolClass]] = relationship(secondary=class_members, lazy="selectin")
    children: Mapped[list[User]] = relationship(
        secondary=guardian_links,
        primaryjoin="User.id == guardian_links.c.guardian_id",
        secondaryjoin="User.id == guardian_links.c.child_id",
        lazy="selectin",
        back_populates="guardians",
    )
    guardians: Mapped[list[User]] = relationship(
        secondary=guardian_links,
        primaryjoin="User.id == guardian_links.c.child_id",
        secondaryjoin="User.id == guardian_links.c.guardian_id",
        lazy="selectin",
        back_populates="children",
    )

    @property
    def role_names(self) -> list[str]:
        return sorted(r.name for r in self.roles)

    @property
    def permissions(self) -> set[str]:
        granted: set[str] = set()
        for role in self.roles:
            granted |= role.permissions
        return granted

    @property
    def class_names(self) -> list[str]:
        return sorted(c.name for c in self.classes)

    @property
    def has_totp(self) -> bool:
        return self.totp_enabled_at is not None and self.totp_secret_encrypted is not None

    @property
    def has_passkey(self) -> bool:
        return bool(self.passkeys)

    @property
    def has_second_factor(self) -> bool:
        """TOTP or at least one passkey: every password sign-in then asks for it."""
        return self.has_totp or self.has_passkey

    @property
    def requires_2fa(self) -> bool:
        """One of the account's roles requires a second factor, or the account may open
        the console (which is opened only with two factors)."""
        from idp.access.permissions import CONSOLE_PERMISSIONS

        return any(r.requires_2fa for r in self.roles) or bool(self.permissions & CONSOLE_PERMISSIONS)

    @property
    def email_verified(self) -> bool:
        return bool(self.email) and self.email_verified_at is not None

    @property
    def can_sign_in(self) -> bool:
        return self.active and not self.locked

    @property
    def is_active(self) -> bool:  # flask-login
        return self.can_sign_in


class ActivationCode(Base):
    """A one-time code printed on a card, used once to set the account's password."""

    __tablename__ = "activation_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(128))


@event.listens_for(User, "before_insert")
@event.listens_for(User, "before_update")
def _fold_search_name(_mapper: object, _connection: object, user: User) -> None:
    user.search_name = (user.display_name or "").casefold()[:255]


class GuardianLinkCode(Base):
    """A one-time code that lets a parent link a child to their account (printed or sent
    by the school). Only the SHA-256 of the code is kept (about 60 random bits, rate
    limited). A child may have several live codes at once (one for each parent); each
    works once, until it expires or is revoked."""

    __tablename__ = "guardian_link_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    used_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_by: Mapped[str] = mapped_column(String(128))


class RecoveryCode(Base):
    """One of the ten single-use recovery codes, argon2id-hashed (ASVS 6.5.2)."""

    __tablename__ = "recovery_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Passkey(Base):
    """A WebAuthn credential (passkey or security key) registered by its owner.

    Only the public key is stored; ``sign_count`` is the authenticator's counter
    (a decrease hints at a cloned authenticator, WebAuthn §6.1.1)."""

    __tablename__ = "passkeys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    credential_id: Mapped[bytes] = mapped_column(LargeBinary(1023), unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    sign_count: Mapped[int] = mapped_column(Integer, default=0)
    transports: Mapped[str] = mapped_column(String(255), default="")
    aaguid: Mapped[str] = mapped_column(String(36), default="")
    backed_up: Mapped[bool] = mapped_column(Boolean, default=False)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Obligation(Base):
    """One version of the confidentiality obligation a role's members accept
    (policy 2.5). A new text is a new row with the next version; everyone with the
    role accepts it again at their next sign-in."""

    __tablename__ = "obligations"
    __table_args__ = (UniqueConstraint("role_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    role_id: Mapped[int] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    text_ky: Mapped[str] = mapped_column(Text)
    text_ru: Mapped[str] = mapped_column(Text)
    text_en: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="system")
    role: Mapped[Role] = relationship(lazy="joined")

    def text_for(self, locale: str | None) -> str:
        return {"ru": self.text_ru, "en": self.text_en}.get(locale or "ky", self.text_ky)


class ObligationAcceptance(Base):
    """A person accepted one version of an obligation, when and from where."""

    __tablename__ = "obligation_acceptances"
    __table_args__ = (UniqueConstraint("user_id", "obligation_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    obligation_id: Mapped[int] = mapped_column(ForeignKey("obligations.id", ondelete="CASCADE"))
    accepted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    locale: Mapped[str] = mapped_column(String(8), default="ky")
    obligation: Mapped[Obligation] = relationship(lazy="joined")


def load_account(session: Session, user_id: int) -> User | None:
    """The account with its roles (and their permissions), classes and children in ONE query, for
    the hot protocol paths (token, refresh, userinfo, introspection), where the default
    per-relationship loading costs four (bench/load.py; docs in README "Performance")."""
    return session.get(
        User, user_id, options=[joinedload(User.roles).joinedload(Role.grants), joinedload(User.classes),
                                # The ID token and /userinfo name a guardian's children.
                                joinedload(User.children)]
    )
