"""Per-fold statistics through real site processes, then a cross-validation run that uses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.statistics import plan_with_normaliser
from protocols.approval import ApprovalBundle
from protocols.statistics import FOLD_NORMALISERS_OPTION
from protocols.v1 import baton_pb2 as pb
from site_agent.examples import TabularExample
from site_agent.registry import RegisteredDataset, load_registered, register_dataset
from site_agent.tasks import CrossValidatedTrainer, TaskSpec, create_trainer
from tests.conftest import SITES, Pki, admin_options
from tests.integration.conftest import (
    Cluster,
    collect_heart_statistics,
    run_when_approved,
    start_tabular_sites,
    write_heart_csv,
)

ROWS = {"site-a": 60, "site-b": 45, "site-c": 40}  # every row is a training row
FOLDS = 3


def _register(data_dir: Path, source: Path) -> RegisteredDataset:
    return register_dataset(data_dir, "heart", source, task_type="tabular", replace=True,
                            validation_fraction=0.0, test_fraction=0.0)  # fmt: skip


def _change_held_out_rows(source: Path, dataset: RegisteredDataset, fold: int) -> int:
    """Scales the features of fold ``fold``'s rows (labels kept, so the folds stay the same)."""
    lines = source.read_text().splitlines()
    ids = dataset.fold_ids(FOLDS)
    for row, fold_id in enumerate(ids):
        if fold_id == fold:
            *features, label = lines[row + 1].split(",")
            lines[row + 1] = ",".join([*(f"{1.5 * float(v):.2f}" for v in features), label])
    source.write_text("\n".join(lines) + "\n")
    return sum(1 for fold_id in ids if fold_id == fold)


def _fold_training_rows(datasets: dict[str, RegisteredDataset], fold: int) -> np.ndarray:
    return np.array([
        row.features for d in datasets.values()
        for row, fold_id in zip(d.train, d.fold_ids(FOLDS), strict=True)
        if fold_id != fold and isinstance(row, TabularExample)
    ])  # fmt: skip


# Slow (~30 s; make test-all): make test keeps a statistics round through real site processes
# (test_statistics_round.py) and per-fold statistics at each end (coordinator_tests and
# site_agent_tests/test_fold_statistics.py).
@pytest.mark.slow
def test_per_fold_statistics_reach_the_cross_validation_run(pki: Pki, tmp_path: Path) -> None:
    datasets: dict[str, RegisteredDataset] = {}
    for index, site in enumerate(SITES):
        write_heart_csv(tmp_path / f"{site}.csv", ROWS[site], seed=index, shift=6 * index)
        datasets[site] = _register(tmp_path / site, tmp_path / f"{site}.csv")
        assert len(datasets[site].train) == ROWS[site]
    bundle = ApprovalBundle.for_statistics("tabular", "heart", min_count=10, noise_std=0.0,
                                           cv_folds=FOLDS).sha256  # fmt: skip

    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = start_tabular_sites(cluster, pki, tmp_path, approve=[bundle])
        tls = pki.tls("admin")
        connection = admin_options(port, tls)
        with AdminClient(f"localhost:{port}", tls) as admin:
            admin.wait_for_sites(set(SITES), timeout=120)

            # 1. Every site releases its split's and each fold's training-part aggregates.
            collected, statistics_id = collect_heart_statistics(
                connection, "--cv-folds", str(FOLDS), "--wait", "120"
            )
            assert collected.exit_code == 0, collected.output
            first = admin.statistics(statistics_id)

            # 2. site-a's fold-1 rows change (re-registered): fold 1's normaliser does not.
            changed = _change_held_out_rows(tmp_path / "site-a.csv", datasets["site-a"], fold=1)
            datasets["site-a"] = _register(tmp_path / "site-a", tmp_path / "site-a.csv")
            second = admin.wait_for_statistics(
                admin.collect_statistics("heart", "tabular", list(SITES), min_count=10,
                                         cv_folds=FOLDS).statistics_id, timeout=120,
            )  # fmt: skip

            # 3. A cross-validation run normalises fold k's model with fold k's normaliser.
            plan = plan_with_normaliser(parse_plan({
                "name": "folds", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
                "sites": list(SITES), "options": {"model": "logistic"},
                "defaults": {"steps": 6, "batch_size": 8, "learning_rate": 0.1},
                "cross_validation": {"folds": FOLDS},
            }), second)  # fmt: skip
            run = run_when_approved(admin, cluster, plan, tmp_path, timeout=180)

    assert "fold 2 normaliser" in collected.output and "3 folds" in collected.output
    assert first.status == "done" and second.status == "done", (first.error, second.error)
    assert changed >= 10
    for fold in second.folds:
        training = _fold_training_rows(datasets, fold.fold)
        assert fold.count == len(training)
        np.testing.assert_allclose(fold.mean, training.mean(axis=0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(fold.std, training.std(axis=0, ddof=1), rtol=0, atol=1e-9)
    assert (first.folds[1].mean, first.folds[1].std) == (second.folds[1].mean,
                                                         second.folds[1].std)  # fmt: skip
    for fold in (0, 2):
        assert first.folds[fold].mean != second.folds[fold].mean
    assert first.mean != second.mean

    assert run.status == "completed", run.error
    config = json.loads((Path(run.final_adapter_dir) / "adapter_config.json").read_text())
    assert config["options"][FOLD_NORMALISERS_OPTION] == [
        {"mean": list(f.mean), "std": list(f.std)} for f in second.folds]  # fmt: skip
    assert config["options"]["mean"] == list(second.mean)
    _assert_last_hop_scored_with_the_fold_normalisers(run, plan.options, tmp_path)


def _assert_last_hop_scored_with_the_fold_normalisers(
    run: pb.RunStatus, options: dict[str, object], tmp_path: Path
) -> None:
    """The last hop's cross-validated loss, reported by its site process, is what its fold
    models score with the fold normalisers, not with the global one."""
    tensors = safetensors.torch.load_file(Path(run.final_adapter_dir) / "adapter_model.safetensors")
    last = run.hops[-1]
    dataset = load_registered(tmp_path / last.site, "heart")
    trainer = CrossValidatedTrainer(create_trainer("tabular", base_model_dir=None, device="cpu"),
                                    FOLDS)  # fmt: skip
    folded = TaskSpec("tabular", labels=("0", "1"), options=dict(options))
    glob = TaskSpec(
        "tabular",
        labels=("0", "1"),
        options={k: v for k, v in options.items() if k != FOLD_NORMALISERS_OPTION},
    )
    reported = last.metrics["loss"]
    assert abs(trainer.evaluate(folded, dataset, "validation", tensors)["loss"] - reported) < 1e-6
    assert abs(trainer.evaluate(glob, dataset, "validation", tensors)["loss"] - reported) > 1e-4
