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

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from coordinator.ledger._integrity import STATE_ROWS_KEY, values_entry
from coordinator.ledger._repository import GENESIS_HASH, event_hash

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Frozen copy of the tables, keys and columns as of this revision (later revisions may add more).
_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
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
_PER_EVENT = 200


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("ledger_seq", sa.Integer(), nullable=True))
    _baseline(op.get_bind())


def _baseline(connection: sa.Connection) -> None:
    metadata = sa.MetaData()
    events = sa.Table("events", metadata, autoload_with=connection)
    last = connection.execute(
        sa.select(events.c.hash).order_by(events.c.seq.desc()).limit(1)
    ).first()
    prev = last[0] if last else GENESIS_HASH
    for name, (keys, columns) in _TABLES.items():
        table = sa.Table(name, metadata, autoload_with=connection)
        rows = connection.execute(
            sa.select(*(table.c[c] for c in (*keys, *columns))).order_by(*(table.c[k] for k in keys))
        ).all()
        for start in range(0, len(rows), _PER_EVENT):
            batch = rows[start : start + _PER_EVENT]
            entries = [
                values_entry(
                    name,
                    "/".join(str(row._mapping[k]) for k in keys),
                    {c: row._mapping[c] for c in columns},
                )
                for row in batch
            ]
            payload = {"table": name, "rows": len(entries), STATE_ROWS_KEY: entries}
            at = datetime.now(UTC).isoformat(timespec="microseconds")
            digest = event_hash(prev, at, "ledger.baseline", None, None, None, payload)
            result = connection.execute(
                events.insert().values(at=at, kind="ledger.baseline", run_id=None, hop_id=None,
                                       site=None, payload=payload, prev_hash=prev, hash=digest)
            )
            seq = result.inserted_primary_key[0]  # type: ignore[index]
            prev = digest
            for row in batch:
                condition = sa.and_(*(table.c[k] == row._mapping[k] for k in keys))
                connection.execute(table.update().where(condition).values(ledger_seq=seq))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("ledger_seq")
