"""Audit journal rows and the chain head."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from idp.db import Base


class AuditEvent(Base):
    """One journal row. ``hash`` covers every field and the previous row's hash: directly
    for rows written before migration 0013 ("v1", ``content_hash`` NULL), through
    ``content_hash`` for the later ones ("v2"), whose personal content can be redacted by
    the retention job without breaking the chain (idp/audit/journal.py)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Consecutive from 1; a gap means a deleted row.
    seq: Mapped[int] = mapped_column(Integer, unique=True, index=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    subject: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the personal content (actor, subject, reason, ip, request_id, details);
    # NULL on v1 rows.
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # When retention blanked the personal content (v2 rows only).
    redacted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class AuditHead(Base):
    """A single row holding the last sequence number and hash. Updating it first in
    every journal write serialises writers on SQLite and PostgreSQL alike."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    hash: Mapped[str] = mapped_column(String(64))
