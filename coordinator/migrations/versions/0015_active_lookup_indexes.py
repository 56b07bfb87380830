"""indexes for the lookups that must not scan finished runs

Revision ID: 0015
Revises: 0011
Create Date: 2026-11-30 05:30:00.000000
"""

from __future__ import annotations

from alembic import op


revision = '0015'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A download's permission: a live hop by its input, a pending evaluation by its checkpoint;
    # the pending evaluations every connect dispatches.
    with op.batch_alter_table('hops', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hops_input_sha256'), ['input_sha256'], unique=False)
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f('ix_evaluations_checkpoint_sha256'), ['checkpoint_sha256'], unique=False
        )
        batch_op.create_index(batch_op.f('ix_evaluations_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluations_status'))
        batch_op.drop_index(batch_op.f('ix_evaluations_checkpoint_sha256'))
    with op.batch_alter_table('hops', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hops_input_sha256'))
