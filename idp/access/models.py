"""Restrictions (policy 5.1) and account-sharing flags (policy 5.2.1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from idp.accounts.models import utcnow
from idp.db import Base


class Restriction(Base):
    """A rule attached to a role or to one account (exactly one of the two). Every field
    left empty (None) does not restrict; the access decision (idp/access/decision.py)
    combines all restrictions that apply to an account, the strictest winning."""

    __tablename__ = "restrictions"
    __table_args__ = (
        CheckConstraint("(role_id IS NULL) <> (user_id IS NULL)", name="restriction_one_target"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    role_id: Mapped[int | None] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), nullable=True, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    # Portal apps (client ids) the account may use; None = any app.
    allowed_clients: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Weekdays 0 (Monday) .. 6 and a daily window "HH:MM"-"HH:MM" in Asia/Bishkek.
    allowed_weekdays: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    hours_start: Mapped[str | None] = mapped_column(String(5), nullable=True)
    hours_end: Mapped[str | None] = mapped_column(String(5), nullable=True)
    # CIDR blocks or names of networks from the settings (e.g. "school").
    allowed_networks: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    max_sessions: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # At the limit: "refuse" the new sign-in or "end_oldest" session.
    at_session_limit: Mapped[str] = mapped_column(String(16), default="refuse")
    require_2fa: Mapped[bool] = mapped_column(Boolean, default=False)
    valid_from: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    valid_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # Scopes granted only to requests from the school network (policy 4.2.5).
    school_only_scopes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    idle_timeout_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    absolute_timeout_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="system")


class SharingFlag(Base):
    """A signal that an account may be shared (policy 5.2.1), for the security officer."""

    __tablename__ = "sharing_flags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # "too-many-sessions", "distant-networks", "many-devices"
    kind: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    reviewed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    review_note: Mapped[str | None] = mapped_column(Text, nullable=True)
