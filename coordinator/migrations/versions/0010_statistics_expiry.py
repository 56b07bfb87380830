"""statistics requests expire

Revision ID: 0010
Revises: 0008
Create Date: 2026-11-30 04:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0010'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Requests made before this migration have no expiry (NULL): they never expire.
    with op.batch_alter_table('statistics_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('statistics_requests', schema=None) as batch_op:
        batch_op.drop_column('expires_at')
