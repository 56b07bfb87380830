"""Forgetting controls in the plan space (a visit budget split over cycles, a final
consolidation cycle) and the alternative samplers a study can run."""

from __future__ import annotations

import math

import optuna
import pytest

from ordering import (
    FloatRange,
    IntRange,
    LehmerCode,
    OrderingStudy,
    RandomKeys,
    SearchSpace,
    SearchSpaceError,
    SyntheticObjective,
)


def controlled_space(sites: tuple[str, ...], **overrides: object) -> SearchSpace:
    values: dict[str, object] = {
        "sites": sites,
        "cycles": IntRange(1, 4),
        "learning_rate": FloatRange(1e-4, 1e-2, log=True),
        "learning_rate_decay": FloatRange(0.8, 1.0),
        "steps": IntRange(8, 80),
        "steps_split_over_cycles": True,
        "consolidation_steps": IntRange(1, 10),
        "consolidation_learning_rate_factor": FloatRange(0.05, 0.5, log=True),
        "proximal_mu": FloatRange(0.0, 1.0),
    }
    values.update(overrides)
    return SearchSpace(**values)  # type: ignore[arg-type]


def test_the_visit_budget_is_split_over_cycles(five_sites: tuple[str, ...]) -> None:
    space = controlled_space(five_sites, consolidation_steps=None)
    plan = space.plan(five_sites, cycles=3, steps=40)
    assert plan.cycles == 3
    assert {hop.hyperparameters.steps for hop in plan.hops} == {14}  # ceil(40 / 3)
    assert space.params_for(plan, None)["steps"] == 42  # 3 visits of 14: the same schedule
    single = space.plan(five_sites, cycles=1, steps=40)
    assert {hop.hyperparameters.steps for hop in single.hops} == {40}


def test_a_consolidation_cycle_revisits_every_site_briefly_at_a_low_learning_rate(
    five_sites: tuple[str, ...],
) -> None:
    space = controlled_space(five_sites, steps_split_over_cycles=False)
    order = ("east", "west", "north", "south", "centre")
    plan = space.plan(
        order,
        cycles=2,
        steps=30,
        learning_rate=1e-3,
        learning_rate_decay=0.9,
        consolidation_steps=4,
        consolidation_learning_rate_factor=0.1,
    )
    assert plan.cycles == 3 and len(plan.hops) == 15
    regular, tail = plan.hops[:10], plan.hops[10:]
    assert tuple(hop.site for hop in tail) == order
    last_lr = regular[-1].hyperparameters.learning_rate
    assert math.isclose(last_lr, 1e-3 * 0.9**9)
    for i, hop in enumerate(tail):
        assert hop.hyperparameters.steps == 4
        assert math.isclose(hop.hyperparameters.learning_rate, last_lr * 0.1)
        assert hop.hyperparameters.seed == regular[-1].hyperparameters.seed + 1 + i
    params = space.params_for(plan, LehmerCode())
    assert params["cycles"] == 2 and params["consolidation_steps"] == 4
    assert math.isclose(float(params["consolidation_learning_rate_factor"]), 0.1)


@pytest.mark.parametrize("encoding", [LehmerCode(), RandomKeys()], ids=lambda e: e.name)
def test_a_controlled_plan_is_rebuilt_from_its_own_parameters(
    encoding: LehmerCode | RandomKeys, five_sites: tuple[str, ...]
) -> None:
    space = controlled_space(five_sites)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    for _ in range(30):
        trial = study.ask()
        plan = space.suggest_plan(trial, encoding)
        assert plan.cycles == trial.params["cycles"] + 1
        rebuilt = space.suggest_plan(
            optuna.trial.FixedTrial(space.params_for(plan, encoding)), encoding
        )
        assert rebuilt.hops == plan.hops
        study.tell(trial, 0.0)


def test_a_plan_without_the_consolidation_cycle_does_not_fit(five_sites: tuple[str, ...]) -> None:
    plain = controlled_space(five_sites, consolidation_steps=None)
    with pytest.raises(SearchSpaceError, match="consolidation"):
        controlled_space(five_sites).params_for(plain.plan(five_sites, cycles=1), None)


def test_approved_bounds_cover_consolidation_visits(five_sites: tuple[str, ...]) -> None:
    space = controlled_space(five_sites, learning_rate_decay=1.0)
    approved = {"learning_rate": (1e-4, 1e-2), "steps": (2, 80), "cycles": (1, 4),
                "proximal_mu": (0.0, 1.0)}  # fmt: skip
    with pytest.raises(SearchSpaceError) as refused:
        space.check_within(approved)
    # Consolidation visits go down to 1 step and to 1e-4 * 0.05 learning rate.
    assert "steps" in str(refused.value) and "learning_rate" in str(refused.value)
    space.check_within({**approved, "learning_rate": (5e-6, 1e-2), "steps": (1, 80)})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"consolidation_steps": 0}, "consolidation_steps"),
        ({"consolidation_learning_rate_factor": 1.5}, "consolidation_learning_rate_factor"),
    ],
)
def test_malformed_controls_are_refused(
    kwargs: dict[str, object], fragment: str, five_sites: tuple[str, ...]
) -> None:
    with pytest.raises(SearchSpaceError, match=fragment):
        controlled_space(five_sites, **kwargs)


def test_the_controls_survive_the_json_form(five_sites: tuple[str, ...]) -> None:
    space = controlled_space(five_sites)
    assert SearchSpace.from_json_dict(space.to_json_dict()) == space
    legacy = SearchSpace(sites=five_sites).to_json_dict()
    for key in ("steps_split_over_cycles", "consolidation_steps",
                "consolidation_learning_rate_factor"):  # fmt: skip
        del legacy[key]
    assert SearchSpace.from_json_dict(legacy) == SearchSpace(sites=five_sites)


@pytest.mark.parametrize("sampler", ["cmaes", "qmc", "gp"])
def test_alternative_samplers_run_a_study(sampler: str) -> None:
    objective = SyntheticObjective(4, seed=1)
    space = controlled_space(objective.sites, cycles=IntRange(1, 2))
    study = OrderingStudy.create(
        None, f"s-{sampler}", space, "random-keys", seed=0, sampler=sampler,  # type: ignore[arg-type]
        pruning=None, n_startup_trials=2,
    )  # fmt: skip
    records = study.optimize(objective, 4)
    assert [r.state for r in records] == ["COMPLETE"] * 4
    assert type(study._stage(1.0).study.sampler).__name__.lower().startswith(sampler[:2])


def test_the_short_cycles_seed_is_the_spaces_many_short_cycles_corner(
    five_sites: tuple[str, ...],
) -> None:
    from ordering import short_cycles_seed

    space = controlled_space(five_sites, learning_rate_decay=FloatRange(0.97, 1.0))
    order = tuple(reversed(five_sites))
    plan = short_cycles_seed(space, order, learning_rate_position=1.0, final_fraction=0.7)
    regular, consolidation = plan.hops[: 4 * 5], plan.hops[4 * 5 :]
    assert plan.cycles == 5 and plan.cycle_orders == (order,) * 5  # 4 cycles + consolidation
    assert {h.hyperparameters.steps for h in regular} == {20}  # 80 steps over 4 cycles
    assert regular[0].hyperparameters.learning_rate == pytest.approx(1e-2)
    assert regular[-1].hyperparameters.learning_rate == pytest.approx(0.7e-2)
    assert [h.site for h in consolidation] == list(order)
    assert {h.hyperparameters.steps for h in consolidation} == {1}
    assert consolidation[0].hyperparameters.learning_rate == pytest.approx(0.05 * 0.7e-2)
    assert regular[0].hyperparameters.proximal_mu == 0.0
    space.params_for(plan, LehmerCode())  # a plan the space can propose (else it raises)
    # The middle of the log range, and a decay the space cannot reach clipped into it.
    middle = short_cycles_seed(space, order, learning_rate_position=0.5, final_fraction=0.01)
    assert middle.hops[0].hyperparameters.learning_rate == pytest.approx(1e-3)
    assert middle.learning_rate_decay == pytest.approx(0.97)
    with pytest.raises(ValueError, match="final_fraction must be in"):
        short_cycles_seed(space, order, final_fraction=0.0)
    with pytest.raises(ValueError, match="learning_rate_position must be in"):
        short_cycles_seed(space, order, learning_rate_position=1.5)


def test_the_short_cycles_seed_can_consolidate_longer_and_at_a_higher_factor(
    five_sites: tuple[str, ...],
) -> None:
    from ordering import short_cycles_seed

    space = controlled_space(five_sites, learning_rate_decay=FloatRange(0.97, 1.0))
    plan = short_cycles_seed(
        space,
        five_sites,
        final_fraction=0.7,
        consolidation_steps=6,
        consolidation_learning_rate_factor=0.5,
    )
    consolidation = plan.hops[4 * 5 :]
    assert [h.site for h in consolidation] == list(five_sites)
    assert {h.hyperparameters.steps for h in consolidation} == {6}
    last_regular = plan.hops[4 * 5 - 1].hyperparameters.learning_rate
    assert consolidation[0].hyperparameters.learning_rate == pytest.approx(0.5 * last_regular)
    space.params_for(plan, LehmerCode())  # still a plan the space can propose
    with pytest.raises(SearchSpaceError):
        short_cycles_seed(space, five_sites, consolidation_steps=11)  # the range is 1-10


def test_a_study_runs_the_short_cycles_seed_first(five_sites: tuple[str, ...]) -> None:
    from ordering import short_cycles_seed

    space = controlled_space(five_sites)
    objective = SyntheticObjective(5, seed=0)
    space = controlled_space(objective.sites)
    seed = short_cycles_seed(space, objective.sites)
    study = OrderingStudy.create(None, "seeded", space, "lehmer", "mean", seed=0, pruning=None)
    study.enqueue(seed, note="seed: short cycles")
    records = study.optimize(objective, 3)
    assert records[0].plan is not None and records[0].plan.hops == seed.hops
    assert records[1].plan is not None and records[1].plan.hops != seed.hops


def test_a_plan_consolidating_at_the_factor_ranges_low_end_fits_its_space(
    five_sites: tuple[str, ...],
) -> None:
    # The factor read back from the plan (a ratio of learning rates) is 0.049999999999999996.
    space = controlled_space(five_sites, consolidation_learning_rate_factor=FloatRange(0.05, 1.0))
    plan = space.plan(five_sites, cycles=3, learning_rate=0.003)
    assert plan.hops[-1].hyperparameters.steps == 1
    assert space.params_for(plan, LehmerCode())["consolidation_learning_rate_factor"] == 0.05
