"""Searches with real site processes: k-fold CV trials and the final run; a coordinator restart."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import optuna
import pytest

from coordinator.console.admin import AdminClient
from coordinator.console.study import (
    RunExecutor,
    RunTemplate,
    approval_bounds,
    attach_run_template,
    plan_from_study,
    run_search,
    study_storage_url,
    trial_run_ids,
)
from ordering import FloatRange, OrderingStudy, SearchSpace, TrialRecord
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster, start_tabular_sites, wait_for_run

FOLDS = 4
SIZES = {SITES[0]: 90, SITES[1]: 60, SITES[2]: 24}  # the last one is Switzerland-small


def _write_csv(path: Path, rows: int, seed: int, shift: float) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(rows):
        age, chol = rng.gauss(55 + shift, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")


def _cv_search() -> tuple[SearchSpace, RunTemplate]:
    space = SearchSpace(
        sites=SITES, learning_rate=FloatRange(0.01, 0.1, log=True), epochs=1, batch_size=4
    )
    template = RunTemplate(
        dataset="heart",
        labels=("0", "1"),
        task="tabular",
        options={"model": "logistic"},
        bounds=approval_bounds(space),
        cross_validation={"folds": FOLDS, "min_validation_rows": 0},
    )
    return space, template


def _restart_search() -> tuple[SearchSpace, RunTemplate]:
    space = SearchSpace(sites=SITES, learning_rate=FloatRange(0.01, 0.1, log=True), steps=400,
                        batch_size=4)  # fmt: skip
    template = RunTemplate(
        dataset="heart-restart", labels=("0", "1"), task="tabular", options={"model": "logistic"},
        bounds=approval_bounds(space),
    )  # fmt: skip
    return space, template


@dataclass
class Served:
    cluster: Cluster
    port: int
    state: Path


@pytest.fixture(scope="module")
def served(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One coordinator and three site processes for both tests (the restart test kills and
    restarts the coordinator on the same port and state; the sites reconnect). Each site holds
    both tests' datasets and approves both searches' bundles and the final run's."""
    tmp_path = tmp_path_factory.mktemp("cv-study")
    for index, site in enumerate(SITES):
        _write_csv(tmp_path / f"{site}.csv", SIZES[site], seed=index, shift=4 * index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular",
                         validation_fraction=0.0, test_fraction=0.25)  # fmt: skip
        _write_csv(tmp_path / f"{site}-restart.csv", 60, seed=index, shift=4 * index)
        register_dataset(tmp_path / site, "heart-restart", tmp_path / f"{site}-restart.csv",
                         task_type="tabular", validation_fraction=0.25,
                         test_fraction=0.25)  # fmt: skip
    cv_space, cv_template = _cv_search()
    restart_space, restart_template = _restart_search()
    approve = [
        cv_template.approval_bundle(cv_space.plan(SITES)).sha256,
        cv_template.run_plan(cv_space.plan(SITES), final=True).approval_bundle().sha256,
        restart_template.approval_bundle(restart_space.plan(SITES)).sha256,
    ]
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = start_tabular_sites(cluster, pki, tmp_path, approve=approve)
        yield Served(cluster, port, tmp_path / "coordinator")


def test_trials_are_scored_by_fold_models_and_the_final_run_is_ordinary(
    pki: Pki, tmp_path: Path, served: Served
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sites = tuple(SITES)
    space, template = _cv_search()
    search_bundle = template.approval_bundle(space.plan(sites))
    final_bundle = template.run_plan(space.plan(sites), final=True).approval_bundle()
    assert search_bundle.cross_validation == {"folds": FOLDS, "min_validation_rows": 0}
    assert not final_bundle.cross_validation and final_bundle.sha256 != search_bundle.sha256
    storage = f"sqlite:///{tmp_path / 'studies.sqlite3'}"
    study = OrderingStudy.create(storage, "cv", space, "lehmer", seed=1)
    attach_run_template(study, template)

    cluster = served.cluster
    with AdminClient(f"localhost:{served.port}", pki.tls("admin")) as admin:
        admin.wait_for_sites(set(sites), timeout=120)
        executor = RunExecutor(admin, template, poll_seconds=0.1, run_timeout=120)
        records = run_search(study, executor, 2)
        trial_runs = {run.run_id: admin.run(run.run_id) for run in executor.runs}
        cv_run = next(iter(trial_runs.values()))
        with pytest.raises(grpc.RpcError) as refused:
            admin.evaluate_run(cv_run.run_id, "test")
        final_plan = plan_from_study(storage, "cv")
        final = wait_for_run(admin, cluster, admin.start_run(final_plan))
        admin.evaluate_run(final.run_id, "test")
        final = admin.wait_for_evaluations(final.run_id, timeout=60)

    assert [r.state for r in records] == ["COMPLETE"] * 2, [r.error for r in records]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cross-validation run" in (refused.value.details() or "")
    links = trial_run_ids(study)
    for record in records:
        run = trial_runs[links[("cv", record.number)]]
        assert run.status == "completed", run.error
        assert run.approval_bundle_sha256 == search_bundle.sha256
        # Every hop reported its site's cross-validated score of the fold models it trained.
        for hop in run.hops:
            assert hop.metrics["folds"] == FOLDS
            assert hop.metrics["examples"] == hop.metrics["train_examples"]
        # The trial's site scores are the sites' CV scores; the ledger keeps every fold's.
        scored = [e for e in run.evaluations if e.checkpoint_sha256 == run.final_sha256]
        assert sorted(e.site for e in scored) == sorted(sites)
        for evaluation in scored:
            assert evaluation.split == "validation" and evaluation.status == "done"
            assert evaluation.metrics["folds"] == FOLDS
            assert {f"fold{f}.accuracy" for f in range(FOLDS)} <= set(evaluation.metrics)
        assert {s.site: s.folds for s in record.site_scores} == dict.fromkeys(sites, FOLDS)
        trained_rows = {e.site: e.metrics["examples"] for e in scored}
        assert {s.site: s.examples for s in record.site_scores} == trained_rows
    # The chosen plan ran once more as an ordinary run: one model, scored on test.
    assert final.status == "completed", final.error
    assert final.approval_bundle_sha256 == final_bundle.sha256
    assert all("folds" not in hop.metrics for hop in final.hops)
    tests = [e for e in final.evaluations if e.split == "test"]
    assert sorted(e.site for e in tests) == sorted(sites)
    assert all(e.status == "done" and "fold0.accuracy" not in e.metrics for e in tests)


def test_a_study_survives_a_coordinator_restart_in_the_middle_of_a_trial(
    pki: Pki, served: Served
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sites = tuple(SITES)
    space, template = _restart_search()
    # The study lives beside the coordinator's ledger, as `baton study start` keeps it.
    storage = study_storage_url(f"sqlite:///{served.state / 'ledger.sqlite3'}")
    study = OrderingStudy.create(storage, "restart", space, "lehmer", seed=2)
    attach_run_template(study, template)
    cluster, port, state = served.cluster, served.port, served.state
    records: list[TrialRecord] = []
    with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
        admin.wait_for_sites(set(sites), timeout=120)
        executor = RunExecutor(admin, template, poll_seconds=0.1, run_timeout=300,
                               reconnect_seconds=120)  # fmt: skip
        search = threading.Thread(
            target=lambda: records.extend(run_search(study, executor, 2)), daemon=True
        )
        search.start()
        deadline = time.monotonic() + 120
        while not executor.runs or admin.run(executor.runs[0].run_id).hops[1].status not in (
            "leased",
            "training",
            "uploaded",
            "committed",
        ):
            assert time.monotonic() < deadline, "the first trial's run did not start"
            time.sleep(0.05)
        cluster.process("coordinator").kill()
        time.sleep(1.0)
        cluster.start_coordinator(state_dir=state, pki_dir=pki.directory,
                                  port_file=state.parent / "port", port=port)  # fmt: skip
        search.join(timeout=300)
        assert not search.is_alive()
        runs = [admin.run(run.run_id) for run in executor.runs]

    assert [r.state for r in records] == ["COMPLETE"] * 2, [r.error for r in records]
    assert all(run.status == "completed" for run in runs)
    # The study, reopened from the coordinator's database, holds both trials and their runs.
    reopened = OrderingStudy.load(storage, "restart")
    assert [r.state for r in reopened.history()] == ["COMPLETE"] * 2
    assert set(trial_run_ids(reopened).values()) == {run.run_id for run in runs}
