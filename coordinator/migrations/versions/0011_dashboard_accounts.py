"""dashboard accounts and api tokens

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 04:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('api_tokens',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account'], ['accounts.name'], ),
    sa.PrimaryKeyConstraint('sha256')
    )
    op.create_index(op.f('ix_api_tokens_account'), 'api_tokens', ['account'], unique=False)
    # Dashboard pages filter events by site and page runs newest first.
    op.create_index('ix_events_site', 'events', ['site'], unique=False)
    op.create_index('ix_runs_created_at', 'runs', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_runs_created_at', table_name='runs')
    op.drop_index('ix_events_site', table_name='events')
    op.drop_index(op.f('ix_api_tokens_account'), table_name='api_tokens')
    op.drop_table('api_tokens')
    op.drop_table('accounts')
