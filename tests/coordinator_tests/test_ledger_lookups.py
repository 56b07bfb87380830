"""Lookups on the hot paths of site calls."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event

from coordinator.ledger import Ledger


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
