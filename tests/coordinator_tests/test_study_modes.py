"""A study over run modes: its trials as run plans, its approval preflight and its status."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from coordinator.approval_reports import report_approvals, site_approvals
from coordinator.console._options import console
from coordinator.console.study import attach_run_template, plan_from_study
from coordinator.console.study_cli import study_app
from coordinator.plan import RunPlan
from coordinator.preflight import SiteApprovals, SiteView
from coordinator.study_request import (
    PreparedSearch,
    StudyRequest,
    StudyRequestError,
    prepare_search,
)
from ordering import (
    CandidatePlan,
    ModeSearchSpace,
    OrderingStudy,
    RandomKeys,
    SiteScore,
    TrialOutcome,
)
from protocols.approval import ApprovalRule
from protocols.v1 import baton_pb2 as pb

SITES = ["north", "south", "east", "west"]


def _request(**overrides: object) -> StudyRequest:
    fields: dict[str, object] = {
        "name": "modes",
        "dataset": "heart",
        "sites": SITES,
        "labels": ["0", "1"],
        "task": "tabular",
        "options": {"model": "logistic"},
        "cycles": 2,
        "lr_min": 0.01,
        "lr_max": 0.1,
        "steps_min": 4,
        "steps_max": 12,
        "modes": ["sequential", "federated", "hybrid"],
        "strategies": ["fedavg", "fedprox"],
        "rounds_min": 1,
        "rounds_max": 3,
        "max_groups": 3,
    }
    return StudyRequest.model_validate(fields | overrides)


def _trial_plans(prepared: PreparedSearch, n: int = 30) -> list[tuple[CandidatePlan, RunPlan]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert isinstance(prepared.space, ModeSearchSpace)
    plans = []
    for _ in range(n):
        trial = study.ask()
        plan = prepared.space.suggest_plan(trial, RandomKeys())
        plans.append((plan, prepared.template.run_plan(plan, name="trial")))
        study.tell(trial, 0.0)
    return plans


def test_every_trial_becomes_a_run_plan_of_its_mode_that_the_coordinator_accepts() -> None:
    prepared = prepare_search(_request())
    seen = set()
    for plan, run_plan in _trial_plans(prepared):
        seen.add(plan.mode)
        assert run_plan.mode == plan.mode
        bundle = run_plan.approval_bundle()
        assert bundle.mode == plan.mode
        if plan.federation is None:
            assert [site for site, _ in run_plan.expanded_hops()] == [h.site for h in plan.hops]
            continue
        assert run_plan.federated is not None
        assert (
            run_plan.federated.strategy == plan.federation.strategy == bundle.federation["strategy"]
        )
        assert run_plan.federated.rounds == plan.federation.rounds
        assert run_plan.round_hyperparameters().steps == plan.federation.local_steps
        if plan.mode == "hybrid":
            chains = [chain for _, chain in run_plan.round_members()]
            assert chains == list(plan.federation.groups)
            assert sorted(site for chain in chains for site in chain) == sorted(SITES)
        else:
            assert list(run_plan.sites) == SITES
    assert seen == {"sequential", "federated", "hybrid"}


def test_a_probe_budget_shortens_a_federated_trials_rounds() -> None:
    prepared = prepare_search(_request())
    plan = next(plan for plan, _ in _trial_plans(prepared) if plan.federation is not None)
    assert plan.federation is not None
    half = prepared.template.run_plan(plan, budget=0.5)
    assert half.round_hyperparameters().steps == max(1, round(plan.federation.local_steps / 2))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cv_folds": 3}, "cv-folds: cross-validation runs are sequential"),
        ({"modes": ["federated"], "seed_orders": "sizes"}, "seed-orders: seeds are sequential"),
        ({"rounds_min": 4, "rounds_max": 2}, "rounds-min: 4 is above rounds-max 2"),
        ({"max_groups": 4}, "max_groups: must be within 2..3 for 4 sites, got 4"),
    ],
)
def test_a_mode_study_that_cannot_run_is_refused_before_any_run(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(StudyRequestError) as caught:
        prepare_search(_request(**overrides))
    assert message in str(caught.value)


def test_a_bad_mode_name_is_refused_by_the_request() -> None:
    with pytest.raises(ValueError, match=r"modes\.1"):
        _request(modes=["sequential", "gossip"])


def _rule(**fields: object) -> ApprovalRule:
    base: dict[str, object] = {
        "task_types": frozenset({"tabular"}),
        "datasets": frozenset({"heart"}),
        "base_models": frozenset({"*"}),
    }
    return ApprovalRule(**(base | fields))  # type: ignore[arg-type]


def test_preflight_names_each_site_and_mode_its_approval_policy_refuses() -> None:
    prepared = prepare_search(_request())
    approvals: dict[str, SiteApprovals | None] = {
        # Approves sequential and federated FedAvg only.
        "north": SiteApprovals(
            by_policy=True,
            rules=(
                _rule(
                    modes=frozenset({"sequential", "federated"}), strategies=frozenset({"fedavg"})
                ),
            ),
        ),
        "south": SiteApprovals(not_required=True),
        "east": None,  # not reported: only the site can tell
        # Approves every mode and strategy, but the learning rate only up to 0.05.
        "west": SiteApprovals(
            by_policy=True,
            rules=(_rule(modes=frozenset({"*"}), max_values={"learning_rate": 0.05}),),
        ),
    }
    problems = prepared.approval_refusals(approvals)
    refused = [(line.split(":")[0], line.split(" runs")[0].split("allow ")[1]) for line in problems]
    assert refused == [
        ("north", "federated (fedprox)"),
        ("north", "hybrid (fedavg)"),
        ("north", "hybrid (fedprox)"),
        ("west", "sequential"),
        ("west", "federated (fedavg)"),
        ("west", "federated (fedprox)"),
        ("west", "hybrid (fedavg)"),
        ("west", "hybrid (fedprox)"),
    ]
    assert problems[1] == (
        "north: its approvals do not allow hybrid (fedavg) runs of dataset 'heart' (tabular) "
        "within the study's bounds: leave hybrid out of --modes (or that strategy out of "
        "--strategies), or have the site allow them (an approval policy rule with modes = "
        '["hybrid"], strategies = ["fedavg"])'
    )
    allowed = {"north": SiteApprovals(by_policy=True, rules=(_rule(modes=frozenset({"*"})),))}
    assert prepared.approval_refusals(allowed) == []


def test_list_sites_carries_what_a_site_reported_about_its_approvals() -> None:
    approvals = SiteApprovals(
        bundles=frozenset({"ab" * 32}),
        by_policy=True,
        rules=(
            _rule(
                modes=frozenset({"federated"}),
                strategies=frozenset({"fedprox"}),
                max_values={"steps": 50.0},
            ),
        ),
    )
    report = pb.SiteApprovalReport()
    report_approvals(report, SiteView(name="north", connected=True, approvals=approvals))
    wire = pb.SiteApprovalReport.FromString(report.SerializeToString())
    assert site_approvals(wire) == approvals
    unreported = pb.SiteApprovalReport()
    report_approvals(unreported, SiteView(name="north", connected=True))
    assert site_approvals(unreported) is None


def test_study_status_shows_each_trials_mode_and_grouping_and_the_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "width", 300)  # one line per trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'studies.sqlite3'}"
    prepared = prepare_search(_request())
    study = OrderingStudy.create(storage, "modes", prepared.space, seed=2)

    class Scores:
        def execute(
            self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
        ) -> TrialOutcome:
            value = {"sequential": 0.6, "federated": 0.7, "hybrid": 0.8}[plan.mode]
            return TrialOutcome(tuple(SiteScore(s, value, 10) for s in plan.sites), {})

    records = study.optimize(Scores(), 10)
    status = CliRunner().invoke(study_app, ["status", "modes", "--storage", storage])
    assert status.exit_code == 0, status.output
    text = " ".join(status.output.split())
    for record in records:
        assert record.plan is not None
        if record.plan.federation is None:
            continue
        federation = record.plan.federation
        groups = f" {len(federation.groups)} groups" if federation.groups else ""
        assert f"{federation.mode} {federation.strategy}{groups}" in text
    best = study.best_plan()
    assert best.mode == "hybrid"
    assert f"best (hybrid): {best.describe()}" in " ".join(status.output.split())
    # `baton study best` / `baton run start --from-study`: the best trial's hybrid run plan.
    attach_run_template(study, prepared.template)
    plan = plan_from_study(storage, "modes")
    assert best.federation is not None and plan.mode == "hybrid"
    assert [chain for _, chain in plan.round_members()] == list(best.federation.groups)


def test_a_federated_run_in_the_ledger_is_never_warm_started_as_a_sequential_trial() -> None:
    from coordinator.console.study._seeds import _NotAPrior, _prior_of

    prepared = prepare_search(_request())
    one_round = next(
        plan
        for plan, run_plan in _trial_plans(prepared)
        if plan.mode == "federated" and run_plan.federated and run_plan.federated.rounds == 1
    )
    run_plan = prepared.template.run_plan(one_round, name="earlier")
    # One round of every site: its hops look like one sequential cycle.
    run = pb.RunStatus(run_id="r1", status="completed", plan_json=run_plan.to_json())
    for index, (site, _) in enumerate(run_plan.expanded_hops()):
        run.hops.add(index=index, site=site, status="committed")
    study = OrderingStudy.create(None, "warm", prepared.space, seed=0)
    reference = prepared.template.run_plan(prepared.space.plan(tuple(SITES)))
    with pytest.raises(_NotAPrior, match="it is a federated run"):
        _prior_of(run, study, prepared.template, reference)


def test_a_study_without_sequential_trials_preflights_its_first_federated_plan() -> None:
    prepared = prepare_search(_request(modes=["federated"], strategies=["fedavg", "fedyogi"]))
    assert prepared.first_plan.mode == "federated"
    assert list(prepared.mode_bundles) == ["federated (fedavg)", "federated (fedyogi)"]
    assert prepared.bundle == prepared.mode_bundles["federated (fedavg)"]
    assert prepared.mode_bundles["federated (fedyogi)"].federation["strategy"] == "fedyogi"
