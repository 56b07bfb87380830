"""statistics requests expire

Revision ID: 0010
Revises: 0008
Create Date: 2026-11-30 04:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from coordinator.ledger._integrity import append_baseline


revision = '0010'
down_revision = '0008'
branch_labels = None
depends_on = None

# Frozen as of this revision.
_REQUEST_COLUMNS = ('dataset', 'task_type', 'min_count', 'noise_std', 'sites', 'status',
                    'combined', 'error', 'created_at', 'finished_at', 'expires_at')


def upgrade() -> None:
    # Requests made before this migration have no expiry (NULL): they never expire.
    with op.batch_alter_table('statistics_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    # Existing requests' snapshots (revision 0007) lack the new column: snapshot them again.
    append_baseline(op.get_bind(), {'statistics_requests': (('id',), _REQUEST_COLUMNS)})


def downgrade() -> None:
    with op.batch_alter_table('statistics_requests', schema=None) as batch_op:
        batch_op.drop_column('expires_at')
