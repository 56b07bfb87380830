"""Operator controls the dashboard uses: pause (recalling the hop in flight) and skip."""

from __future__ import annotations

import grpc
import pytest

from coordinator.errors import InvalidInput
from coordinator.plan import parse_plan
from protocols.v1 import baton_pb2 as pb
from tests.conftest import LoopThread
from tests.coordinator_tests.conftest import committing_threads
from tests.coordinator_tests.test_failure_policy import _fail, _finish, _start, _wait, cluster

__all__ = ["cluster"]


def _action(payload: dict[str, object]) -> dict[str, object]:
    """An event's payload without the row snapshots the ledger adds (state_rows)."""
    from coordinator.ledger._integrity import STATE_ROWS_KEY

    return {k: v for k, v in payload.items() if k != STATE_ROWS_KEY}


def test_pause_recalls_the_leased_hop_and_resume_leases_it_again(  # type: ignore[no-untyped-def]
    cluster, loop_thread: LoopThread
) -> None:
    admin, site = cluster["admin"], cluster["site-a"]
    engine = cluster["coordinator"].engine
    run_id = _start(admin, ["site-a"])
    first = site.next_task()
    loop_thread.run(engine.pause_run(run_id, by="dashboard:olivia"))
    run = admin.run(run_id)
    assert run.status == "paused" and run.hops[0].status == "pending"
    with pytest.raises(grpc.RpcError) as fenced:  # the recalled lease is stale now
        site.upload(first, site.bundle(first))
    # Refused like any hop of a run that is not running: no live hop to upload to.
    assert fenced.value.code() == grpc.StatusCode.NOT_FOUND
    assert engine.ledger.checkpoints_of_run(run_id) == []
    with pytest.raises(InvalidInput, match="is paused, not running"):
        loop_thread.run(engine.pause_run(run_id))
    loop_thread.run(engine.resume_run(run_id, by="dashboard:olivia"))
    second = site.next_task()
    assert second.hop_id == first.hop_id and second.lease_token != first.lease_token
    _finish(site, second)
    assert _wait(admin, run_id, lambda r: r.status == "completed").status == "completed"
    events = {e.kind: e.payload for e in engine.ledger.events(run_id)}
    assert events["hop.recalled"]["by"] == "dashboard:olivia"
    assert events["run.paused"]["by"] == "dashboard:olivia"


def test_skip_failed_hop_moves_a_paused_run_to_the_next_site(  # type: ignore[no-untyped-def]
    cluster, loop_thread: LoopThread
) -> None:
    admin, a, b = cluster["admin"], cluster["site-a"], cluster["site-b"]
    engine = cluster["coordinator"].engine
    run_id = _start(admin, ["site-a", "site-b"], on_failure="pause")
    with pytest.raises(InvalidInput, match="no failed hop to skip"):
        loop_thread.run(engine.skip_failed_hop(run_id))
    _fail(a, a.next_task())
    assert admin.run(run_id).status == "paused"
    loop_thread.run(engine.skip_failed_hop(run_id, by="dashboard:olivia"))
    task = b.next_task()
    assert task.hop_index == 1
    _finish(b, task)
    run = _wait(admin, run_id, lambda r: r.status == "completed")
    assert [h.status for h in run.hops] == ["skipped", "committed"]


def test_abort_and_resume_record_who_acted(cluster, loop_thread: LoopThread) -> None:  # type: ignore[no-untyped-def]
    admin = cluster["admin"]
    engine = cluster["coordinator"].engine
    run_id = _start(admin, ["site-c"], allow_offline=True)
    loop_thread.run(engine.abort_run(run_id, "wrong plan", by="dashboard:olivia"))
    aborted = next(e for e in engine.ledger.events(run_id) if e.kind == "run.aborted")
    assert _action(aborted.payload) == {"reason": "wrong plan", "by": "dashboard:olivia"}
    # Without an actor (the gRPC admin service) the payload is as before.
    other = _start(admin, ["site-c"], allow_offline=True)
    loop_thread.run(engine.abort_run(other, "x"))
    aborted = next(e for e in engine.ledger.events(other) if e.kind == "run.aborted")
    assert _action(aborted.payload) == {"reason": "x"}
    assert pb.RunControlRequest  # the gRPC path is unchanged


def test_operator_actions_commit_on_the_ledger_writer_thread(  # type: ignore[no-untyped-def]
    cluster, loop_thread: LoopThread
) -> None:
    """Start, pause, resume, skip and abort write through the engine's ledger writer, as hop
    transitions do: never on the event loop, and in one order with them."""
    admin, a = cluster["admin"], cluster["site-a"]
    engine = cluster["coordinator"].engine
    committed_on = committing_threads(engine.ledger)
    run_id = loop_thread.run(
        engine.start_run(parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "y"],
                                     "sites": ["site-a", "site-b"],
                                     "failure": {"on_failure": "pause"}}))
    )  # fmt: skip
    a.next_task()  # recalled by the pause
    loop_thread.run(engine.pause_run(run_id, by="dashboard:olivia"))
    loop_thread.run(engine.resume_run(run_id, by="dashboard:olivia"))
    _fail(a, a.next_task())
    assert _wait(admin, run_id, lambda r: r.status == "paused").status == "paused"
    loop_thread.run(engine.skip_failed_hop(run_id, by="dashboard:olivia"))
    loop_thread.run(engine.abort_run(run_id, "enough", by="dashboard:olivia"))
    kinds = ("run.created", "hop.recalled", "run.paused", "run.running", "hop.skipped",
             "run.aborted")  # fmt: skip
    assert {kind: committed_on.get(kind) for kind in kinds} == {
        kind: {"ledger-writer_0"} for kind in kinds
    }
