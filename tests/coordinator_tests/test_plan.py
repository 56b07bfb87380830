"""Run plans: shorthand expansion and clear errors for malformed plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.plan import PlanError, load_plan, parse_plan
from protocols.hyperparameters import HopHyperparameters
from tests.hyperparameter_bounds import out_of_bounds

BASE = {"dataset": "notes", "labels": ["a", "b"]}


def test_sites_and_cycles_expand_in_order() -> None:
    plan = parse_plan({**BASE, "sites": ["x", "y"], "cycles": 2, "defaults": {"steps": 3}})
    assert [site for site, _ in plan.expanded_hops()] == ["x", "y", "x", "y"]
    assert all(hp.steps == 3 for _, hp in plan.expanded_hops())


def test_explicit_hops_keep_their_own_hyperparameters() -> None:
    plan = parse_plan({**BASE, "hops": [{"site": "x", "hyperparameters": {"steps": 7}},
                                        {"site": "y"}]})  # fmt: skip
    assert [hp.steps for _, hp in plan.expanded_hops()] == [7, plan.defaults.steps]


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"labels": ["a", "b"], "sites": ["x"]}, "dataset"),
        ({"dataset": "d", "sites": ["x"]}, "needs 'labels'"),
        ({**BASE, "task": "regression", "sites": ["x"]}, "task"),
        ({**BASE}, "either 'hops' or 'sites'"),
        ({**BASE, "sites": ["x"], "hops": [{"site": "y"}]}, "either 'hops' or 'sites'"),
        ({**BASE, "sites": ["../etc"]}, "sites.0"),
        ({**BASE, "sites": ["x"], "defaults": {"learning_rate": -1}}, "defaults.learning_rate"),
        ({**BASE, "sites": ["x"], "surprise": 1}, "surprise"),
        ({**BASE, "labels": ["a", "a"], "sites": ["x"]}, "duplicates"),
        ({**BASE, "sites": ["x"], "base_model_sha256": "nothex"}, "base_model_sha256"),
    ],
)
def test_malformed_plan_error_names_the_field(document: dict[str, object], fragment: str) -> None:
    with pytest.raises(PlanError) as error:
        parse_plan(document)
    assert fragment in str(error.value)


def test_causal_lm_plan_needs_no_labels() -> None:
    plan = parse_plan({"dataset": "qa", "task": "causal-lm", "sites": ["x"],
                       "options": {"max_length": 128}})  # fmt: skip
    assert plan.labels == () and plan.options == {"max_length": 128}


def test_plan_files_are_read_as_toml_or_json(tmp_path: Path) -> None:
    toml = tmp_path / "plan.toml"
    toml.write_text('dataset = "notes"\nlabels = ["a", "b"]\nsites = ["x"]\n')
    assert load_plan(toml).sites == ("x",)
    broken = tmp_path / "plan.json"
    broken.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(broken)
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "missing.json")


@pytest.mark.parametrize(("name", "value"), out_of_bounds())
def test_a_plan_refuses_every_hyperparameter_outside_the_models_bounds(
    name: str, value: float
) -> None:
    with pytest.raises(PlanError, match=rf"defaults\.{name}: "):
        parse_plan({**BASE, "sites": ["x"], "defaults": {name: value}})
    with pytest.raises(PlanError, match=rf"hops\.0\.hyperparameters\.{name}: "):
        parse_plan({**BASE, "hops": [{"site": "x", "hyperparameters": {name: value}}]})


def test_a_plan_sets_the_learning_rate_schedule_and_every_trainer_option() -> None:
    every_option = {
        "learning_rate": 0.01, "steps": 9, "epochs": 0.5, "batch_size": 4, "weight_decay": 0.1,
        "warmup_steps": 2, "max_grad_norm": 0.0, "seed": 5, "proximal_mu": 0.2,
        "lr_schedule": "constant",
    }  # fmt: skip
    plan = parse_plan({**BASE, "sites": ["x"], "defaults": every_option})
    assert plan.defaults == HopHyperparameters(**every_option)  # type: ignore[arg-type]
    assert parse_plan(plan.to_json()) == plan
    assert parse_plan({**BASE, "sites": ["x"]}).defaults.lr_schedule == "linear"
    with pytest.raises(PlanError, match=r"defaults\.lr_schedule: Input should be 'linear'"):
        parse_plan({**BASE, "sites": ["x"], "defaults": {"lr_schedule": "cosine"}})
