"""The search over run modes: sequential schedules, federated rounds and hybrid groupings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from ordering import (
    CandidatePlan,
    Federation,
    FloatRange,
    IntRange,
    LehmerCode,
    ModeSearchSpace,
    OrderingStudy,
    RandomKeys,
    SearchSpace,
    SearchSpaceError,
    SiteScore,
    TrialOutcome,
    balanced_groups,
)

SITES = ("a", "b", "c", "d", "e")


def _space(**overrides: object) -> ModeSearchSpace:
    fields: dict[str, object] = {
        "sites": SITES,
        "cycles": 2,
        "learning_rate": FloatRange(1e-3, 1e-1, log=True),
        "steps": IntRange(5, 20),
        "modes": ("sequential", "federated", "hybrid"),
        "strategies": ("fedavg", "fedprox", "fedyogi"),
        "rounds": IntRange(1, 4),
        "max_groups": 3,
        "fedprox_mu": FloatRange(1e-3, 1.0, log=True),
    }
    return ModeSearchSpace(**(fields | overrides))  # type: ignore[arg-type]


def _sample(space: ModeSearchSpace, seed: int, n: int = 40) -> list[CandidatePlan]:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
    plans = []
    for _ in range(n):
        trial = study.ask()
        plan = space.suggest_plan(trial, RandomKeys())
        plans.append(plan)
        study.tell(trial, len(plan.describe()) % 7)
    return plans


def test_hybrid_trials_partition_the_sites_into_groups_each_site_exactly_once() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hybrids = [plan for plan in _sample(_space(), seed=1) if plan.mode == "hybrid"]
    assert hybrids
    for plan in hybrids:
        assert plan.federation is not None
        groups = plan.federation.groups
        assert 2 <= len(groups) <= 3
        assert Counter(site for group in groups for site in group) == Counter(SITES)
        sizes = [len(group) for group in groups]
        assert max(sizes) - min(sizes) <= 1
        # Every round trains every site once, in chain order.
        assert [hop.site for hop in plan.hops] == [s for g in groups for s in g] * plan.cycles


def test_trials_only_take_the_modes_and_strategies_the_space_allows() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = _space(modes=("federated", "hybrid"), strategies=("fedprox",))
    plans = _sample(space, seed=2)
    assert {plan.mode for plan in plans} == {"federated", "hybrid"}
    assert {plan.federation.strategy for plan in plans if plan.federation} == {"fedprox"}
    assert all(plan.federation and plan.federation.proximal_mu > 0 for plan in plans)
    every = {plan.mode for plan in _sample(_space(), seed=3)}
    assert every == {"sequential", "federated", "hybrid"}


def test_the_same_seed_proposes_the_same_plans() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert _sample(_space(), seed=7) == _sample(_space(), seed=7)
    assert _sample(_space(), seed=7) != _sample(_space(), seed=8)


def test_every_mode_trains_each_site_for_the_same_total_steps() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    space = _space()
    for _ in range(40):
        trial = study.ask()
        plan = space.suggest_plan(trial, LehmerCode())
        total = trial.params["steps"] * 2  # steps per visit x 2 cycles
        for site in SITES:
            trained = sum(hop.hyperparameters.steps for hop in plan.hops if hop.site == site)
            if plan.federation is None:
                assert trained == total
            else:  # ceil(total / rounds) per round: at most rounds - 1 steps over
                assert total <= trained < total + plan.federation.rounds
        study.tell(trial, 0.0)


def test_balanced_groups_cut_an_order_into_consecutive_chains() -> None:
    assert balanced_groups(["a", "b", "c", "d", "e"], 2) == (("a", "b", "c"), ("d", "e"))
    assert balanced_groups(["a", "b", "c"], 3) == (("a",), ("b",), ("c",))
    with pytest.raises(ValueError, match="cannot cut 3 sites into 4 groups"):
        balanced_groups(["a", "b", "c"], 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modes": ("sequential", "gossip")}, "modes: unknown ['gossip']"),
        ({"strategies": ("fedsgd",)}, "strategies: unknown ['fedsgd']"),
        ({"sites": ("a", "b")}, "hybrid needs at least 3 sites"),
        ({"max_groups": 5}, "max_groups: must be within 2..4 for 5 sites, got 5"),
        ({"cycles": IntRange(1, 3)}, "a mode search needs a fixed cycle count"),
        ({"fedprox_mu": 0.0}, "fedprox_mu: must be > 0"),
    ],
)
def test_a_malformed_mode_space_is_refused_with_the_reason(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(SearchSpaceError) as caught:
        _space(**overrides)
    assert message in str(caught.value)


def test_the_learning_rate_and_steps_approvals_cover_every_mode() -> None:
    spans = _space().hyperparameter_spans()
    # Sequential visits train 5..20 steps; a round trains ceil(2 x 5 / 4) to 2 x 20 steps.
    assert spans["steps"] == IntRange(3, 40)
    assert spans["proximal_mu"] == FloatRange(0.0, 1.0)
    bounds = {"learning_rate": (1e-3, 1e-1), "steps": (1, 20), "proximal_mu": (0.0, 1.0)}
    with pytest.raises(SearchSpaceError, match="steps"):
        _space().check_within(bounds)


def test_a_federated_plan_round_trips_through_json_and_describes_itself() -> None:
    federation = Federation("hybrid", "fedavg", 3, 10, groups=(("b", "a"), ("c",)))
    base = SearchSpace(sites=("a", "b", "c")).plan(("a", "b", "c")).hops[0].hyperparameters
    plan = CandidatePlan.federated(federation, ("a", "b", "c"), base)
    assert plan.describe() == "hybrid fedavg [b > a | c] 3 rounds x 10 steps"
    assert CandidatePlan.from_json_dict(plan.to_json_dict()) == plan
    document = plan.to_plan_document("heart", ["0", "1"], "tabular")
    assert document["mode"] == "hybrid" and "hops" not in document
    assert document["groups"] == [
        {"name": "group1", "sites": ["b", "a"]},
        {"name": "group2", "sites": ["c"]},
    ]
    assert document["federated"] == {"strategy": "fedavg", "rounds": 3, "local_steps": 10}
    with pytest.raises(ValueError, match="name each site once"):
        Federation("hybrid", "fedavg", 3, 10, groups=(("a", "b"), ("b",)))


def test_a_mode_study_reopens_from_storage_with_its_space(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    space = _space()
    study = OrderingStudy.create(url, "modes", space, seed=5)

    class Scores:
        def execute(
            self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
        ) -> TrialOutcome:
            value = {"sequential": 0.6, "federated": 0.7, "hybrid": 0.8}[plan.mode]
            return TrialOutcome(tuple(SiteScore(s, value, 10) for s in plan.sites), {})

    records = study.optimize(Scores(), 12)
    reopened = OrderingStudy.load(url, "modes")
    assert reopened.space == space
    assert [r.plan for r in reopened.history()] == [r.plan for r in records]
    assert reopened.best_plan().mode == "hybrid"
    # Sequential plans are enqueued with their mode; federated ones are proposed only.
    reopened.enqueue(("e", "d", "c", "b", "a"))
    with pytest.raises(SearchSpaceError, match="cannot be enqueued"):
        reopened.enqueue(reopened.best_plan())
