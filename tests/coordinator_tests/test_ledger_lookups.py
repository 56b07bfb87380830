"""Lookups on the hot paths of site calls."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event

from coordinator.ledger import CheckpointRow, HopRow, Ledger


def test_a_beat_without_a_hop_id_costs_no_query(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger.migrate()
    statements: list[str] = []
    event.listen(ledger.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        assert ledger.hop("") is None
        assert statements == []
        assert ledger.hop("0" * 32) is None
        assert len(statements) == 1
    finally:
        ledger.close()


def _committed_hop(ledger: Ledger) -> tuple[str, str]:
    """A run's first hop, committed with its output checkpoint: (hop id, output sha256)."""
    run_id, hop_id, sha = uuid.uuid4().hex, uuid.uuid4().hex, "c" * 64
    hops = [HopRow(id=hop_id, index=0, site="site-a", status="pending",
                   hyperparameters={"learning_rate": 1e-3}, metrics={})]  # fmt: skip
    ledger.create_run(run_id, "lookups", {"task": "tabular", "dataset": "d"}, hops, None)
    ledger.lease_hop(hop_id, "token", None)
    ledger.record_checkpoint(
        CheckpointRow(
            sha256=sha,
            run_id=run_id,
            hop_id=hop_id,
            producer_site="site-a",
            size=10,
            parent_sha256=None,
            manifest={},
            tensors=[],
            stored_at=datetime.now(UTC),
            status="stored",
        )
    )
    ledger.commit_hop(
        hop_id,
        lease_token="token",
        output_sha256=sha,
        metrics={"loss": 0.5},
        train_started_at_ns=1,
        train_finished_at_ns=2,
        base_model_sha256="b" * 64,
    )
    return hop_id, sha


def _plans_of_reads_by_hop(ledger: Ledger, hop_id: str, call: Callable[[], object]) -> list[str]:
    """SQLite's query plan of each SELECT that `call` runs with `hop_id` among its arguments."""
    reads: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and hop_id in parameters:
            reads.append((statement, parameters))

    event.listen(ledger.engine, "before_cursor_execute", note)
    try:
        call()
    finally:
        event.remove(ledger.engine, "before_cursor_execute", note)
    plans: list[str] = []
    with ledger.engine.connect() as connection:
        cursor = connection.connection.cursor()
        for statement, parameters in reads:
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plans += [row[3] for row in cursor.fetchall()]
    return plans


def test_a_hand_back_and_a_validation_find_their_hop_by_index_not_by_scanning_history(
    tmp_path: Path,
) -> None:
    # Each hand back reads its hop's stored uploads (on the event loop), each validation report
    # looks for its hop's earlier `hop.validated` event: by hop id, both scanned every
    # checkpoint (every validation event) the ledger ever recorded.
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger.migrate()
    try:
        hop_id, sha = _committed_hop(ledger)
        stored = _plans_of_reads_by_hop(ledger, hop_id, lambda: ledger.stored_sizes(hop_id))
        assert stored == ["SEARCH checkpoints USING INDEX ix_checkpoints_hop_id (hop_id=?)"]
        assert ledger.stored_sizes(hop_id) == {sha: 10}

        validated = _plans_of_reads_by_hop(
            ledger,
            hop_id,
            lambda: ledger.record_hop_validation(
                hop_id, site="site-a", ok=True, metrics={"accuracy": 0.9}, error=""
            ),
        )
        assert validated == [
            "SEARCH hops USING INDEX sqlite_autoindex_hops_1 (id=?)",  # the hop, by its key
            "SEARCH events USING INDEX ix_events_hop_id (hop_id=?)",
        ]
    finally:
        ledger.close()
