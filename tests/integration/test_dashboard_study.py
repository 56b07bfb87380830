"""A study started and stopped from the dashboard: a real coordinator, its worker, real sites."""

from __future__ import annotations

import random
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.study_request import StudyRequest, prepare_search
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster

STUDY = {
    "name": "dash-study", "dataset": "heart", "task": "tabular", "labels": ["0", "1"],
    "sites": list(SITES[:2]), "trials": 20, "lr_min": 0.02, "lr_max": 0.2, "steps_min": 2,
    "steps_max": 6, "batch_size": 8, "options": {"model": "logistic"}, "seed": 1,
    "site_timeout": 60, "run_timeout": 120,
}  # fmt: skip


def _write_csv(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(rows):
        age, chol = rng.gauss(55, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")


def _until(condition: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"{what} within {timeout} s")


# Slow (~40 s; make test-all): make test keeps a study worker started and stopped from the
# dashboard (coordinator_tests/test_dashboard_studies.py) and studies' trials as real runs
# (test_study.py).
@pytest.mark.slow
def test_a_study_started_from_the_dashboard_runs_trials_and_stops_as_asked(
    pki: Pki, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    (tmp_path / "pw").write_text("a long enough password\n")
    runner = CliRunner()
    added = runner.invoke(app, ["admin", "add", "ops", "--role", "operator", "--password-file",
                                str(tmp_path / "pw"), "--state-dir", str(state_dir)])  # fmt: skip
    assert added.exit_code == 0, added.output
    token = runner.invoke(app, ["admin", "token", "ops", "--state-dir", str(state_dir)])
    headers = {"Authorization": f"Bearer {token.stdout.strip()}"}
    sites = STUDY["sites"]
    for index, site in enumerate(sites):
        _write_csv(tmp_path / f"{site}.csv", 60, seed=index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular",
                         validation_fraction=0.25, test_fraction=0.0)  # fmt: skip
    bundle = prepare_search(StudyRequest.model_validate(STUDY)).bundle.sha256

    cluster = Cluster(log_dir=tmp_path / "logs")
    cluster.env.update({  # the coordinator's admin identity for its study workers
        "BATON_STUDY_ADMIN_CERTIFICATE": str(pki.directory / "admin.crt"),
        "BATON_STUDY_ADMIN_KEY": str(pki.directory / "admin.key"),
    })  # fmt: skip
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=state_dir,
            pki_dir=pki.directory,
            port_file=tmp_path / "port",
            dashboard_port_file=tmp_path / "dashboard.port",
        )
        for site in sites:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=tmp_path / site, threads=1, approve=[bundle])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
        dashboard = int((tmp_path / "dashboard.port").read_text())
        trust = ssl.create_default_context(cafile=str(pki.directory / "ca.crt"))
        with httpx.Client(base_url=f"https://localhost:{dashboard}", verify=trust,
                          headers=headers, timeout=30) as client:  # fmt: skip
            started = client.post("/api/v1/studies", json=STUDY)
            assert started.status_code == 201, started.text
            assert started.json()["started_by"] == "dashboard:ops"

            def trials() -> list[dict[str, Any]]:
                response = client.get("/api/v1/studies/dash-study")
                return response.json()["trials"] if response.status_code == 200 else []

            _until(lambda: any(t["state"] == "COMPLETE" for t in trials()), "a trial completed")
            # Finish the trial in flight, then stop.
            stop = client.post("/api/v1/studies/dash-study/stop", json={"mode": "finish-trial"})
            assert stop.status_code == 200, stop.text
            assert stop.json()["stopped_by"] == "dashboard:ops"

            def ended() -> list[dict[str, Any]]:
                workers = client.get("/api/v1/studies/dash-study/workers").json()
                return [w for w in workers if w["ended_at"]]

            [worker] = _until(ended, "the worker ended")
            assert worker["status"] == "stopped" and worker["exit_code"] == 0, worker["log_tail"]
            assert "stopped after this trial, as asked" in worker["log_tail"]
            finished = trials()
            assert 1 <= len(finished) < STUDY["trials"]
            assert all(t["state"] == "COMPLETE" for t in finished), finished
            with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
                statuses = {admin.run(t["run_id"]).status for t in finished}
            assert statuses == {"completed"}

            # Started again, the study continues; stopped at once, its trial's run is aborted.
            # site-b is frozen first (still connected, its stream open): the trial's run waits
            # at site-b's hop, as a long hop would, until the stop (tiny tabular runs would
            # otherwise often complete before the stop arrives).
            frozen = cluster.process(sites[1]).process
            frozen.send_signal(signal.SIGSTOP)
            try:
                again = client.post("/api/v1/studies", json=STUDY)
                assert again.status_code == 201, again.text
                with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:

                    def waiting() -> list[Any]:
                        return [r for r in admin.runs() if r.status == "running"]

                    [run] = _until(waiting, "a trial's run waiting for the frozen site")
                    abort = client.post("/api/v1/studies/dash-study/stop",
                                        json={"mode": "abort-trial"})  # fmt: skip
                    assert abort.status_code == 200, abort.text
                    _until(lambda: ended() and len(ended()) == 2, "the second worker ended")
                    aborted = admin.run(run.run_id)
                    [second, _] = ended()
                    assert second["status"] == "stopped" and second["exit_code"] == 130
                    assert "stopped at once, as asked: this trial's run is aborted" in (
                        second["log_tail"])  # fmt: skip
            finally:
                frozen.send_signal(signal.SIGCONT)
            assert aborted.status == "aborted"
            assert "the ordering search stopped this trial" in aborted.error
        events = cluster.process("coordinator").log_tail()
    assert "study dash-study started by dashboard:ops" in events
