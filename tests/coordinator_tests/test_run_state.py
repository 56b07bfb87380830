"""The engine holds its running runs in memory: no per-call reload, a hop's commit and the next
hop's lease in one transaction, admin actions seen at once, heartbeats answered mid-commit."""

from __future__ import annotations

import errno
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import event

from coordinator.console.admin import AdminClient
from coordinator.ledger import HopRow, Ledger
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.v1 import baton_pb2 as pb
from tests.conftest import LoopThread
from tests.coordinator_tests.conftest import ScriptedSite
from tests.coordinator_tests.conftest import heartbeat as _beat


def _plan(*sites: str) -> dict[str, object]:
    return {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": list(sites)}


@pytest.fixture
def statements(quiet: Coordinator) -> Iterator[list[str]]:
    """Every SQL statement the coordinator's ledger runs while the test runs."""
    seen: list[str] = []

    def on_execute(*args: Any) -> None:
        seen.append(args[2])

    engine = quiet.engine.ledger.engine
    event.listen(engine, "before_cursor_execute", on_execute)
    yield seen
    event.remove(engine, "before_cursor_execute", on_execute)


def test_heartbeats_and_connects_read_no_run_from_sql(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    quiet: Coordinator,
    statements: list[str],
    loop_thread: LoopThread,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    task = sites["site-a"].next_task()
    assert not _beat(sites["site-a"], task)  # the first training beat writes hop.training
    loads = quiet.engine.runs.loads
    statements.clear()

    idle = pb.Heartbeat(phase="idle")  # an agent with no hop
    assert sites["site-b"].stub.SendHeartbeat(idle, timeout=10).cancel
    assert statements == []
    for _ in range(5):
        assert not _beat(sites["site-a"], task)
    assert statements == []  # a beat of a live hop: read from memory
    loop_thread.run(quiet.engine.connect("site-b"))  # a reconnect dispatches every run
    assert not any(" runs" in s or " hops" in s for s in statements)
    statements.clear()
    loop_thread.run(quiet.engine.check_deadlines())  # a watchdog pass
    assert not any(" runs" in s or " hops" in s for s in statements)
    assert quiet.engine.runs.loads == loads  # loaded once, never again


def test_a_commit_and_the_next_lease_are_one_transaction_with_two_chained_events(
    sites: dict[str, ScriptedSite], admin: AdminClient, quiet: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    commits: list[int] = []  # commits of transactions that wrote (a read-only one syncs nothing)
    ledger = quiet.engine.ledger

    def on_execute(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            connection.info["wrote"] = True

    def on_commit(connection: Any) -> None:
        if connection.info.pop("wrote", False):
            commits.append(1)

    event.listen(ledger.engine, "before_cursor_execute", on_execute)
    event.listen(ledger.engine, "commit", on_commit)
    try:
        assert sites["site-a"].report(first, ref) == "committed"
    finally:
        event.remove(ledger.engine, "commit", on_commit)
        event.remove(ledger.engine, "before_cursor_execute", on_execute)

    second = sites["site-b"].next_task()
    assert second.input_checkpoint.sha256 == ref.sha256
    assert len(commits) == 1  # one durable commit for the handoff
    events = [e for e in ledger.events(run_id) if e.kind in ("hop.committed", "hop.leased")]
    committed, leased = events[-2], events[-1]
    assert (committed.kind, committed.hop_id) == ("hop.committed", first.hop_id)
    assert (leased.kind, leased.hop_id) == ("hop.leased", second.hop_id)
    assert leased.seq == committed.seq + 1 and leased.prev_hash == committed.hash
    assert ledger.verify().ok


def test_a_failure_between_the_commit_and_the_lease_leaves_neither(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    quiet: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    ledger = quiet.engine.ledger
    kinds_before = [e.kind for e in ledger.events(run_id)]

    def full_disk(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ledger, "lease_hop", full_disk)
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-a"].report(first, ref)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the site retries

    other = Ledger(database_url)  # what a restart would read
    try:
        hops = other.run(run_id).hops
        assert [h.status for h in hops] == ["uploaded", "pending"]  # as before the report
        assert [e.kind for e in other.events(run_id)] == kinds_before
    finally:
        other.close()
    held = quiet.engine.runs.get(run_id)
    assert held is not None and [h.status for h in held.hops] == ["uploaded", "pending"]

    monkeypatch.undo()
    assert sites["site-a"].report(first, ref) == "committed"  # the retry commits both
    assert sites["site-b"].next_task().input_checkpoint.sha256 == ref.sha256
    assert ledger.verify().ok


def test_pause_resume_and_abort_reach_a_run_held_in_memory(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    quiet: Coordinator,
    loop_thread: LoopThread,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))
    task = sites["site-a"].next_task()
    assert not _beat(sites["site-a"], task)

    loop_thread.run(quiet.engine.pause_run(run_id, by="operator"))  # the dashboard's path
    assert _beat(sites["site-a"], task)  # the lease is withdrawn at once
    admin.control(run_id, "resume")
    again = sites["site-a"].next_task()
    assert again.hop_id == task.hop_id and again.lease_token != task.lease_token
    assert not _beat(sites["site-a"], again)
    admin.control(run_id, "abort", "stop")
    assert _beat(sites["site-a"], again)
    assert quiet.engine.runs.get(run_id) is None


def test_a_ledger_change_made_elsewhere_is_noticed_by_the_next_watchdog_pass(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    quiet: Coordinator,
    loop_thread: LoopThread,
    database_url: str,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan(_plan("site-a", "site-b")))
    task = sites["site-a"].next_task()
    assert not _beat(sites["site-a"], task)

    other = Ledger(database_url)  # another process (or Ledger) aborts the run
    try:
        other.transition_run(run_id, expected=("running",), status="aborted", error="elsewhere")
    finally:
        other.close()
    loop_thread.run(quiet.engine.check_deadlines())

    assert _beat(sites["site-a"], task)
    assert quiet.engine.runs.get(run_id) is None


def test_a_heartbeat_is_answered_while_a_commit_is_being_written(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    quiet: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan("site-a", "site-b")))
    first = sites["site-a"].next_task()
    ref = sites["site-a"].upload(first, sites["site-a"].bundle(first))
    ledger = quiet.engine.ledger
    commit_hop = ledger.commit_hop
    writing, release = threading.Event(), threading.Event()

    def slow_commit(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        release.wait(30)  # a commit whose fsync takes its time
        return commit_hop(*args, **kwargs)

    monkeypatch.setattr(ledger, "commit_hop", slow_commit)
    outcome: list[str] = []
    reporter = threading.Thread(target=lambda: outcome.append(sites["site-a"].report(first, ref)))
    reporter.start()
    try:
        assert writing.wait(10)
        # Answered (from memory) while the commit is held: not queued behind it.
        assert not _beat(sites["site-a"], first, phase="uploading")
        assert sites["site-b"].stub.SendHeartbeat(pb.Heartbeat(phase="idle"), timeout=10).cancel
    finally:
        release.set()
        reporter.join(30)
    assert outcome == ["committed"]
    assert _beat(sites["site-a"], first)  # committed: the lease is over


def test_a_transaction_opened_inside_another_joins_it_and_reports_its_rows_once(
    database_url: str,
) -> None:
    ledger = Ledger(database_url)
    ledger.migrate()
    try:
        hops = [HopRow(id=uuid.uuid4().hex, index=i, site="site-a", hyperparameters={},
                       status="pending", metrics={}) for i in range(2)]  # fmt: skip
        run_id = uuid.uuid4().hex
        ledger.create_run(run_id, "t", {"name": "t"}, hops, None)
        ledger.lease_hop(hops[0].id, "token", None)
        written: list[list[str]] = []
        ledger.row_observers.append(lambda rows: written.append([type(r).__name__ for r in rows]))
        events = len(ledger.events(run_id))

        def commit() -> None:
            ledger.commit_hop(hops[0].id, lease_token="token", output_sha256="ef" * 32,
                              metrics={}, train_started_at_ns=1, train_finished_at_ns=2,
                              base_model_sha256="ab" * 32)  # fmt: skip

        with pytest.raises(RuntimeError, match="between"), ledger.transaction():
            commit()
            raise RuntimeError("a failure between the commit and the lease")
        assert [h.status for h in ledger.run(run_id).hops] == ["leased", "pending"]
        assert len(ledger.events(run_id)) == events and written == []

        with ledger.transaction():
            commit()
            ledger.lease_hop(hops[1].id, "next", "ef" * 32)
        assert [h.status for h in ledger.run(run_id).hops] == ["committed", "leased"]
        assert [e.kind for e in ledger.events(run_id)][events:] == ["hop.committed", "hop.leased"]
        assert len(written) == 1 and written[0].count("HopRow") == 2  # once, after the commit
        assert ledger.verify().ok
    finally:
        ledger.close()
