"""Admin reads never run SQL on the event loop: a running run's view comes from the runs the
engine holds in memory, every other read (a paused or finished run, the list of runs, the
sites) runs on the ledger reader's thread; the answers are those built from the ledger."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import grpc
import pytest
from sqlalchemy import event

from coordinator.console.admin import AdminClient
from coordinator.engine import RunEngine
from coordinator.ledger import EvaluationRow, HopRow, Ledger, RunRow, locked_get
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from coordinator.servicer import run_status
from protocols.v1 import baton_pb2 as pb
from tests.conftest import LoopThread
from tests.coordinator_tests.conftest import WAIT, ScriptedSite

SITES = {"site-a", "site-b"}


def _plan(mode: str = "sequential") -> dict[str, object]:
    plan: dict[str, object] = {"name": f"admin-{mode}", "dataset": "notes",
                               "labels": ["x", "y"], "sites": ["site-a", "site-b"]}  # fmt: skip
    if mode == "federated":
        plan.update(mode="federated", federated={"rounds": 2, "min_sites": 2})
    return plan


@contextmanager
def _statements(ledger: Ledger) -> Iterator[list[tuple[str, str]]]:
    """Every statement sent to the ledger's database meanwhile, as (thread name, statement),
    but the ledger writer's (a hand back's work after its answer may still be committing)."""
    seen: list[tuple[str, str]] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        thread = threading.current_thread().name
        if not thread.startswith("ledger-writer"):
            seen.append((thread, " ".join(statement.split())))

    event.listen(ledger.engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(ledger.engine, "before_cursor_execute", note)


def _from_ledger(engine: RunEngine, run_id: str) -> pb.RunStatus:
    """The run's view built from what the ledger holds (read here, on the test's thread)."""
    return run_status(engine, engine.ledger.run(run_id))


def _evaluation(run_id: str, sha256: str) -> EvaluationRow:
    return EvaluationRow(id=uuid.uuid4().hex, run_id=run_id, checkpoint_sha256=sha256,
                         site="site-b", split="validation", status="pending", metrics={},
                         created_at=datetime.now(UTC))  # fmt: skip


def test_get_run_of_a_running_run_reads_no_sql_and_shows_what_was_committed_since(
    quiet: Coordinator, sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    engine = quiet.engine
    admin.wait_for_sites(SITES, timeout=WAIT)
    run_id = admin.start_run(parse_plan(_plan()))
    task = sites["site-a"].next_task()
    with _statements(engine.ledger) as seen:
        leased = admin.run(run_id)
    assert seen == []
    assert leased == _from_ledger(engine, run_id)
    assert [h.status for h in leased.hops] == ["leased", "pending"]

    site = sites["site-a"]
    assert site.report(task, site.upload(task, site.bundle(task))) == "committed"
    sites["site-b"].next_task()
    # An evaluation written (and then finished) after the run was loaded: written through.
    evaluation = _evaluation(run_id, leased.hops[0].hop_id * 2)
    engine.ledger.create_evaluations([evaluation])
    with _statements(engine.ledger) as seen:
        handed_on = admin.run(run_id)
    assert seen == []
    assert handed_on == _from_ledger(engine, run_id)
    assert [h.status for h in handed_on.hops] == ["committed", "leased"]
    assert [(e.evaluation_id, e.status) for e in handed_on.evaluations] == [
        (evaluation.id, "pending")
    ]
    engine.ledger.finish_evaluation(evaluation.id, metrics={"accuracy": 0.75})
    with _statements(engine.ledger) as seen:
        scored = admin.run(run_id)
    assert seen == []
    assert scored == _from_ledger(engine, run_id)
    assert scored.evaluations[0].status == "done"
    assert dict(scored.evaluations[0].metrics) == {"accuracy": 0.75}


def _federated_round_leased(
    admin: AdminClient, sites: dict[str, ScriptedSite]
) -> tuple[str, pb.HopTask]:
    """A federated run whose first round's hops are leased to both sites; site-a's task."""
    admin.wait_for_sites(SITES, timeout=WAIT)
    run_id = admin.start_run(parse_plan(_plan("federated")))
    task = sites["site-a"].next_task()
    sites["site-b"].next_task()
    return run_id, task


def test_a_federated_runs_view_comes_from_memory_with_its_rounds(
    quiet: Coordinator, sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    engine = quiet.engine
    run_id, task = _federated_round_leased(admin, sites)
    site = sites["site-a"]
    site.report(task, site.upload(task, site.bundle(task)), train_examples=10.0)
    with _statements(engine.ledger) as seen:
        view = admin.run(run_id)
    assert seen == []
    assert view == _from_ledger(engine, run_id)
    assert [r.status for r in view.rounds] == ["training", "pending"]
    assert [h.status for h in view.hops[:2]] == ["committed", "leased"]


def test_a_held_runs_view_follows_a_change_to_its_round_row_alone(
    quiet: Coordinator, sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    """The held view is built again when only a round's row is written (no hop or run row)."""
    engine = quiet.engine
    run_id, _task = _federated_round_leased(admin, sites)
    before = admin.run(run_id)
    assert before == admin.run(run_id)  # built once, then reused
    assert [(r.status, r.input_sha256) for r in before.rounds] == [
        ("training", ""),
        ("pending", ""),
    ]

    second = engine.ledger.rounds(run_id)[1]
    with _statements(engine.ledger) as written:
        engine.ledger.start_round(second.id, "ab" * 32)
    assert not any(
        statement.startswith("UPDATE hops") or statement.startswith("UPDATE runs")
        for _thread, statement in written
    )
    with _statements(engine.ledger) as seen:
        after = admin.run(run_id)
    assert seen == []
    assert after == _from_ledger(engine, run_id)
    assert [(r.status, r.input_sha256) for r in after.rounds] == [
        ("training", ""), ("training", "ab" * 32)]  # fmt: skip


def _settled_run(ledger: Ledger, status: str) -> str:
    """A run settled in `status`, written straight to the ledger (as another process would)."""
    run_id = uuid.uuid4().hex
    sha256 = uuid.uuid4().hex * 2
    hop = HopRow(id=uuid.uuid4().hex, index=0, site="site-a", hyperparameters={},
                 status="committed", metrics={"accuracy": 0.5}, output_sha256=sha256)  # fmt: skip
    plan = json.loads(parse_plan(_plan()).to_json())
    ledger.create_run(run_id, f"settled-{status}", plan, [hop], None)
    ledger.transition_run(run_id, expected=("running",), status=status, final_sha256=sha256)
    evaluation = _evaluation(run_id, sha256)
    ledger.create_evaluations([evaluation])
    ledger.finish_evaluation(evaluation.id, metrics={"accuracy": 0.5})
    return run_id


def test_reads_of_settled_runs_the_run_list_and_the_sites_run_off_the_event_loop(
    quiet: Coordinator,
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    loop_thread: LoopThread,
) -> None:
    engine = quiet.engine
    admin.wait_for_sites(SITES, timeout=WAIT)
    completed = _settled_run(engine.ledger, "completed")
    aborted = _settled_run(engine.ledger, "aborted")
    paused = admin.start_run(parse_plan(_plan()))
    sites["site-a"].next_task()
    loop_thread.run(engine.pause_run(paused))
    running = admin.start_run(parse_plan(_plan("federated")))
    sites["site-a"].next_task()
    sites["site-b"].next_task()
    loop = loop_thread.thread.name

    for run_id in (completed, aborted, paused):
        with _statements(engine.ledger) as seen:
            view = admin.run(run_id)
        assert seen and {thread for thread, _ in seen} == {"ledger-reader_0"}
        assert view == _from_ledger(engine, run_id)
    assert admin.run(completed).final_adapter_dir.endswith(f"{completed}/final_adapter")

    with _statements(engine.ledger) as seen:
        listed = admin.runs()
    assert seen and loop not in {thread for thread, _ in seen}
    assert [r.run_id for r in listed] == [completed, aborted, paused, running]
    assert listed == [_from_ledger(engine, r.run_id) for r in listed]
    assert [r.status for r in listed] == ["completed", "aborted", "paused", "running"]
    assert len(listed[3].rounds) == 2

    with _statements(engine.ledger) as seen:
        known = admin.sites()
    assert seen and loop not in {thread for thread, _ in seen}
    assert {(s.name, s.connected) for s in known} == {("site-a", True), ("site-b", True)}

    resumed = admin.control(paused, "resume")
    assert resumed.status == "running"
    assert resumed == _from_ledger(engine, paused)
    with pytest.raises(grpc.RpcError) as refused:
        admin.run("no-such-run")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_run_waiting_for_an_offline_site_is_viewed_without_reading_the_sites(
    quiet: Coordinator, sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    engine = quiet.engine
    admin.wait_for_sites(SITES, timeout=WAIT)
    sites["site-b"].close()
    deadline = time.monotonic() + WAIT
    while "site-b" in engine.connected_sites():
        assert time.monotonic() < deadline, "site-b's stream is still open"
        time.sleep(0.02)
    plan = parse_plan({**_plan(), "sites": ["site-b", "site-a"]})
    run_id = admin.start_run(plan, allow_offline=True)
    with _statements(engine.ledger) as seen:
        view = admin.run(run_id)
    assert seen == []
    assert view == _from_ledger(engine, run_id)
    assert view.hops[0].waiting_reason.startswith("waiting for site-b: offline since")


def test_a_polled_running_runs_view_follows_every_change_to_the_run(
    quiet: Coordinator,
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    loop_thread: LoopThread,
) -> None:
    """A held run's view is built once per change of its held rows and reused in between: after
    each kind of change (a progress beat, a hop's transition, an evaluation added and scored,
    a storage fault and its end, a hand back, a hop's validation metrics) GetRun, twice,
    answers the view built from the ledger then, never the one it built before."""
    engine = quiet.engine
    admin.wait_for_sites(SITES, timeout=WAIT)
    run_id = admin.start_run(parse_plan(_plan()))
    site = sites["site-a"]
    task = site.next_task()

    def polled() -> pb.RunStatus:
        with _statements(engine.ledger) as seen:
            first, second = admin.run(run_id), admin.run(run_id)
        assert seen == []
        assert first == second == _from_ledger(engine, run_id)
        return second

    def beat(phase: str, step: int) -> None:
        site.stub.SendHeartbeat(pb.Heartbeat(hop_id=task.hop_id, lease_token=task.lease_token,
                                             phase=phase, step=step, total_steps=30),
                                timeout=10)  # fmt: skip

    assert [(h.status, h.total_steps) for h in polled().hops] == [("leased", 0), ("pending", 0)]
    beat("loading", 0)  # progress only: nothing written
    assert [(h.status, h.total_steps) for h in polled().hops] == [("loading", 30), ("pending", 0)]
    beat("training", 3)  # the hop's row moves to training
    assert engine.ledger.hop(task.hop_id).status == "training"  # type: ignore[union-attr]
    assert [(h.status, h.step) for h in polled().hops] == [("training", 3), ("pending", 0)]
    beat("training", 7)
    assert polled().hops[0].step == 7

    evaluation = _evaluation(run_id, "ab" * 32)
    engine.ledger.create_evaluations([evaluation])
    assert [e.status for e in polled().evaluations] == ["pending"]
    engine.ledger.finish_evaluation(evaluation.id, metrics={"accuracy": 0.75})
    assert dict(polled().evaluations[0].metrics) == {"accuracy": 0.75}

    async def fault() -> None:
        engine.storage.report("a test's write", "No space left on device")

    async def recover() -> None:
        assert engine.storage.check()

    loop_thread.run(fault())
    assert "No space left on device" in polled().storage_fault
    loop_thread.run(recover())
    assert polled().storage_fault == ""

    assert site.report(task, site.upload(task, site.bundle(task))) == "committed"
    sites["site-b"].next_task()
    view = polled()
    assert [(h.status, h.step) for h in view.hops] == [("committed", 0), ("leased", 0)]
    # A hop's row alone written (the run's row too was written by the hand back, pinning it)
    engine.ledger.record_hop_validation(task.hop_id, site="site-a", ok=True,
                                        metrics={"val_accuracy": 0.5}, error="")  # fmt: skip
    assert polled().hops[0].metrics["val_accuracy"] == 0.5


def test_a_held_runs_view_shows_its_plan_as_edited_outside_this_coordinator(
    quiet: Coordinator,
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    loop_thread: LoopThread,
    database_url: str,
) -> None:
    """A run's plan is never written after it is created, and its held view keeps the plan's
    text while the held run keeps the same plan object; a plan edited by another writer of the
    ledger (with its event, so the engine sees the write) is shown as edited, once the engine
    has read its runs again."""
    engine = quiet.engine
    admin.wait_for_sites(SITES, timeout=WAIT)
    run_id = admin.start_run(parse_plan(_plan()))
    sites["site-a"].next_task()
    before = admin.run(run_id)
    assert before == admin.run(run_id) == _from_ledger(engine, run_id)  # built, then reused

    other = Ledger(database_url)  # another process's ledger on the same database
    try:
        with other.transaction() as session:
            run = locked_get(session, RunRow, run_id)
            assert run is not None
            run.plan = {**run.plan, "lora": {**run.plan["lora"], "r": 4}}
            other.append_event(session, "run.plan_edited", run_id=run_id)
    finally:
        other.close()

    async def read_again() -> bool:
        return engine.runs.check_outside_writes()

    assert loop_thread.run(read_again())
    with _statements(engine.ledger) as seen:
        edited = admin.run(run_id)
    assert seen == []
    assert edited == _from_ledger(engine, run_id)
    assert json.loads(edited.plan_json)["lora"]["r"] == 4
    assert edited.plan_json != before.plan_json
    assert edited.approval_bundle_sha256 != before.approval_bundle_sha256
