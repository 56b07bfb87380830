"""Search quality on the synthetic objective, heuristic seeds, and the baselines."""

from __future__ import annotations

import itertools
import json

import pytest

from ordering import (
    RANDOM_SEARCH,
    HopHyperparameters,
    LehmerCode,
    OrderingStudy,
    RandomKeys,
    SyntheticObjective,
    compare_encodings,
    cyclic_random_plan,
    evaluate_plan,
    exhaustive_ranking,
    fixed_order_plan,
    probe_order,
    random_search,
    site_typicality,
)


def test_tpe_finds_the_known_best_order_of_six_sites_faster_than_random_search() -> None:
    objective = SyntheticObjective(6, seed=0)  # 720 orders, one of them scores 1.0
    result = compare_encodings(objective, 60, seeds=range(5), encodings=[RandomKeys()])
    tpe, rand = result["methods"]["random-keys"], result["methods"][RANDOM_SEARCH]
    # Not reaching the best in 60 trials counts as 61.
    assert tpe["median_trials_to_target"] <= rand["median_trials_to_target"] / 2
    assert tpe["median_best_so_far"][29] > rand["median_best_so_far"][29]
    assert tpe["median_best_so_far"][-1] == pytest.approx(objective.best_value)


def test_compare_encodings_returns_json_able_curves_per_encoding_and_random_search() -> None:
    result = compare_encodings(
        SyntheticObjective(4, seed=1), 12, seeds=[0, 1], encodings=[LehmerCode(), RandomKeys()]
    )
    assert json.loads(json.dumps(result)) == result
    assert set(result["methods"]) == {"lehmer", "random-keys", RANDOM_SEARCH}
    assert result["target"] == 1.0
    for method in result["methods"].values():
        assert len(method["best_so_far"]) == 2 and len(method["median_best_so_far"]) == 12
        assert all(a <= b for a, b in itertools.pairwise(method["median_best_so_far"]))
        for trials, runs in zip(method["trials_to_target"], method["runs_to_target"], strict=True):
            assert (trials is None) == (runs is None)
            assert trials is None or runs <= trials


def test_probe_order_puts_the_least_typical_site_first_and_the_most_typical_last() -> None:
    cross = {
        ("a", "b"): 0.9, ("a", "c"): 0.8,  # a's model transfers well: typical
        ("b", "a"): 0.4, ("b", "c"): 0.5,  # b is an outlier
        ("c", "a"): 0.7, ("c", "b"): 0.6,
    }  # fmt: skip
    assert site_typicality(cross) == pytest.approx({"a": 0.85, "b": 0.45, "c": 0.65})
    assert probe_order(cross) == ("b", "c", "a")
    losses = {pair: 1.0 - score for pair, score in cross.items()}
    assert probe_order(losses, higher_is_better=False) == ("b", "c", "a")
    with pytest.raises(ValueError, match="lack 1 pairs"):
        probe_order({k: v for k, v in cross.items() if k != ("c", "b")})


def test_probe_order_recovers_the_synthetic_best_order(synthetic: SyntheticObjective) -> None:
    assert probe_order(synthetic.cross_scores()) == synthetic.best_order


def test_exhaustive_ranking_puts_the_known_best_order_first(
    synthetic: SyntheticObjective,
) -> None:
    hyperparameters = HopHyperparameters(learning_rate=1e-3, steps=20)
    ranking = exhaustive_ranking(synthetic, synthetic.sites, hyperparameters=hyperparameters)
    assert len(ranking) == 120
    assert ranking[0].plan.order == synthetic.best_order
    assert ranking[0].value == pytest.approx(synthetic.best_value)
    assert all(a.value >= b.value for a, b in itertools.pairwise(ranking))
    with pytest.raises(ValueError, match="limit is 3 sites"):
        exhaustive_ranking(synthetic, synthetic.sites, max_sites=3)


def test_fixed_and_reshuffled_cyclic_baselines(synthetic: SyntheticObjective) -> None:
    fixed = fixed_order_plan(synthetic.best_order, cycles=3)
    assert fixed.cycle_orders == (synthetic.best_order,) * 3 and not fixed.reshuffles
    cyclic = cyclic_random_plan(synthetic.sites, 4, seed=7)
    assert cyclic == cyclic_random_plan(synthetic.sites, 4, seed=7)
    assert cyclic.reshuffles and len(set(cyclic.cycle_orders)) > 1
    assert evaluate_plan(synthetic, cyclic).value < evaluate_plan(synthetic, fixed).value


def test_random_search_runs_the_same_space_at_the_same_trial_budget(
    synthetic: SyntheticObjective,
) -> None:
    study = random_search(synthetic, synthetic.default_space(), 15, seed=3)
    assert isinstance(study, OrderingStudy)
    records = study.history()
    assert len(records) == 15 and all(r.state == "COMPLETE" for r in records)
    assert len({r.plan.order for r in records if r.plan is not None}) >= 10
