"""Checkpoint retention: `baton store gc` keeps each finished run's final + N and what is needed."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.ledger import CheckpointRow, EvaluationRow, HopRow, RunRow
from coordinator.plan import parse_plan
from coordinator.retention import Deletion, plan_deletions
from coordinator.server import Coordinator
from tests.coordinator_tests.conftest import ScriptedSite

runner = CliRunner()


def _commit(site: ScriptedSite) -> str:
    task = site.next_task()
    ref = site.upload(task, site.bundle(task, float(task.hop_index)))
    assert site.report(task, ref) == "committed"
    return ref.sha256


def _gc(coordinator: Coordinator, *flags: str) -> str:
    state = coordinator.engine.runs_dir.parent
    url = coordinator.engine.ledger.url
    result = runner.invoke(
        app, ["store", "gc", "--state-dir", str(state), "--database-url", url, *flags]
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_gc_keeps_each_finished_runs_final_and_n_last_and_everything_a_live_run_needs(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    a, b = sites["site-a"], sites["site-b"]
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    plan = {"name": "t", "dataset": "notes", "labels": ["x", "y"]}
    finished = admin.start_run(parse_plan({**plan, "sites": ["site-a", "site-b"] * 2}))
    outputs = [_commit(site) for site in (a, b, a, b)]
    assert admin.run(finished).status == "completed"
    live = admin.start_run(parse_plan({**plan, "sites": ["site-a", "site-b"]}))
    live_output = _commit(a)
    b.next_task()  # leased: it needs the live run's first output as its input
    store = coordinator.engine.store
    ledger = coordinator.engine.ledger

    listed = _gc(coordinator, "--keep", "1")
    assert "dry run: 2 checkpoint(s) would be deleted" in listed
    assert all(sha in store for sha in outputs)  # a dry run deletes nothing

    deleted = _gc(coordinator, "--keep", "1", "--delete")
    assert "deleted 2 checkpoint(s)" in deleted
    assert [sha in store for sha in outputs] == [False, False, True, True]
    assert live_output in store
    assert [ledger.checkpoint(sha).status for sha in outputs] == [
        "deleted", "deleted", "stored", "stored"
    ]  # fmt: skip
    events = [e.payload for e in ledger.events() if e.kind == "checkpoint.deleted"]
    assert sorted(e["sha256"] for e in events) == sorted(outputs[:2])
    assert all(e["reason"] == "retention" for e in events)

    # keep 0: the final stays all the same, and so does what the live run needs.
    assert "deleted 1 checkpoint(s)" in _gc(coordinator, "--keep", "0", "--delete")
    assert outputs[3] in store and live_output in store and outputs[2] not in store
    assert ledger.verify_chain() is None
    # The final is still served: an evaluation of the finished run downloads it.
    [evaluation] = admin.evaluate_run(finished, "validation", ["site-a"])
    task = a.next_evaluation()
    assert task.evaluation_id == evaluation
    assert len(a.download(task.checkpoint.sha256)) == task.checkpoint.size
    assert admin.run(live).status == "running"


def _hop(run_id: str, index: int, status: str, output: str | None, input_: str | None) -> HopRow:
    return HopRow(id=f"{run_id}{index}", run_id=run_id, index=index, site="s", status=status,
                  hyperparameters={}, output_sha256=output, input_sha256=input_)  # fmt: skip


def _row(sha: str, run_id: str, status: str = "stored") -> CheckpointRow:
    return CheckpointRow(sha256=sha, size=10, run_id=run_id, hop_id="h", producer_site="s",
                         manifest={}, tensors=[], stored_at=datetime.now(UTC),
                         status=status)  # fmt: skip


def test_retention_never_plans_to_delete_what_a_paused_run_or_pending_evaluation_needs() -> None:
    sha = {name: name * 64 for name in "abcdefgh"}
    paused = RunRow(id="p", status="paused", hops=[
        _hop("p", 0, "committed", sha["a"], None), _hop("p", 1, "failed", None, sha["a"])
    ])  # fmt: skip
    done = RunRow(id="d", status="completed", final_sha256=sha["c"], hops=[
        _hop("d", 0, "committed", sha["b"], None), _hop("d", 1, "committed", sha["c"], sha["b"])
    ])  # fmt: skip
    aborted = RunRow(id="x", status="aborted", hops=[
        _hop("x", 0, "committed", sha["d"], None), _hop("x", 1, "committed", sha["e"], sha["d"]),
        _hop("x", 2, "leased", None, sha["e"]),
    ])  # fmt: skip
    evaluation = EvaluationRow(id="e", run_id="x", checkpoint_sha256=sha["d"], status="pending")
    rows = [_row(sha["a"], "p"), _row(sha["b"], "d"), _row(sha["c"], "d"), _row(sha["d"], "x"),
            _row(sha["e"], "x"), _row(sha["f"], "x", "superseded")]  # fmt: skip
    now = time.time()
    stored = {row.sha256: (10, now) for row in rows} | {sha["g"]: (7, now - 7200),
                                                         sha["h"]: (7, now)}  # fmt: skip
    planned = plan_deletions([paused, done, aborted], rows, [evaluation], stored, keep=0, now=now)
    assert sorted(planned, key=lambda d: d.sha256) == [
        Deletion(sha["b"], 10, "d", "retention"),  # the completed run's earlier checkpoint
        Deletion(sha["f"], 10, "x", "superseded"),  # bytes a superseded row left behind
        Deletion(sha["g"], 7, None, "orphan"),  # old bytes no row names (h is too recent)
    ]  # kept: a (paused run), c (final), d (pending evaluation), e (aborted run's last)
