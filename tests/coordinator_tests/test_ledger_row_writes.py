"""How a transaction's state rows reach the database: `locked_get`'s rows, `write_columns` and
`insert_row` writes carried by their event's statement (with its ledger_seq), and the unit of
work's flushes between them; each row ends as its newest event recorded it."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, select

from coordinator.ledger import CheckpointRow, HopRow, Ledger, RunRow, locked_get
from coordinator.ledger._canonical import snapshot_json
from coordinator.ledger._chain import write_columns
from coordinator.ledger._integrity import values_entry
from tests.coordinator_tests.test_commit_statements import _leased_run


def _stored(ledger: Ledger, hop_id: str) -> tuple[str, str | None, int | None]:
    """The hop's status, error and ledger_seq as the database holds them."""
    table = HopRow.__table__.c
    query = select(table.status, table.error, table.ledger_seq).where(table.id == hop_id)
    with ledger.engine.connect() as connection:
        found = connection.execute(query).one()
    return found[0], found[1], found[2]


def test_a_column_the_unit_of_work_flushes_after_write_columns_keeps_the_newer_value(
    ledger: Ledger,
) -> None:
    """`write_columns` leaves its UPDATE to the row's event; a flush before that event writes
    the column's newer value, which the event's UPDATE must not put back."""
    _run_id, ids = _leased_run(ledger, 2)
    with ledger.transaction() as session:
        hop = locked_get(session, HopRow, ids[0])
        assert hop is not None
        write_columns(session, hop, {"status": "training", "error": "older"})
        hop.error = "newer"  # the unit of work writes it at the event's flush
        appended = ledger.append_event(session, "test.written", hop_id=hop.id)
    assert _stored(ledger, ids[0]) == ("training", "newer", appended.seq)
    recorded = appended.payload["state_rows"][0]["values"]
    assert (recorded["status"], recorded["error"]) == ("training", "newer")
    assert ledger.verify().ok


def test_a_row_flushed_then_written_by_write_columns_keeps_its_newest_events_seq(
    ledger: Ledger,
) -> None:
    """A flushed row's ledger_seq is written at the commit (one UPDATE per table); the same
    row written later by `write_columns` carries its newer event's seq itself, and the older
    stamp is not written over it."""
    _run_id, ids = _leased_run(ledger, 2)
    with ledger.transaction() as session:
        hop = locked_get(session, HopRow, ids[0])
        assert hop is not None
        hop.error = "flushed"
        first = ledger.append_event(session, "test.flushed", hop_id=hop.id)
        write_columns(session, hop, {"status": "training"})
        second = ledger.append_event(session, "test.written", hop_id=hop.id)
    assert first.seq < second.seq
    assert _stored(ledger, ids[0]) == ("training", "flushed", second.seq)
    assert ledger.verify().ok


def _checkpoint(sha: str, run_id: str, hop_id: str) -> CheckpointRow:
    """A checkpoint row that leaves its defaulted columns unset (signature, certificate,
    status)."""
    return CheckpointRow(
        sha256=sha, size=5, run_id=run_id, hop_id=hop_id, producer_site="site-0",
        parent_sha256=None, manifest={"m": 1}, tensors=[], stored_at=datetime.now(UTC),
    )  # fmt: skip


def test_a_checkpoint_row_recorded_gets_its_defaults_and_its_events_seq_in_one_insert(
    ledger: Ledger,
) -> None:
    run_id, ids = _leased_run(ledger, 2)
    row = _checkpoint("c" * 64, run_id, ids[0])
    statements: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(ledger.engine, "before_cursor_execute", note)
    ledger.record_checkpoint(row)
    event.remove(ledger.engine, "before_cursor_execute", note)
    assert [s for s in statements if "checkpoints" in s.split(" (")[0]][-1].startswith(
        "INSERT INTO checkpoints"
    )  # the SELECT of the row, then its INSERT: no UPDATE of its ledger_seq
    assert not [s for s in statements if s.startswith("UPDATE")]
    stored = ledger.checkpoint(row.sha256)
    assert stored is not None
    written = ledger.events()[-1]
    assert (stored.signature, stored.producer_certificate, stored.status) == ("", "", "stored")
    assert (row.signature, row.status, row.ledger_seq) == ("", "stored", written.seq)
    assert stored.ledger_seq == written.seq and written.kind == "checkpoint.stored"
    assert written.payload["state_rows"][0]["values"]["status"] == "stored"
    assert ledger.verify().ok


def test_a_checkpoint_row_whose_transaction_rolled_back_keeps_its_values_and_records_again(
    ledger: Ledger,
) -> None:
    """A failed commit (the hand back's bundle not durable, say) leaves the row object as it
    was given: a later record of the same object writes it."""
    run_id, ids = _leased_run(ledger, 2)
    row = _checkpoint("d" * 64, run_id, ids[0])
    with pytest.raises(RuntimeError, match="not durable"), ledger.transaction():
        ledger.record_checkpoint(row)
        raise RuntimeError("not durable")
    assert ledger.checkpoint(row.sha256) is None
    assert (row.sha256, row.hop_id, row.size) == ("d" * 64, ids[0], 5)  # no expired attribute
    ledger.record_checkpoint(row)
    stored = ledger.checkpoint(row.sha256)
    assert stored is not None and stored.ledger_seq == ledger.last_seq()
    assert ledger.verify().ok


def test_a_row_locked_get_reads_is_the_sessions_own(ledger: Ledger) -> None:
    """Read with one plain SELECT and built as loaded: the session's identity map holds it,
    its relationship loads, and a change to it is flushed like any loaded row's."""
    run_id, ids = _leased_run(ledger, 2)
    with ledger.transaction() as session:
        hop = locked_get(session, HopRow, ids[1])
        assert hop is not None and hop.status == "pending" and hop.run_id == run_id
        assert session.get(HopRow, ids[1]) is hop
        assert locked_get(session, HopRow, ids[1]) is hop
        assert hop.run.id == run_id and [h.id for h in hop.run.hops] == ids
        assert locked_get(session, HopRow, uuid.uuid4().hex) is None
        run = session.get(RunRow, run_id)  # held already: locked_get returns that object
        assert locked_get(session, RunRow, run_id) is run
        hop.error = "noted"
        ledger.append_event(session, "test.noted", hop_id=hop.id)
    held = ledger.hop(ids[1])
    assert held is not None and held.error == "noted" and held.ledger_seq == ledger.last_seq()
    assert ledger.verify().ok


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -7, 10**200, 1.5, -0.0, float("nan"), float("inf"), "", "é\n\"q\"",
     "x" * 158, "x" * 159, "é" * 30, {"b": [1, 2.0]}, ["a" * 200], datetime(2026, 1, 1)],
)  # fmt: skip
def test_a_snapshot_keeps_a_value_or_its_digest_as_its_canonical_json_decides(
    value: object,
) -> None:
    """Short values (their canonical JSON at most 160 characters) verbatim, longer ones as
    the sha256 of that JSON, whatever the value's type."""
    entry = values_entry("hops", "k", {"c": value})
    canonical = (
        value.replace(tzinfo=UTC).isoformat(timespec="microseconds")
        if isinstance(value, datetime)
        else value
    )
    text = snapshot_json(canonical)
    if len(text) > 160:
        assert entry["values"] == {} and entry["digests"] == {
            "c": hashlib.sha256(text.encode("ascii")).hexdigest()
        }
    else:
        assert entry["digests"] == {} and snapshot_json(entry["values"]["c"]) == text
