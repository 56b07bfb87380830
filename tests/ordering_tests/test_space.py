"""The plan space: plans from trials and back, approved bounds, and the run-plan document."""

from __future__ import annotations

import json

import optuna
import pytest

from ordering import (
    CandidatePlan,
    FloatRange,
    HopHyperparameters,
    IntRange,
    LehmerCode,
    RandomKeys,
    SearchSpace,
    SearchSpaceError,
)
from tests.hyperparameter_bounds import out_of_bounds

APPROVED = {
    "learning_rate": (1e-5, 1e-2),
    "steps": (1, 200),
    "epochs": (1, 5),
    "proximal_mu": (0.0, 1.0),
    "cycles": (1, 10),
    "batch_size": (1, 64),
}


def rich_space(sites: tuple[str, ...]) -> SearchSpace:
    return SearchSpace(
        sites=sites,
        cycles=IntRange(1, 3),
        reshuffle_each_cycle=True,
        learning_rate=FloatRange(1e-4, 5e-3, log=True),
        learning_rate_decay=FloatRange(0.9, 1.0),
        steps=IntRange(5, 50),
        steps_per_site=True,
        epochs=IntRange(1, 3),
        proximal_mu=FloatRange(0.0, 0.5),
    )


@pytest.mark.parametrize("encoding", [LehmerCode(), RandomKeys()], ids=lambda e: e.name)
def test_a_suggested_plan_is_rebuilt_from_its_own_parameters(
    encoding: LehmerCode | RandomKeys, five_sites: tuple[str, ...]
) -> None:
    space = rich_space(five_sites)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(30):
        trial = study.ask()
        plan = space.suggest_plan(trial, encoding)
        rebuilt = space.suggest_plan(
            optuna.trial.FixedTrial(space.params_for(plan, encoding)), encoding
        )
        assert rebuilt == plan
        study.tell(trial, 0.0)


def test_hops_follow_cycle_orders_with_decayed_learning_rate_and_per_hop_seeds() -> None:
    plan = CandidatePlan.build(
        [("a", "b"), ("b", "a")],
        HopHyperparameters(learning_rate=1e-3, steps=10, seed=7),
        learning_rate_decay=0.5,
        steps_by_site={"b": 4},
    )
    assert [hop.site for hop in plan.hops] == ["a", "b", "b", "a"]
    assert [hop.hyperparameters.learning_rate for hop in plan.hops] == [1e-3, 5e-4, 2.5e-4, 1.25e-4]
    assert [hop.hyperparameters.steps for hop in plan.hops] == [10, 4, 4, 10]
    assert [hop.hyperparameters.seed for hop in plan.hops] == [7, 8, 9, 10]
    assert plan.reshuffles and plan.cycles == 2 and plan.order == ("a", "b")


def test_the_plan_document_has_one_entry_per_hop_and_omits_unset_extras() -> None:
    space = SearchSpace(sites=("a", "b"), cycles=2, learning_rate=1e-3, steps=30)
    document = space.plan(("b", "a")).to_plan_document(
        "triage-notes", ["x", "y"], name="trial-3", lora={"r": 8}
    )
    assert set(document) == {"name", "task", "dataset", "labels", "lora", "hops"}
    assert [hop["site"] for hop in document["hops"]] == ["b", "a", "b", "a"]
    assert set(document["hops"][0]["hyperparameters"]) == {
        "learning_rate", "steps", "batch_size", "weight_decay", "warmup_steps",
        "max_grad_norm", "seed",
    }  # fmt: skip
    assert json.loads(json.dumps(document)) == document

    with_extras = SearchSpace(sites=("a", "b"), epochs=2, proximal_mu=0.1).plan(("a", "b"))
    extras = with_extras.to_plan_document("d", ["x", "y"])["hops"][1]["hyperparameters"]
    assert extras["epochs"] == 2 and extras["proximal_mu"] == 0.1


def test_the_coordinator_accepts_the_plan_document() -> None:
    plan_module = pytest.importorskip("coordinator.plan")
    space = SearchSpace(sites=("site-a", "site-b", "site-c"), cycles=2, learning_rate_decay=0.9)
    plan = space.plan(("site-c", "site-a", "site-b"))
    run_plan = plan_module.parse_plan(plan.to_plan_document("notes", ["yes", "no"]))
    hops = run_plan.expanded_hops()
    assert [site for site, _ in hops] == [hop.site for hop in plan.hops]
    assert [hp.learning_rate for _, hp in hops] == [
        hop.hyperparameters.learning_rate for hop in plan.hops
    ]


def test_a_space_within_the_approved_bounds_is_accepted(five_sites: tuple[str, ...]) -> None:
    rich_space(five_sites).check_within(APPROVED)


def test_a_space_outside_the_approved_bounds_is_refused_with_every_reason(
    five_sites: tuple[str, ...],
) -> None:
    space = SearchSpace(
        sites=five_sites,
        learning_rate=FloatRange(1e-4, 5e-2, log=True),
        steps=IntRange(5, 500),
        weight_decay=0.01,
    )
    bounds = {**APPROVED, "weight_decay": (0.0, 0.0), "momentum": (0.0, 1.0)}
    with pytest.raises(SearchSpaceError) as refused:
        space.check_within(bounds)
    message = str(refused.value)
    for fragment in ("learning_rate", "steps", "weight_decay", "momentum"):
        assert fragment in message
    assert "  proximal_mu:" not in message


def test_learning_rate_decay_is_checked_at_the_last_hop(five_sites: tuple[str, ...]) -> None:
    space = SearchSpace(
        sites=five_sites,
        cycles=4,
        learning_rate=FloatRange(1e-4, 1e-3, log=True),
        learning_rate_decay=FloatRange(0.5, 1.0),
    )
    with pytest.raises(SearchSpaceError, match="per-hop values reach"):
        space.check_within(APPROVED)


def test_a_searched_value_without_an_approved_bound_is_refused() -> None:
    space = SearchSpace(sites=("a", "b"), proximal_mu=FloatRange(0.0, 0.1))
    with pytest.raises(SearchSpaceError, match="no site approved a bound"):
        space.check_within({"learning_rate": (1e-5, 1e-2), "steps": (1, 100)})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"sites": ("a", "a")}, "duplicates"),
        ({"sites": ("a", "b c")}, "not a valid site name"),
        ({"sites": ("a", "b"), "learning_rate": FloatRange(1e-4, 1e-2)}, "log range"),
        ({"sites": ("a", "b"), "steps_per_site": True}, "steps range"),
        ({"sites": ("a", "b"), "cycles": 0}, "cycles"),
    ],
)
def test_a_malformed_space_is_refused(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(SearchSpaceError, match=fragment):
        SearchSpace(**kwargs)  # type: ignore[arg-type]


def test_a_plan_that_does_not_fit_the_space_is_refused(five_sites: tuple[str, ...]) -> None:
    space = SearchSpace(sites=five_sites, steps=IntRange(5, 50))
    foreign = CandidatePlan.build([five_sites], HopHyperparameters(steps=80, batch_size=32))
    with pytest.raises(SearchSpaceError) as refused:
        space.params_for(foreign, LehmerCode())
    assert "steps" in str(refused.value) and "batch_size" in str(refused.value)
    with pytest.raises(SearchSpaceError, match="reshuffles"):
        space.plan([five_sites, tuple(reversed(five_sites))])


def test_a_space_survives_its_json_form(five_sites: tuple[str, ...]) -> None:
    space = rich_space(five_sites)
    assert SearchSpace.from_json_dict(json.loads(json.dumps(space.to_json_dict()))) == space


def test_a_plan_survives_its_json_form(five_sites: tuple[str, ...]) -> None:
    plan = rich_space(five_sites).plan([five_sites, tuple(reversed(five_sites))])
    assert CandidatePlan.from_json_dict(json.loads(json.dumps(plan.to_json_dict()))) == plan


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, value) for name, value in out_of_bounds() if name in SearchSpace.__dataclass_fields__],
)
def test_a_space_is_refused_when_it_could_give_a_hop_a_value_outside_the_models_bounds(
    name: str, value: float
) -> None:
    with pytest.raises(SearchSpaceError, match=rf"\n  {name}: "):
        SearchSpace(sites=("a", "b"), **{name: value})  # type: ignore[arg-type]


def test_a_decayed_learning_rate_above_the_models_bound_refuses_the_space() -> None:
    with pytest.raises(SearchSpaceError) as refused:
        SearchSpace(sites=("a", "b"), cycles=2, learning_rate=FloatRange(1e-3, 0.5, log=True),
                    learning_rate_decay=FloatRange(1.0, 2.0))  # fmt: skip
    assert str(refused.value).endswith(
        "learning_rate: Input should be less than or equal to 1 (per-hop values reach [0.001, 4])"
    )
    SearchSpace(sites=("a", "b"), cycles=2, learning_rate=FloatRange(1e-3, 0.1, log=True),
                learning_rate_decay=FloatRange(1.0, 2.0))  # fmt: skip


def test_hops_of_a_space_train_with_the_models_hyperparameters_and_fractional_epochs() -> None:
    space = SearchSpace(sites=("a", "b"), epochs=1.5, weight_decay=0.01)
    hop = space.plan(("a", "b")).hops[1].hyperparameters
    assert hop == HopHyperparameters(learning_rate=5e-4, steps=20, epochs=1.5, weight_decay=0.01,
                                     seed=1)  # fmt: skip
    document = space.plan(("a", "b")).to_plan_document("d", ["x", "y"])
    assert document["hops"][0]["hyperparameters"]["epochs"] == 1.5
    stored = space.plan(("a", "b")).to_json_dict()
    assert CandidatePlan.from_json_dict(json.loads(json.dumps(stored))) == space.plan(("a", "b"))


def test_plans_stored_before_epochs_were_floats_still_read() -> None:
    stored = {"encoding": "lehmer", "cycle_orders": [["a", "b"]], "learning_rate_decay": 1.0,
              "hops": [["a", {"learning_rate": 1e-3, "steps": 5, "batch_size": 16,
                              "weight_decay": 0.0, "warmup_steps": 0, "max_grad_norm": 1.0,
                              "seed": 0, "epochs": 2}],
                       ["b", {"learning_rate": 1e-3, "steps": 5, "batch_size": 16,
                              "weight_decay": 0.0, "warmup_steps": 0, "max_grad_norm": 1.0,
                              "seed": 1, "epochs": 2}]]}  # fmt: skip
    plan = CandidatePlan.from_json_dict(stored)
    assert [hop.hyperparameters.epochs for hop in plan.hops] == [2.0, 2.0]
    assert plan.hops[0].hyperparameters.proximal_mu == 0.0
