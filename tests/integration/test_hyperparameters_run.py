"""A plan's hyperparameters reach the site's trainer: plan, coordinator, wire, agent, trainer."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import safetensors.torch
import torch

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from site_agent.registry import load_registered, register_dataset
from site_agent.tasks import TaskSpec, create_trainer
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, wait_for_run


def _write_csv(path: Path) -> None:
    rng = random.Random(5)
    lines = ["age,chol,label"]
    for _ in range(60):
        age, chol = rng.gauss(55, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")


def test_a_plans_schedule_and_trainer_options_shape_the_adapter_the_site_trains(
    pki: Pki, tmp_path: Path
) -> None:
    site = SITES[0]
    _write_csv(tmp_path / "heart.csv")
    register_dataset(tmp_path / site, "heart", tmp_path / "heart.csv", task_type="tabular")
    plan = parse_plan({
        "name": "schedule", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "sites": [site], "options": {"model": "logistic"},
        "defaults": {"steps": 25, "batch_size": 4, "learning_rate": 0.05, "seed": 3,
                     "warmup_steps": 2, "max_grad_norm": 0.5, "weight_decay": 0.01,
                     "lr_schedule": "constant"},
    })  # fmt: skip
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                           data_dir=tmp_path / site, threads=1,
                           approve=[plan.approval_bundle().sha256])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites({site}, timeout=120)
            run = wait_for_run(admin, cluster, admin.start_run(plan))
            assert run.status == "completed", run.error
            trained = safetensors.torch.load(admin.download_final_checkpoint(run.run_id))

    # The same hop trained here, with the plan's hyperparameters and with the other schedule.
    trainer = create_trainer("tabular", base_model_dir=None, device="cpu")
    spec = TaskSpec("tabular", labels=("0", "1"), options={"model": "logistic"})
    dataset = load_registered(tmp_path / site, "heart")
    hyperparameters = plan.defaults
    as_planned = trainer.run_hop(spec, dataset, hyperparameters, None).tensors
    linear = dataclasses.replace(hyperparameters, lr_schedule="linear")
    as_default = trainer.run_hop(spec, dataset, linear, None).tensors
    assert set(trained) == set(as_planned)
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, as_planned[name], rtol=1e-5, atol=1e-6)
    assert any(
        not torch.allclose(trained[name], as_default[name], rtol=1e-3, atol=1e-4)
        for name in trained
    )
