"""indexes for the lookups by hop that scanned the whole history

Revision ID: 0023
Revises: 0022b
Create Date: 2026-12-03 19:00:00.000000
"""

from __future__ import annotations

from alembic import op


revision = '0023'
down_revision = '0022b'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every hand back reads its hop's stored uploads (`CheckpointRecords.stored_sizes`, on the
    # event loop), and every validation report looks for its hop's `hop.validated` event: by
    # hop, they scanned every checkpoint, and every validation event, the ledger ever recorded.
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_checkpoints_hop_id'), ['hop_id'], unique=False)
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_hop_id'), ['hop_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_hop_id'))
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_checkpoints_hop_id'))
