"""The coordinator's per-call work reads only active runs: finished history is never loaded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from coordinator.engine import RunEngine
from coordinator.errors import PermissionDenied
from coordinator.ledger import EvaluationRow, HopRow, Ledger, RunRow
from coordinator.plan import parse_plan
from coordinator.store import CheckpointStore
from tests.conftest import Pki

FINISHED = 12


def _plan(*sites: str) -> dict[str, Any]:
    return json.loads(
        parse_plan(
            {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": list(sites)}
        ).to_json()
    )


def _finished_run(ledger: Ledger, status: str, input_sha: str) -> str:
    """A settled run with a hop whose input was `input_sha` and a finished evaluation of it."""
    run_id = uuid.uuid4().hex
    hop = HopRow(id=uuid.uuid4().hex, index=0, site="site-a", hyperparameters={},
                 status="committed", metrics={}, input_sha256=input_sha,
                 output_sha256=input_sha)  # fmt: skip
    ledger.create_run(run_id, "old", _plan("site-a"), [hop], None)
    ledger.transition_run(run_id, expected=("running",), status=status, final_sha256=input_sha)
    evaluation = EvaluationRow(id=uuid.uuid4().hex, run_id=run_id, checkpoint_sha256=input_sha,
                               site="site-a", split="validation", status="pending",
                               metrics={}, created_at=datetime.now(UTC))  # fmt: skip
    ledger.create_evaluations([evaluation])
    ledger.finish_evaluation(evaluation.id, metrics={"accuracy": 0.5})
    return run_id


@pytest.fixture
def engine(pki: Pki, tmp_path: Path, database_url: str) -> Iterator[RunEngine]:
    ledger = Ledger(database_url)
    ledger.migrate()
    for site in ("site-a", "site-b"):
        ledger.register_site(site, agent_version="t", capabilities=[], base_models=[],
                             datasets=[], certificate_serial="1")  # fmt: skip
    state = tmp_path / "state"
    yield RunEngine(ledger, CheckpointStore(state / "checkpoints"), state / "runs",
                    ca_pem=pki.tls("coordinator").ca_certificate.read_bytes(),
                    max_checkpoint_bytes=1 << 20)  # fmt: skip
    ledger.close()


@pytest.fixture
def loaded_run_ids() -> Iterator[list[str]]:
    """The run id of every run, hop and evaluation row the ORM loads while the test runs."""
    seen: list[str] = []

    def on_run(target: RunRow, _context: object) -> None:
        seen.append(target.id)

    def on_child(target: HopRow | EvaluationRow, _context: object) -> None:
        seen.append(target.run_id)

    listeners = [(RunRow, on_run), (HopRow, on_child), (EvaluationRow, on_child)]
    for model, listener in listeners:
        event.listen(model, "load", listener)
    yield seen
    for model, listener in listeners:
        event.remove(model, "load", listener)


def test_watchdog_connect_and_download_checks_never_load_finished_runs(
    engine: RunEngine, loaded_run_ids: list[str]
) -> None:
    old_sha = "cd" * 32
    finished = [
        _finished_run(engine.ledger, ("completed", "failed", "aborted")[i % 3], old_sha)
        for i in range(FINISHED)
    ]

    async def scenario() -> str:
        run_id = await engine.start_run(parse_plan({"name": "live", "dataset": "notes",
                                                    "labels": ["x", "y"],
                                                    "sites": ["site-a", "site-b"]}))  # fmt: skip
        loaded_run_ids.clear()
        await engine.connect("site-a")  # leases the live run's first hop
        await engine.check_deadlines()
        await engine.connect("site-b")
        with pytest.raises(PermissionDenied):
            # Only finished runs ever needed this checkpoint: refused without reading them.
            engine.checkpoint_for_download("site-a", old_sha)
        return run_id

    # The ledger reads locked rows and the tamper check's rows without the ORM's loading (no
    # "load" event): every statement's parameters are watched too.
    parameters: list[str] = []

    def on_execute(_conn: object, _cursor: object, _sql: str, params: Any, *_: object) -> None:
        parameters.append(repr(params))

    event.listen(engine.ledger.engine, "before_cursor_execute", on_execute)
    try:
        live = asyncio.run(scenario())
    finally:
        event.remove(engine.ledger.engine, "before_cursor_execute", on_execute)
    # The live run was read by its id: the hooks do see its reads.
    assert any(live in p for p in parameters)
    assert not set(loaded_run_ids) & set(finished)
    assert not [run_id for run_id in finished if any(run_id in p for p in parameters)]
    assert [r.id for r in engine.ledger.active_runs()] == [live]


def test_download_is_allowed_by_an_indexed_lookup_of_the_live_hop(engine: RunEngine) -> None:
    sha = "ef" * 32
    hop = HopRow(id=uuid.uuid4().hex, index=0, site="site-a", hyperparameters={},
                 status="pending", metrics={})  # fmt: skip
    run_id = uuid.uuid4().hex
    engine.ledger.create_run(run_id, "live", _plan("site-a"), [hop], None)
    assert not engine.ledger.live_hop_needs("site-a", sha)
    engine.ledger.lease_hop(hop.id, "token", sha)
    assert engine.ledger.live_hop_needs("site-a", sha)
    assert not engine.ledger.live_hop_needs("site-b", sha)
    engine.ledger.transition_run(run_id, expected=("running",), status="aborted")
    assert not engine.ledger.live_hop_needs("site-a", sha)


_IMPORT_PROBE = """
import runpy, sys
module, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["baton", *argv]
try:
    runpy.run_module(module, run_name="__main__" if argv else module)
except SystemExit:
    pass
heavy = {"optuna", "flwr", "torch", "transformers", "peft", "numpy"} & set(sys.modules)
print("heavy:", ",".join(sorted(heavy)))
"""


@pytest.mark.parametrize(
    "command",
    [
        ["coordinator.server"],
        ["coordinator.console.cli"],
        ["coordinator", "coordinator", "serve", "--help"],
    ],
)
def test_serve_path_imports_no_search_or_training_library(command: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *command],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.splitlines()[-1] == "heavy: ", out.stdout


def test_study_commands_still_load_on_demand() -> None:
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, "coordinator", "study", "--help"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "best" in out.stdout and out.stdout.splitlines()[-1] == "heavy: numpy,optuna"
