"""Run plans: shorthand expansion and clear errors for malformed plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.plan import PlanError, load_plan, parse_plan

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
