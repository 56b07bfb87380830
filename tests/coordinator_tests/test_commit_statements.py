"""What a hand back's one transaction sends to the database (SQLite and PostgreSQL): the
statements the engine's `_commit_and_lease` makes, counted, not timed."""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid

from sqlalchemy import event
from sqlalchemy.orm import Session

from coordinator.engine.uploads import stored_checkpoint_row
from coordinator.ledger import HopRow, Ledger, TransitionRefused


def _hand_back(ledger: Ledger, run_id: str, ids: list[str], i: int) -> None:
    """The output recorded, the hop uploaded and committed, the next hop leased: one commit.
    The output's row is built as a kept bundle's is (`stored_checkpoint_row`)."""
    sha = hashlib.sha256(f"{run_id}{i}".encode()).hexdigest()
    output = stored_checkpoint_row(  # the row a hand back records
        sha256=sha, run_id=run_id, hop_id=ids[i], producer_site=f"site-{i % 2}", size=10,
        parent_sha256=None, manifest={"base_model_sha256": "b" * 64}, tensors=[],
        signature="s", producer_certificate="c",
    )  # fmt: skip
    with ledger.transaction():
        ledger.record_checkpoint(output)
        with contextlib.suppress(TransitionRefused):
            ledger.transition_hop(ids[i], expected=("leased", "training"), status="uploaded",
                                  event="hop.uploaded", payload={"output_sha256": sha})  # fmt: skip
        ledger.commit_hop(ids[i], lease_token=f"t{i}", output_sha256=sha, metrics={},
                          train_started_at_ns=1, train_finished_at_ns=2,
                          base_model_sha256="b" * 64)  # fmt: skip
        ledger.lease_hop(ids[i + 1], f"t{i + 1}", sha)


def _leased_run(ledger: Ledger, count: int) -> tuple[str, list[str]]:
    """A run of `count` hops, its first leased: its id and its hops' ids."""
    hops = [HopRow(id=uuid.uuid4().hex, index=i, site=f"site-{i % 2}", hyperparameters={},
                   status="pending", metrics={}) for i in range(count)]  # fmt: skip
    run_id = uuid.uuid4().hex
    ledger.create_run(run_id, "count", {"task": "t"}, hops, None)
    ledger.lease_hop(hops[0].id, "t0", None)
    return run_id, [hop.id for hop in hops]


def test_a_hand_back_reads_no_event_back_and_writes_each_rows_ledger_seq_with_the_row(
    ledger: Ledger,
) -> None:
    """Each event is one INSERT; the snapshots carried forward come from what this process
    recorded, not from the events read back; each row's ledger_seq is written by the very
    statement that writes the row (after its event's INSERT), never by an UPDATE of its own;
    the run row is not read once its base model is pinned: 14 statements in all."""
    run_id, ids = _leased_run(ledger, 4)
    _hand_back(ledger, run_id, ids, 0)  # pins the base model
    statements: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(ledger.engine, "before_cursor_execute", note)
    _hand_back(ledger, run_id, ids, 1)
    event.remove(ledger.engine, "before_cursor_execute", note)
    event_reads = [s for s in statements if re.match(r"SELECT .* FROM events", s)]
    assert len(event_reads) == 1 and "events.hash" in event_reads[0]  # the chain's head
    assert len([s for s in statements if s.startswith("INSERT INTO events")]) == 4
    assert not [s for s in statements if s.startswith("UPDATE") and "SET ledger_seq" in s]
    writes = [s for s in statements if re.match(r"(UPDATE hops|INSERT INTO checkpoints)", s)]
    assert len(writes) == 4 and all("ledger_seq" in s for s in writes)  # uploaded, committed,
    # the next hop leased, the output's row
    assert not [s for s in statements if re.match(r"SELECT runs\.id", s)]
    assert len(statements) <= 14  # BEGIN IMMEDIATE on SQLite; COMMIT is no statement here
    assert ledger.run(run_id).base_model_sha256 == "b" * 64
    held = {hop.id: hop for hop in ledger.run(run_id).hops}
    events = {e.kind: e.seq for e in ledger.events(run_id)[-4:]}
    assert held[ids[1]].ledger_seq == events["hop.committed"]
    assert held[ids[2]].ledger_seq == events["hop.leased"]
    output = ledger.checkpoint(held[ids[1]].output_sha256 or "")
    assert output is not None and output.ledger_seq == events["checkpoint.stored"]
    assert ledger.verify().ok


def test_a_hand_backs_hop_transitions_are_plain_updates_not_unit_of_work_flushes(
    ledger: Ledger,
) -> None:
    """The hop's moves (uploaded, committed) and the next hop's lease write their columns with
    one UPDATE each (`write_columns`): no flush of the ORM's unit of work finds a hop changed,
    and the events still record each move's snapshot, chained one by one."""
    run_id, ids = _leased_run(ledger, 3)
    flushed: list[str] = []

    def note(session: Session, _context: object, _instances: object) -> None:
        flushed.extend(type(row).__name__ for row in session.dirty if session.is_modified(row))

    event.listen(ledger._sessions, "before_flush", note)
    try:
        _hand_back(ledger, run_id, ids, 0)
        _hand_back(ledger, run_id, ids, 1)
    finally:
        event.remove(ledger._sessions, "before_flush", note)
    assert "HopRow" not in flushed
    kinds = [(e.kind, e.hop_id) for e in ledger.events(run_id)][-8:]
    assert kinds == [
        ("checkpoint.stored", ids[0]), ("hop.uploaded", ids[0]), ("hop.committed", ids[0]),
        ("hop.leased", ids[1]), ("checkpoint.stored", ids[1]), ("hop.uploaded", ids[1]),
        ("hop.committed", ids[1]), ("hop.leased", ids[2]),
    ]  # fmt: skip
    events = ledger.events(run_id)
    leased = events[-1].payload["state_rows"]
    assert [(e["table"], e["key"], e["values"]["status"]) for e in leased] == [
        ("hops", ids[2], "leased")
    ]
    assert ledger.verify_chain() is None and ledger.verify().ok
    held = {hop.id: hop for hop in ledger.run(run_id).hops}
    assert [held[i].status for i in ids] == ["committed", "committed", "leased"]
    assert held[ids[2]].attempts == 1 and held[ids[1]].metrics == {}
