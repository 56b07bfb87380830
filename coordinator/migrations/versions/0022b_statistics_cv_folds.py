"""statistics requests may ask for per-fold aggregates

Revision ID: 0022b
Revises: 0021
Create Date: 2026-11-30 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from coordinator.ledger._integrity import append_baseline


revision = '0022b'
down_revision = '0021'
branch_labels = None
depends_on = None

# Frozen as of this revision.
_REQUEST_COLUMNS = ('dataset', 'task_type', 'min_count', 'noise_std', 'sites', 'status',
                    'combined', 'error', 'created_at', 'finished_at', 'expires_at', 'cv_folds')


def upgrade() -> None:
    # Requests made before this migration asked for one global answer: 0.
    with op.batch_alter_table('statistics_requests', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('cv_folds', sa.Integer(), server_default='0', nullable=False)
        )
    # Existing requests' snapshots lack the new column: snapshot them again.
    append_baseline(op.get_bind(), {'statistics_requests': (('id',), _REQUEST_COLUMNS)})


def downgrade() -> None:
    with op.batch_alter_table('statistics_requests', schema=None) as batch_op:
        batch_op.drop_column('cv_folds')
