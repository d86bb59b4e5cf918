"""Directory synchronisation runs: one row per ``darbaza directory sync`` (CLI, worker or
console), with its summary, so the console shows what each run changed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from idp.accounts.models import utcnow
from idp.db import Base


class DirectorySyncRun(Base):
    __tablename__ = "directory_sync_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # "full" or "incremental"; "cli", "worker" or "console".
    mode: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(16), default="cli")
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    # "running", "completed" or "failed" (a failed run is resumed by the next one).
    status: Mapped[str] = mapped_column(String(16), default="running")
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    disabled: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    error_count: Mapped[int] = mapped_column(Integer, default=0)
    # [{"dn": ..., "reason": ...}], the first few hundred.
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # The change marker (modifyTimestamp or uSNChanged) the run started from and reached.
    cursor_before: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cursor_after: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resumed_from: Mapped[int | None] = mapped_column(
        ForeignKey("directory_sync_runs.id", ondelete="SET NULL"), nullable=True
    )
    entries_seen: Mapped[int] = mapped_column(Integer, default=0)
    pages_done: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
