"""Breach cases and their steps (issue 6)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from idp.accounts.models import User, utcnow
from idp.db import Base


class BreachCase(Base):
    """One report that an account's confidentiality was breached.

    States: reported -> contained -> in_review -> resolved (outcome confirmed,
    false_alarm or duplicate). Times are naive UTC like the rest of the schema."""

    __tablename__ = "breach_cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True, index=True)
    # "account" (signed in), "sign-in-page" (cannot sign in), "not-me" (new-device notice link)
    door: Mapped[str] = mapped_column(String(16))
    # "shared-password", "unknown-activity", "lost-device", "other", "not-me"
    category: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    contact: Mapped[str | None] = mapped_column(String(320), nullable=True)
    login_given: Mapped[str | None] = mapped_column(String(128), nullable=True)
    noticed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    reported_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # Reported more than one working day after the person noticed it (policy 5.2.3).
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default="reported", index=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    contained_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # What containment did: sessions ended, password change required, locked, ...
    containment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The support deadline (UTC) from the working calendar; recomputed while open.
    deadline_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    identity_verified_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    escalated_75_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    escalated_overdue_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    reporter_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user: Mapped[User | None] = relationship(lazy="joined")

    @property
    def number(self) -> str:
        """The case number people quote: e.g. ``BR-000042``."""
        return f"BR-{self.id:06d}"


class BreachCaseStep(Base):
    """One step of a case (state change, contact note, support action), with actor,
    time and note; each is journalled too."""

    __tablename__ = "breach_case_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("breach_cases.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
