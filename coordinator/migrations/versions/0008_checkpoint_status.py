"""checkpoint status: stored, superseded (a redone hop's upload) or deleted (by retention)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 04:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from coordinator.ledger._integrity import append_baseline


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# Frozen as of this revision.
_CHECKPOINT_COLUMNS = ('size', 'run_id', 'hop_id', 'producer_site', 'parent_sha256', 'manifest',
                       'tensors', 'signature', 'producer_certificate', 'stored_at', 'status')


def upgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('status', sa.String(length=16), server_default='stored', nullable=False)
        )
    # Existing checkpoints' snapshots (revision 0007) lack the new column: snapshot them again.
    append_baseline(op.get_bind(), {'checkpoints': (('sha256',), _CHECKPOINT_COLUMNS)})


def downgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('status')
