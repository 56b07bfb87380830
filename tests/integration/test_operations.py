"""Day-2 operations through real processes: metrics, health endpoints, JSON logs, SIGTERM."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from coordinator.console.admin import AdminClient
from coordinator.plan import RunPlan, parse_plan
from protocols.transport import secure_channel
from protocols.v1 import baton_pb2 as pb
from site_agent._synthetic import SYNTHETIC_LABELS
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_hop, wait_for_run


def _write_csv(path: Path, seed: int, rows: int = 80) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(rows):
        age, chol = rng.gauss(55, 8), rng.gauss(230, 40)
        lines.append(f"{age:.1f},{chol:.1f},{int(age + rng.gauss(0, 5) > 55)}")
    path.write_text("\n".join(lines) + "\n")


def _tabular_plan(tmp_path: Path, sites: list[str], steps: int, cycles: int = 2) -> RunPlan:
    for index, site in enumerate(sites):
        _write_csv(tmp_path / f"{site}.csv", seed=index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular")
    return parse_plan({
        "name": "ops", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "sites": sites, "cycles": cycles, "options": {"model": "logistic"},
        "defaults": {"steps": steps, "batch_size": 4, "learning_rate": 0.05},
        "failure": {"retry_backoff_seconds": 0},
    })  # fmt: skip


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@dataclass(frozen=True)
class _FinishedRun:
    """What `finished_run` saw: a tabular run's results, metrics and health, then a SIGTERM to
    its coordinator."""

    tmp: Path
    run: pb.RunStatus
    checks: dict[str, int]
    coordinator_metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    site_metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    healthz: tuple[int, str]
    readyz: tuple[int, str]
    unknown_path: int
    sigterm_exit: int
    coordinator_log: str
    verify: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def finished_run(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> _FinishedRun:
    """One real tabular run (two sites, JSON logs, metrics ports) read by the two tests below:
    its metrics, health and logs, then the coordinator's exit on SIGTERM and `ledger verify`.
    One run instead of one per test: a coordinator, a site and a run fewer."""
    tmp_path = tmp_path_factory.mktemp("operations")
    sites = list(SITES[:2])
    plan = _tabular_plan(tmp_path, sites, steps=30)
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory,
            port_file=tmp_path / "port",
            extra=["--metrics-port", "0", "--metrics-port-file", str(tmp_path / "mport"),
                   "--log-format", "json", "--shutdown-grace", "1"],
        )  # fmt: skip
        http = f"http://localhost:{int((tmp_path / 'mport').read_text())}"
        for site in sites:
            port_file = str(tmp_path / f"{site}.mport")
            metrics = ["--metrics-port", "0", "--metrics-port-file", port_file]
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=tmp_path / site, threads=1,
                               approve=[plan.approval_bundle().sha256],
                               extra=["--log-format", "json", *metrics])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
            with secure_channel(f"localhost:{port}", pki.tls("admin")) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                checks = {
                    service: health.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=10
                    ).status
                    for service in ("", "baton.v1.SiteService", "baton.v1.AdminService")
                }
        coordinator_metrics = _samples(_get(f"{http}/metrics")[1])
        site_metrics = _samples(
            _get(f"http://localhost:{(tmp_path / f'{sites[0]}.mport').read_text()}/metrics")[1]
        )
        healthz, readyz = _get(f"{http}/healthz"), _get(f"{http}/readyz")
        unknown_path = _get(f"{http}/nothing")[0]
        # Then SIGTERM, its sites still connected.
        coordinator = cluster.process("coordinator")
        coordinator.process.send_signal(signal.SIGTERM)
        sigterm_exit = coordinator.process.wait(30)
        coordinator_log = coordinator.log_tail()
    verify = subprocess.run(
        [sys.executable, "-m", "coordinator", "ledger", "verify",
         "--state-dir", str(tmp_path / "coordinator")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return _FinishedRun(tmp_path, run, checks, coordinator_metrics, site_metrics, healthz,
                        readyz, unknown_path, sigterm_exit, coordinator_log, verify)  # fmt: skip


def test_metrics_health_and_json_logs_after_a_real_tabular_run(finished_run: _FinishedRun) -> None:
    tmp_path, run, checks = finished_run.tmp, finished_run.run, finished_run.checks
    assert run.status == "completed", run.error
    assert finished_run.unknown_path == 404
    assert checks == dict.fromkeys(checks, health_pb2.HealthCheckResponse.SERVING)
    assert (finished_run.healthz, finished_run.readyz) == ((200, "ok\n"), (200, "ready\n"))

    m = finished_run.coordinator_metrics
    assert m[("baton_hops_total", (("status", "committed"),))] == 4
    assert m[("baton_hops_total", (("status", "failed"),))] == 0
    assert m[("baton_handoff_seconds_count", ())] == 3
    assert m[("baton_hop_phase_seconds_count", (("phase", "training"),))] == 4
    assert m[("baton_hop_phase_seconds_count", (("phase", "committing"),))] == 4
    assert m[("baton_checkpoint_bytes_total", (("direction", "upload"),))] > 0
    assert m[("baton_checkpoint_bytes_total", (("direction", "download"),))] > 0
    assert m[("baton_lease_expiries_total", ())] == 0
    assert m[("baton_connected_sites", ())] == 2
    assert ("baton_refusals_total", (("reason", "permission_denied"),)) in m
    labels = {value for _, pairs in m for _, value in pairs}
    assert run.run_id not in labels and not any(h.hop_id in labels for h in run.hops)

    s = finished_run.site_metrics
    assert s[("baton_site_hops_total", (("status", "trained"),))] == 2
    assert s[("baton_site_training_seconds_count", ())] == 2
    assert s[("baton_site_checkpoint_bytes_total", (("direction", "upload"),))] > 0
    assert s[("baton_site_checkpoint_bytes_total", (("direction", "download"),))] > 0

    for log in [*(tmp_path / "logs").glob("site-*.log"), tmp_path / "logs/coordinator.0.log"]:
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records), (
            log
        )
    site_records = [json.loads(line) for line in (tmp_path / "logs/site-a.0.log").open()]
    hop_records = [r for r in site_records if r.get("hop_id")]
    assert {r["run_id"] for r in hop_records} == {run.run_id}
    assert {r["site"] for r in hop_records} == {"site-a"}
    coordinator_records = [
        json.loads(line) for line in (tmp_path / "logs/coordinator.0.log").open()
    ]
    assert any(r.get("hop_id") and r.get("site") for r in coordinator_records)


def test_sigterm_stops_the_coordinator_with_exit_0_and_a_verifying_ledger(
    finished_run: _FinishedRun,
) -> None:
    assert finished_run.run.status == "completed", finished_run.run.error
    assert finished_run.sigterm_exit == 0, finished_run.coordinator_log
    assert finished_run.verify.returncode == 0, finished_run.verify.stderr
    assert "ledger verifies" in finished_run.verify.stdout


def test_sigterm_mid_hop_hands_the_hop_back_and_the_run_continues_when_the_site_returns(
    pki: Pki, tmp_path: Path
) -> None:
    sites = [SITES[0]]
    plan = _tabular_plan(tmp_path, sites, steps=3000, cycles=1)
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )

        def start(site: str) -> None:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=tmp_path / site, threads=1,
                               approve=[plan.approval_bundle().sha256],
                               extra=["--shutdown-grace", "0"])  # fmt: skip

        for site in sites:
            start(site)
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            run_id = admin.start_run(plan)
            wait_for_hop(admin, run_id, 0, "training")
            first = cluster.process(sites[0])
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(60) == 0, first.log_tail()
            released = admin.run(run_id)
            start(sites[0])
            run = wait_for_run(admin, cluster, run_id)
    assert released.hops[0].status == "pending"
    assert run.status == "completed", run.error
    assert [h.status for h in run.hops] == ["committed"]
    ledger = subprocess.run(
        [sys.executable, "-m", "coordinator", "ledger", "export", "--out", "-",
         "--state-dir", str(tmp_path / "coordinator")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    events = [json.loads(line) for line in ledger.splitlines()]
    hop0 = [e for e in events if e["hop_id"] == run.hops[0].hop_id]
    kinds = [e["kind"] for e in hop0]
    assert "hop.released" in kinds and "hop.retry" not in kinds and "hop.failed" not in kinds
    release = next(e for e in hop0 if e["kind"] == "hop.released")
    assert release["site"] == sites[0] and release["payload"]["attempts"] == 0
    assert [e["payload"]["attempts"] for e in hop0 if e["kind"] == "hop.leased"] == [1, 1]


def test_a_lora_site_logs_only_json_lines_without_load_reports_or_progress_bars(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    site = SITES[0]
    plan = parse_plan({
        "name": "json-logs", "dataset": "notes", "labels": list(SYNTHETIC_LABELS),
        "sites": [site], "defaults": {"steps": 2, "batch_size": 8, "learning_rate": 1e-2},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    })  # fmt: skip
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        # A classification head on a bare encoder is where transformers reports newly
        # initialized weights (once per model load, i.e. at the first hop).
        cluster.env = {"BATON_SITE_LOG_FORMAT": "json"}  # the environment, not the flag
        cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                           data_dir=site_data[site], base_model_dir=base_model, threads=1,
                           approve=[plan.approval_bundle().sha256])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites({site}, timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
    assert run.status == "completed", run.error
    text = (tmp_path / "logs" / f"{site}.0.log").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert any(r.get("hop_id") == run.hops[0].hop_id for r in records)
    assert "\r" not in text and "LOAD REPORT" not in text and "initialized" not in text


def test_sigterm_mid_hop_within_the_grace_period_lets_the_hop_finish_and_commit(
    pki: Pki, tmp_path: Path
) -> None:
    sites = [SITES[0]]
    plan = _tabular_plan(tmp_path, sites, steps=4000, cycles=1)
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        site = cluster.start_site(sites[0], coordinator=f"localhost:{port}",
                                  pki_dir=pki.directory, data_dir=tmp_path / sites[0], threads=1,
                                  approve=[plan.approval_bundle().sha256],
                                  extra=["--shutdown-grace", "600"])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            run_id = admin.start_run(plan)
            wait_for_hop(admin, run_id, 0, "training")
            site.process.send_signal(signal.SIGTERM)
            assert site.process.wait(120) == 0, site.log_tail()
            run = admin.run(run_id)
    assert run.status == "completed", run.error
    assert run.hops[0].status == "committed"
    assert "the current task may finish within 600 s" in site.log_path.read_text()
