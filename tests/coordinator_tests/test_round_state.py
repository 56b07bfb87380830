"""Federated rounds are held in memory with their run: beats, re-dispatches and contributions read
no run, hop or round from SQL; the round rows are checked against their events before the engine
acts on them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event, text

from coordinator.console.admin import AdminClient
from coordinator.engine.active_runs import ActiveRuns
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from tests.conftest import LoopThread
from tests.coordinator_tests.conftest import ScriptedSite
from tests.coordinator_tests.conftest import heartbeat as _beat

STATE = (" runs", " hops", " rounds")  # what a statement about a run's state names
WRITES = ("INSERT", "UPDATE", "DELETE")
PENDING = "test_statements"  # connection.info: the open transaction's statements


def _plan() -> dict[str, object]:
    return {"name": "fed", "dataset": "notes", "labels": ["x", "y"], "mode": "federated",
            "sites": ["site-a", "site-b"], "federated": {"rounds": 2, "min_sites": 2}}  # fmt: skip


@dataclass
class Statements:
    """The SQL the coordinator's ledger runs: all of it, and that of transactions that wrote
    nothing (a write's own reads, the rows it locks, are part of the write)."""

    all: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)

    def clear(self) -> None:
        self.all.clear()
        self.reads.clear()

    def state_reads(self, names: tuple[str, ...] = STATE) -> list[str]:
        """Read-only statements that name a run's state tables."""
        return [s for s in self.reads if any(name in s for name in names)]


@pytest.fixture
def statements(quiet: Coordinator) -> Iterator[Statements]:
    seen = Statements()

    def on_execute(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.all.append(statement)
        connection.info.setdefault(PENDING, []).append(statement)

    def on_end(connection: Any) -> None:
        done: list[str] = connection.info.pop(PENDING, [])
        if not any(s.lstrip().upper().startswith(WRITES) for s in done):
            seen.reads.extend(done)

    engine = quiet.engine.ledger.engine
    hooks = (("before_cursor_execute", on_execute), ("commit", on_end), ("rollback", on_end))
    for name, hook in hooks:
        event.listen(engine, name, hook)
    yield seen
    for name, hook in hooks:
        event.remove(engine, name, hook)


def test_federated_beats_dispatches_and_contributions_read_no_run_or_round_from_sql(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    quiet: Coordinator,
    statements: Statements,
    loop_thread: LoopThread,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
    run_id = admin.start_run(parse_plan(_plan()))
    a, b = sites["site-a"].next_task(), sites["site-b"].next_task()
    assert not _beat(sites["site-a"], a) and not _beat(sites["site-b"], b)  # hop.training
    engine = quiet.engine
    loads = engine.runs.loads
    statements.clear()

    for _ in range(3):
        assert not _beat(sites["site-a"], a) and not _beat(sites["site-b"], b)
    assert statements.all == []  # a beat of a round's hop: read from memory
    loop_thread.run(engine.connect("site-c"))  # another site's connect dispatches every run
    loop_thread.run(engine.dispatch(run_id))  # the round's hops are leased and sent already
    loop_thread.run(engine.check_deadlines())  # a watchdog pass over the round
    assert statements.state_reads() == []
    assert sites["site-b"].tasks.empty()  # site-b's hop is still the one it holds
    # A round's hops train side by side: no site is told that a later round's hop is next.
    assert sites["site-a"].preparations.empty() and sites["site-b"].preparations.empty()

    ref_a = sites["site-a"].upload(a, sites["site-a"].bundle(a, 1.0))
    statements.clear()
    assert sites["site-a"].report(a, ref_a, train_examples=10.0) == "committed"
    # A contribution while site-b trains: committed; no run or round read (the upload's
    # clean-up reads the hop's other checkpoints).
    assert statements.state_reads((" runs", " rounds")) == []
    assert not any(" rounds" in s for s in statements.all)
    [first, second] = engine.runs.rounds(run_id)  # held, written through
    assert (first.status, second.status) == ("training", "pending")

    ref_b = sites["site-b"].upload(b, sites["site-b"].bundle(b, 4.0))
    assert sites["site-b"].report(b, ref_b, train_examples=30.0) == "committed"
    a2, b2 = sites["site-a"].next_task(), sites["site-b"].next_task()
    assert (a2.round, b2.round) == (2, 2)
    assert (first.status, second.status) == ("aggregated", "training")
    assert a2.input_checkpoint.sha256 == b2.input_checkpoint.sha256 == first.output_sha256
    assert engine.runs.loads == loads  # loaded once, never again
    assert engine.ledger.verify().ok
    restarted = ActiveRuns(engine.ledger)  # what a restarted coordinator holds: one load
    held = [(r.id, r.status, r.output_sha256) for r in restarted.rounds(run_id)]
    assert held == [(r.id, r.status, r.output_sha256) for r in (first, second)]
    assert restarted.loads == 1


def test_a_round_row_edited_behind_the_ledger_pauses_the_run_before_it_aggregates(
    sites: dict[str, ScriptedSite], admin: AdminClient, quiet: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=10)
    run_id = admin.start_run(parse_plan(_plan()))
    a, b = sites["site-a"].next_task(), sites["site-b"].next_task()
    for site, task in (("site-a", a), ("site-b", b)):
        ref = sites[site].upload(task, sites[site].bundle(task, 1.0))
        if site == "site-b":  # the round's members edited in SQL, no ledger event
            with quiet.engine.ledger.engine.begin() as connection:
                connection.execute(
                    text("UPDATE rounds SET members = :m WHERE run_id = :r AND number = 1"),
                    {"m": f'[["site-a", ["{a.hop_id}"]]]', "r": run_id},
                )
        sites[site].report(task, ref, train_examples=10.0)
    run = admin.run(run_id)
    assert run.status == "paused"
    assert "ledger mismatch" in run.error and "rounds" in run.error
    assert [r.status for r in run.rounds] == ["training", "pending"]  # nothing aggregated
    assert sites["site-a"].tasks.empty() and sites["site-b"].tasks.empty()
