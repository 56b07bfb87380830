"""A small real search: every trial is a run of site processes over mTLS, tiny model.

Two LoRA sites: the search still orders them (either way round), each trial's run chains two
hops and is scored at both; a third site would add a LoRA site start (~10 CPU s), a hop and an
evaluation per trial.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import optuna

from coordinator.console.admin import AdminClient
from coordinator.console.study import (
    RunExecutor,
    RunTemplate,
    approval_bounds,
    attach_run_template,
    plan_from_study,
    run_search,
    trial_run_ids,
)
from ordering import FloatRange, IntRange, OrderingStudy, SearchSpace
from site_agent._synthetic import SYNTHETIC_LABELS
from site_agent.tasks import hash_base_model
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster


def test_search_trials_are_real_runs_and_the_best_plan_becomes_a_run_plan(
    pki: Pki, tmp_path: Path, base_model: Path, site_data: dict[str, Path]
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'studies.sqlite3'}"
    sites = SITES[:2]
    space = SearchSpace(
        sites=sites,
        learning_rate=FloatRange(1e-3, 3e-2, log=True),
        steps=IntRange(2, 4),
        batch_size=8,
    )
    template = RunTemplate(
        dataset="notes",
        labels=tuple(SYNTHETIC_LABELS),
        base_model_sha256=hash_base_model(base_model),
        lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        bounds=approval_bounds(space),
    )
    # The sites approve the study once: every trial's run carries the same bundle.
    bundle = template.approval_bundle(space.plan(sites)).sha256
    study = OrderingStudy.create(storage, "integration", space, "lehmer", seed=3)
    attach_run_template(study, template)

    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=tmp_path / "coordinator", pki_dir=pki.directory,
            port_file=tmp_path / "port",
        )  # fmt: skip
        for site in sites:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=site_data[site], base_model_dir=base_model,
                               threads=1, approve=[bundle])  # fmt: skip
        with AdminClient(f"localhost:{port}", pki.tls("admin")) as admin:
            admin.wait_for_sites(set(sites), timeout=120)
            executor = RunExecutor(admin, template, poll_seconds=0.1, run_timeout=120)
            records = run_search(study, executor, 3)
            runs = {run.run_id: admin.run(run.run_id) for run in executor.runs}

    assert [record.state for record in records] == ["COMPLETE"] * 3, [r.error for r in records]
    links = trial_run_ids(study)
    for record in records:
        if record.duplicate_of is not None:
            continue
        run = runs[links[("integration", record.number)]]
        assert run.status == "completed", run.error
        assert record.plan is not None
        # The run trained the trial's plan: its order and hyperparameters.
        assert [hop.site for hop in run.hops] == list(record.plan.order)
        assert all(hop.train_finished_at_ns > hop.train_started_at_ns > 0 for hop in run.hops)
        assert record.compute_seconds > 0
        # Scored on every site's validation split, never on a test split.
        validation = [e for e in run.evaluations if e.checkpoint_sha256 == run.final_sha256]
        assert sorted(e.site for e in validation) == sorted(sites)
        assert {e.split for e in run.evaluations} == {"validation"}
        assert record.value == statistics.fmean(e.metrics["accuracy"] for e in validation)
        assert record.intermediate and record.intermediate[0][0] == 0

    plan = plan_from_study(storage, "integration")
    best = study.best_plan()
    assert [site for site, _ in plan.expanded_hops()] == list(best.order)
    assert [hp.steps for _, hp in plan.expanded_hops()] == [
        hop.hyperparameters.steps for hop in best.hops
    ]
    assert plan.base_model_sha256 == template.base_model_sha256
