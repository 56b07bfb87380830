"""A tabular run (the FLamby-style task) through real site processes with registered CSV data."""

from __future__ import annotations

import random
from pathlib import Path

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_run


def _write_csv(path: Path, seed: int, shift: float) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(80):
        age, chol = rng.gauss(55 + shift, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")


def test_tabular_logistic_model_travels_between_sites_without_a_base_model(
    pki: Pki, tmp_path: Path
) -> None:
    sites = list(SITES[:2])
    for index, site in enumerate(sites):
        _write_csv(tmp_path / f"{site}.csv", seed=index, shift=5 * index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular")
    plan = parse_plan({
        "name": "tabular", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "sites": sites, "cycles": 2, "options": {"model": "logistic"},
        "defaults": {"steps": 30, "batch_size": 4, "learning_rate": 0.05},
    })  # fmt: skip
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        for site in sites:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=tmp_path / site, threads=1,
                               approve=[plan.approval_bundle().sha256])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
            admin.evaluate_run(run.run_id, "test")
            evaluated = admin.wait_for_evaluations(run.run_id, timeout=60)
    assert run.status == "completed", run.error
    assert [h.status for h in run.hops] == ["committed"] * 4
    for evaluation in evaluated.evaluations:
        assert evaluation.status == "done", evaluation.error
        assert {"accuracy", "auroc", "examples"} <= set(evaluation.metrics)
        assert evaluation.metrics["accuracy"] > 0.6
