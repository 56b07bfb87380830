"""dashboard sessions in sql and the study workers the coordinator supervises

Revision ID: 0020
Revises: 0015
Create Date: 2026-11-30 07:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0020'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dashboard_sessions',
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('via', sa.String(length=16), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('client', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('token_sha256')
    )
    op.create_index(op.f('ix_dashboard_sessions_account'), 'dashboard_sessions', ['account'],
                    unique=False)
    op.create_index(op.f('ix_dashboard_sessions_expires_at'), 'dashboard_sessions',
                    ['expires_at'], unique=False)
    op.create_table('study_workers',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('study', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('process_started_at', sa.Float(), nullable=True),
    sa.Column('options', sa.JSON(), nullable=False),
    sa.Column('started_by', sa.String(length=128), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stop_mode', sa.String(length=16), nullable=True),
    sa.Column('stopped_by', sa.String(length=128), nullable=True),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('log_path', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_study_workers_study'), 'study_workers', ['study'], unique=False)
    op.create_index(op.f('ix_study_workers_status'), 'study_workers', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_study_workers_status'), table_name='study_workers')
    op.drop_index(op.f('ix_study_workers_study'), table_name='study_workers')
    op.drop_table('study_workers')
    op.drop_index(op.f('ix_dashboard_sessions_expires_at'), table_name='dashboard_sessions')
    op.drop_index(op.f('ix_dashboard_sessions_account'), table_name='dashboard_sessions')
    op.drop_table('dashboard_sessions')
