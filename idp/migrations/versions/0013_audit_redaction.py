"""audit journal rows that can be redacted (personal-data retention)

Adds ``audit_events.content_hash`` (the SHA-256 of a row's personal content: actor,
subject, reason, IP, request id, details) and ``audit_events.redacted_at``. Rows written
from now on ("v2") chain on the content hash instead of on the content itself, so the
retention job can blank the content of an old sign-in event and the chain still
verifies (idp/audit/journal.py). Existing rows keep their hashes: nothing is rehashed,
and they are never redacted.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-26 02:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('redacted_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_column('redacted_at')
        batch_op.drop_column('content_hash')
