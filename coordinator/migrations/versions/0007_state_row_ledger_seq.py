"""state rows name the ledger event that last wrote them; rows from before get a baseline event

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 04:40:00

Every state table gains ``ledger_seq``. Rows written before this revision have no snapshot in
any event, so this migration appends ``ledger.baseline`` events (up to 200 rows each) that
snapshot them as they are now, and stamps the rows with those events. The baseline vouches only
for what the rows held at migration time: an edit made before upgrading is not detectable.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from coordinator.ledger._integrity import append_baseline

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Frozen copy of the tables, keys and columns as of this revision (later revisions may add more).
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sites": (("name",), ("agent_version", "capabilities", "base_models", "datasets",
              "certificate_serial", "certificate_expires_at", "first_seen_at", "last_seen_at")),
    "runs": (("id",), ("name", "status", "plan", "base_model_sha256", "created_at",
             "finished_at", "final_sha256", "error")),
    "hops": (("id",), ("run_id", "index", "site", "hyperparameters", "status", "lease_token",
             "attempts", "leased_at", "input_sha256", "output_sha256", "metrics",
             "train_started_at_ns", "train_finished_at_ns", "committed_at", "error_code",
             "error")),
    "checkpoints": (("sha256",), ("size", "run_id", "hop_id", "producer_site", "parent_sha256",
                    "manifest", "tensors", "signature", "producer_certificate", "stored_at")),
    "evaluations": (("id",), ("run_id", "checkpoint_sha256", "site", "split", "status",
                    "lease_token", "metrics", "error", "created_at", "finished_at")),
    "revocations": (("serial",), ("reason", "revoked_by", "revoked_at")),
    "statistics_requests": (("id",), ("dataset", "task_type", "min_count", "noise_std", "sites",
                            "status", "combined", "error", "created_at", "finished_at")),
    "statistics_answers": (("request_id", "site"), ("status", "lease_token", "aggregates",
                           "error_code", "error", "finished_at")),
}  # fmt: skip


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("ledger_seq", sa.Integer(), nullable=True))
    append_baseline(op.get_bind(), TABLES)


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("ledger_seq")
