"""The engine's tamper check per hand back compares only what changed since it last found the
run sound, and still finds every edit made behind the ledger's back (`ledger/_run_check`)."""

from __future__ import annotations

import sqlite3
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Dialect, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeEngine

from coordinator.ledger import CheckpointRow, HopRow, Ledger, _chain, _cursor, _run_check


def _sql(ledger: Ledger, statement: str, **params: object) -> None:
    with ledger.engine.begin() as connection:
        connection.execute(text(statement), params)


def _run(ledger: Ledger, hops: int) -> tuple[str, list[str]]:
    run_id = uuid.uuid4().hex
    rows = [
        HopRow(id=uuid.uuid4().hex, run_id=run_id, index=i, site=f"site-{i % 2}",
               hyperparameters={"learning_rate": 1e-4, "steps": 3}, status="pending", metrics={})
        for i in range(hops)
    ]  # fmt: skip
    ledger.create_run(run_id, "r", {"task": "tabular", "dataset": "notes"}, rows, None)
    ledger.lease_hop(rows[0].id, "tok", None)
    return run_id, [row.id for row in rows]


def _hand_back(ledger: Ledger, run_id: str, hops: list[str], i: int, parent: str | None) -> str:
    """Hop `i` trains, is committed with its output, and the next hop is leased (as a handoff)."""
    ledger.transition_hop(hops[i], expected=("leased",), status="training", event="hop.training")
    sha = uuid.uuid4().hex * 2
    with ledger.transaction():
        ledger.record_checkpoint(
            CheckpointRow(sha256=sha, size=10, run_id=run_id, hop_id=hops[i],
                          producer_site="site-a", parent_sha256=parent, manifest={"n": i},
                          tensors=[["lora_A", "F32", [4, 2]]], signature="ab",
                          producer_certificate="cert", stored_at=datetime.now(UTC))
        )  # fmt: skip
        ledger.commit_hop(hops[i], lease_token="tok", output_sha256=sha, metrics={"loss": 0.5},
                          train_started_at_ns=1, train_finished_at_ns=2,
                          base_model_sha256="cd" * 32)  # fmt: skip
        if i + 1 < len(hops):
            ledger.lease_hop(hops[i + 1], "tok", sha)
    return sha


def test_a_check_per_hand_back_compares_only_the_rows_the_hand_back_wrote(ledger: Ledger) -> None:
    run_id, hops = _run(ledger, 12)
    assert ledger.stored_run_mismatches(run_id, None) == []
    parent: str | None = None
    compared = []
    for i in range(len(hops) - 1):
        before = ledger.run_checks.rows_compared
        parent = _hand_back(ledger, run_id, hops, i, parent)
        assert ledger.stored_run_mismatches(run_id, parent) == []
        compared.append(ledger.run_checks.rows_compared - before)
    assert ledger.run_checks.full_checks == 1  # the first check only
    # the run row, the committed hop, the leased one and the new checkpoint: not the whole run
    assert max(compared) <= 4
    assert compared[-1] == compared[1]
    assert ledger.full_run_mismatches(run_id, parent) == []


def test_an_edit_to_an_old_hop_after_many_checks_is_found_by_the_next(ledger: Ledger) -> None:
    run_id, hops = _run(ledger, 6)
    parent: str | None = None
    for i in range(4):
        parent = _hand_back(ledger, run_id, hops, i, parent)
        assert ledger.stored_run_mismatches(run_id, parent) == []
    _sql(ledger, "UPDATE hops SET metrics = '{\"loss\": 0.1}' WHERE id = :hop", hop=hops[1])
    found = ledger.stored_run_mismatches(run_id, parent)
    assert [(m.table, m.key, m.column) for m in found] == [("hops", hops[1], "metrics")]
    assert found == ledger.full_run_mismatches(run_id, parent)
    _sql(ledger, "UPDATE hops SET metrics = '{\"loss\": 0.5}' WHERE id = :hop", hop=hops[1])
    assert ledger.stored_run_mismatches(run_id, parent) == []  # no finding remembered


def test_rows_another_writer_moved_are_compared_again_not_taken_as_known(
    ledger: Ledger,
) -> None:
    """A second coordinator (another `Ledger` on the database) hands the run on: the first's
    check compares the rows it wrote with their events, and then still finds an edit."""
    run_id, hops = _run(ledger, 5)
    parent = _hand_back(ledger, run_id, hops, 0, None)
    assert ledger.stored_run_mismatches(run_id, parent) == []
    other = Ledger(ledger.url)
    try:
        parent = _hand_back(other, run_id, hops, 1, parent)
        parent = _hand_back(other, run_id, hops, 2, parent)
    finally:
        other.close()
    before = ledger.run_checks.rows_compared
    assert ledger.stored_run_mismatches(run_id, parent) == []
    assert ledger.run_checks.rows_compared > before  # the moved rows, read and compared
    _sql(ledger, "UPDATE hops SET output_sha256 = :bad WHERE id = :hop", bad="e" * 64, hop=hops[2])
    found = ledger.stored_run_mismatches(run_id, parent)
    assert [(m.table, m.key, m.column) for m in found] == [("hops", hops[2], "output_sha256")]


def test_a_hop_deleted_behind_the_ledger_gets_the_full_checks_answer(ledger: Ledger) -> None:
    run_id, hops = _run(ledger, 4)
    parent = _hand_back(ledger, run_id, hops, 0, None)
    assert ledger.stored_run_mismatches(run_id, parent) == []
    full = ledger.run_checks.full_checks
    _sql(ledger, "DELETE FROM hops WHERE id = :hop", hop=hops[3])
    assert ledger.stored_run_mismatches(run_id, parent) == ledger.full_run_mismatches(
        run_id, parent
    )
    assert ledger.run_checks.full_checks == full + 1


def test_a_row_the_hand_back_wrote_and_edited_since_is_named_by_its_column(
    ledger: Ledger,
) -> None:
    """The rows a hand back wrote are compared with their events from the values the check
    read (a datetime decoded as the full check decodes it), not read again."""
    run_id, hops = _run(ledger, 4)
    parent = _hand_back(ledger, run_id, hops, 0, None)
    assert ledger.stored_run_mismatches(run_id, parent) == []
    parent = _hand_back(ledger, run_id, hops, 1, parent)
    _sql(ledger, "UPDATE hops SET leased_at = '2001-01-01 00:00:00' WHERE id = :hop", hop=hops[2])
    found = ledger.stored_run_mismatches(run_id, parent)
    assert [(m.table, m.key, m.column) for m in found] == [("hops", hops[2], "leased_at")]
    assert found == ledger.full_run_mismatches(run_id, parent)


def test_a_check_per_hand_back_reads_the_run_in_one_statement_per_table(
    ledger: Ledger,
) -> None:
    """Run, hops, the checkpoint handed out and the events they name: four statements, none
    per row the hand back wrote (SQLite's own trace of what it ran)."""
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("counted with SQLite's statement trace")
    run_id, hops = _run(ledger, 6)
    parent = _hand_back(ledger, run_id, hops, 0, None)
    assert ledger.stored_run_mismatches(run_id, parent) == []
    parent = _hand_back(ledger, run_id, hops, 1, parent)
    statements: list[str] = []
    ledger.engine.dispose()  # every connection from now on traced

    def trace(connection: sqlite3.Connection, _record: object) -> None:
        connection.set_trace_callback(statements.append)

    event.listen(ledger.engine, "connect", trace)
    try:
        assert ledger.stored_run_mismatches(run_id, parent) == []
    finally:
        event.remove(ledger.engine, "connect", trace)
    assert ledger.run_checks.full_checks == 1  # the known rows' check, not the full one
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(reads) == 4, reads


def test_a_database_error_in_the_check_is_raised_as_sqlalchemy_raises_it(ledger: Ledger) -> None:
    """The check's reads run on the driver's cursor: a driver error still comes as SQLAlchemy's
    (its OperationalError is what `storage_fault_reason` reads a full disk from), with the
    driver's error inside."""
    run_id, _ = _run(ledger, 3)
    assert ledger.stored_run_mismatches(run_id, None) == []
    _sql(ledger, "ALTER TABLE events RENAME TO events_moved")
    try:
        with pytest.raises(DBAPIError) as raised:
            ledger.stored_run_mismatches(run_id, None)
    finally:
        _sql(ledger, "ALTER TABLE events_moved RENAME TO events")
    assert isinstance(raised.value.orig, ledger.engine.dialect.loaded_dbapi.Error)


def test_the_check_after_a_commit_does_not_hash_again_the_events_it_appended(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events a commit of this process appended are known sound as stored (their payload's
    text the one their INSERT sent): the next check reads them back and, found exactly so,
    does not recompute their hashes."""
    run_id, hops = _run(ledger, 4)
    assert ledger.stored_run_mismatches(run_id, None) == []
    _hand_back(ledger, run_id, hops, 0, None)
    hashed: list[str] = []
    event_hash = _chain.event_hash

    def counted(*args: Any) -> str:
        hashed.append(args[2])  # the kind
        return event_hash(*args)

    monkeypatch.setattr(_chain, "event_hash", counted)
    assert ledger.stored_run_mismatches(run_id, None) == []
    assert hashed == []
    assert ledger.run_checks.full_checks == 1  # the first check's, not this one's


def test_an_appended_event_edited_behind_the_ledgers_back_is_found_by_the_next_check(
    ledger: Ledger,
) -> None:
    """Known sound only as stored: an edit of an event this process appended (its payload's
    text, even to the same JSON value) has it hashed again, and the check finds it altered."""
    run_id, hops = _run(ledger, 4)
    assert ledger.stored_run_mismatches(run_id, None) == []
    _hand_back(ledger, run_id, hops, 0, None)
    committed = [e for e in ledger.events(run_id) if e.kind == "hop.committed"][-1]
    _sql(ledger, "UPDATE events SET payload = :p WHERE seq = :s",
         p='{"index": 0, "status": "committed", "metrics": {"loss": 0.25}}',
         s=committed.seq)  # fmt: skip
    found = ledger.stored_run_mismatches(run_id, None)
    named = {m.key: m.message for m in found}  # the hop, and the run its commit pinned
    assert set(named) == {run_id, hops[0]}
    assert all("does not verify" in message for message in named.values())


def test_a_rolled_back_transactions_events_are_not_taken_as_sound(ledger: Ledger) -> None:
    """Only a committed event is known sound: SQLite gives a rolled-back event's seq to the
    next event, which is checked from its own stored columns."""
    run_id, _hops = _run(ledger, 2)
    head = ledger.last_seq()
    with pytest.raises(RuntimeError, match="rolled back"), ledger.transaction() as session:
        rolled_back = ledger.append_event(session, "test.rolled_back", run_id=run_id)
        assert rolled_back.seq > head  # written, then rolled back below
        raise RuntimeError("rolled back")
    assert ledger.last_seq() == head
    assert rolled_back.seq not in ledger.verified_events
    ledger.record_event("test.committed", run_id=run_id)
    assert ledger.last_seq() in ledger.verified_events
    assert ledger.verify().ok


def test_under_an_sqlalchemy_without_its_processor_memo_the_check_decodes_rows_alike(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows a hand back wrote are decoded by their types' result processors: under an
    SQLAlchemy without `TypeEngine._cached_result_processor` (`_cursor.SQLALCHEMY_INTERNALS`
    false; SQLAlchemy's own execution keeps its own here) they are made through the public API,
    and the check finds what it found: the rows sound without the full check, then an edit."""
    run_id, hops = _run(ledger, 5)
    parent = _hand_back(ledger, run_id, hops, 0, None)
    assert ledger.stored_run_mismatches(run_id, parent) == []
    cached = TypeEngine._cached_result_processor

    def missing(self: TypeEngine[Any], dialect: Dialect, coltype: Any) -> Any:
        if sys._getframe(1).f_globals["__name__"].startswith("coordinator."):
            raise AttributeError("_cached_result_processor")  # as the ledger's code finds it
        return cached(self, dialect, coltype)

    monkeypatch.setattr(TypeEngine, "_cached_result_processor", missing)
    monkeypatch.setattr(_cursor, "SQLALCHEMY_INTERNALS", False)
    _run_check._state_processors.cache_clear()
    _cursor._prepared.cache_clear()
    try:
        parent = _hand_back(ledger, run_id, hops, 1, parent)
        full, compared = ledger.run_checks.full_checks, ledger.run_checks.rows_compared
        assert ledger.stored_run_mismatches(run_id, parent) == []
        assert ledger.run_checks.rows_compared > compared  # decoded, found as their events say
        assert ledger.run_checks.full_checks == full
        parent = _hand_back(ledger, run_id, hops, 2, parent)
        _sql(ledger, "UPDATE hops SET leased_at = '2001-01-01 00:00:00' WHERE id = :h", h=hops[3])
        found = ledger.stored_run_mismatches(run_id, parent)
        assert [(m.table, m.key, m.column) for m in found] == [("hops", hops[3], "leased_at")]
        assert found == ledger.full_run_mismatches(run_id, parent)
    finally:
        _run_check._state_processors.cache_clear()
        _cursor._prepared.cache_clear()
