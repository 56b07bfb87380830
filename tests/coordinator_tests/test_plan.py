"""Run plans: shorthand expansion and clear errors for malformed plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.plan import PlanError, load_plan, parse_plan
from protocols.approval import ApprovalBundle, BundleViolation

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


FEDERATED = {**BASE, "mode": "federated", "sites": ["x", "y", "z"],
             "federated": {"strategy": "fedavg", "rounds": 4, "min_sites": 2}}  # fmt: skip


def test_federated_plan_trains_every_site_from_each_round_with_the_round_settings() -> None:
    plan = parse_plan({**FEDERATED, "defaults": {"steps": 9},
                       "federated": {"strategy": "fedprox", "rounds": 2, "local_steps": 5,
                                     "proximal_mu": 0.1}})  # fmt: skip
    assert plan.round_members() == [("x", ("x",)), ("y", ("y",)), ("z", ("z",))]
    hp = plan.round_hyperparameters()
    assert (hp.steps, hp.proximal_mu) == (5, 0.1)
    assert [site for site, _ in plan.expanded_hops()] == ["x", "y", "z"]


def test_hybrid_plan_chains_each_group_in_order() -> None:
    plan = parse_plan({**BASE, "mode": "hybrid", "federated": {"rounds": 2},
                       "groups": [{"name": "north", "sites": ["a", "b"]},
                                  {"name": "south", "sites": ["c"]}]})  # fmt: skip
    assert plan.round_members() == [("north", ("a", "b")), ("south", ("c",))]
    assert plan.round_hyperparameters() == plan.defaults


def test_server_optimiser_fills_in_flowers_defaults_per_strategy() -> None:
    adam = parse_plan({**FEDERATED, "federated": {"strategy": "fedadam", "eta": 0.05}})
    assert adam.federated is not None
    assert adam.federated.server_optimiser() == {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99,
                                                 "tau": 1e-3}  # fmt: skip
    yogi = parse_plan({**FEDERATED, "federated": {"strategy": "fedyogi"}})
    assert yogi.federated is not None and yogi.federated.server_optimiser()["eta"] == 1e-2
    assert parse_plan(FEDERATED).federated.server_optimiser() == {}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("available", "fraction", "min_sites", "expected"),
    [(10, 1.0, 1, 10), (10, 0.3, 1, 3), (10, 0.05, 2, 2), (3, 0.5, 1, 1), (4, 0.5, 3, 3)],
)
def test_round_sample_size_is_flowers(
    available: int, fraction: float, min_sites: int, expected: int
) -> None:
    plan = parse_plan({**BASE, "mode": "federated", "sites": [f"s{i}" for i in range(available)],
                       "federated": {"fraction_train": fraction,
                                     "min_sites": min_sites}})  # fmt: skip
    assert plan.federated is not None and plan.federated.sample_size(available) == expected


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({**BASE, "mode": "federated", "sites": ["x"]}, "needs a 'federated' table"),
        ({**BASE, "sites": ["x"], "federated": {"rounds": 2}}, "need mode 'federated'"),
        ({**FEDERATED, "mode": "swarm"}, "mode"),
        ({**FEDERATED, "cycles": 2}, "no 'hops' or 'cycles'"),
        ({**FEDERATED, "sites": ["x", "x"]}, "duplicates"),
        ({**FEDERATED, "federated": {"min_sites": 4}}, "min_sites is 4 but the run has 3 sites"),
        ({**FEDERATED, "federated": {"strategy": "fedsgd"}}, "federated.strategy"),
        ({**FEDERATED, "federated": {"rounds": 0}}, "federated.rounds"),
        ({**FEDERATED, "federated": {"fraction_train": 1.5}}, "federated.fraction_train"),
        ({**FEDERATED, "federated": {"proximal_mu": 0.1}}, "'proximal_mu' applies to fedprox"),
        ({**FEDERATED, "federated": {"eta": 0.1}}, "eta applies to fedadam and fedyogi"),
        ({**FEDERATED, "federated": {"stragglers": "ignore"}}, "federated.stragglers"),
        (
            {**FEDERATED, "bounds": {"steps": [1, 10]}, "federated": {"local_steps": 50}},
            "steps=50 is outside",
        ),
        ({**FEDERATED, "cross_validation": {"folds": 3}}, "'cross_validation' applies"),
        ({**BASE, "mode": "hybrid", "federated": {}}, "needs 'groups'"),
        ({**BASE, "mode": "hybrid", "federated": {}, "sites": ["x"]}, "in 'groups', not"),
        (
            {
                **BASE,
                "mode": "hybrid",
                "federated": {},
                "groups": [{"name": "g", "sites": ["a"]}, {"name": "h", "sites": ["a"]}],
            },
            "more than once",
        ),
        (
            {
                **BASE,
                "mode": "hybrid",
                "federated": {},
                "groups": [{"name": "g", "sites": ["a"]}, {"name": "g", "sites": ["b"]}],
            },
            "duplicate names",
        ),
        (
            {**BASE, "mode": "hybrid", "federated": {}, "groups": [{"name": "g", "sites": []}]},
            "groups.0.sites",
        ),
        ({**FEDERATED, "groups": [{"name": "g", "sites": ["a"]}]}, "'groups' applies to hybrid"),
    ],
)
def test_malformed_federated_plan_error_names_the_field(
    document: dict[str, object], fragment: str
) -> None:
    with pytest.raises(PlanError) as error:
        parse_plan(document)
    assert fragment in str(error.value)


def test_bundle_covers_mode_strategy_and_groups_and_sequential_hashes_are_unchanged() -> None:
    sequential = parse_plan({**BASE, "sites": ["x", "y"]}).approval_bundle()
    assert "federation" not in sequential.canonical_json() and sequential.mode == "sequential"
    federated = parse_plan(FEDERATED).approval_bundle()
    assert federated.federation["strategy"] == "fedavg" and federated.mode == "federated"
    prox = parse_plan({**FEDERATED, "federated": {"strategy": "fedprox", "rounds": 4,
                                                  "min_sites": 2}}).approval_bundle()  # fmt: skip
    more_rounds = parse_plan({**FEDERATED, "federated": {"rounds": 5, "min_sites": 2}})
    assert len({federated.sha256, prox.sha256, more_rounds.approval_bundle().sha256}) == 3
    hybrid = parse_plan(
        {**BASE, "mode": "hybrid", "federated": {}, "groups": [{"name": "g", "sites": ["a", "b"]}]}
    ).approval_bundle()
    reordered = parse_plan(
        {**BASE, "mode": "hybrid", "federated": {}, "groups": [{"name": "g", "sites": ["b", "a"]}]}
    ).approval_bundle()
    assert hybrid.federation["groups"] == [["g", ["a", "b"]]]
    assert hybrid.sha256 != reordered.sha256  # the chain order is part of what is approved
    assert ApprovalBundle.from_json(hybrid.canonical_json()).sha256 == hybrid.sha256


def test_bundle_refuses_a_task_of_another_mode_or_beyond_its_rounds() -> None:
    bundle = parse_plan(FEDERATED).approval_bundle()
    bundle.check_round("federated", 4)
    with pytest.raises(BundleViolation, match="approved for federated"):
        bundle.check_round("sequential", 0)
    with pytest.raises(BundleViolation, match="outside the approved 4 rounds"):
        bundle.check_round("federated", 5)


def test_plan_files_give_the_federated_table_in_toml(tmp_path: Path) -> None:
    toml = tmp_path / "plan.toml"
    toml.write_text(
        'mode = "hybrid"\ndataset = "notes"\nlabels = ["a", "b"]\n'
        '[federated]\nstrategy = "fedyogi"\nrounds = 5\ntau = 0.01\n'
        '[[groups]]\nname = "north"\nsites = ["a", "b"]\n'
        '[[groups]]\nname = "south"\nsites = ["c", "d"]\n'
    )
    plan = load_plan(toml)
    assert plan.federated is not None and plan.federated.server_optimiser()["tau"] == 0.01
    assert [name for name, _ in plan.round_members()] == ["north", "south"]
