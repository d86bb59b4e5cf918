"""the audit journal's head row exists from the start

Two first journal events written at once on a fresh database both found no head row
and both inserted it (one failed with a duplicate key: a 500 on PostgreSQL). With the
row created here, every writer takes the lock with an UPDATE.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26 00:25:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    head = sa.table('audit_head', sa.column('id', sa.Integer), sa.column('seq', sa.Integer),
                    sa.column('hash', sa.String))
    bind = op.get_bind()
    if bind.execute(sa.select(sa.func.count()).select_from(head)).scalar() == 0:
        op.bulk_insert(head, [{'id': 1, 'seq': 0, 'hash': GENESIS}])


def downgrade() -> None:
    # The row is the journal's state once events exist; nothing to undo.
    pass
