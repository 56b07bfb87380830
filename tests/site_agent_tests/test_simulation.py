"""In-process baselines with the sites' own trainer: sequential, pooled, FedAvg on Flower, CV."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from site_agent.examples import Example, TabularExample
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.simulation import (
    HopRecord,
    SequentialResult,
    collapse_reason,
    cross_validate,
    cross_validate_cycles,
    cyclic_visits,
    divergence_reason,
    evaluate_sites,
    pool_metrics,
    pooled_dataset,
    pooled_normalisation_spec,
    pooled_normaliser,
    prediction_shares,
    train_fedavg,
    train_local,
    train_pooled,
    train_sequential,
)
from site_agent.tasks import HopHyperparameters, TabularTrainer, TaskSpec, create_trainer
from tests.site_agent_tests.helpers import HEART_DISEASE_DIR

SPEC = TaskSpec("tabular", labels=("0", "1"))
HP = HopHyperparameters(learning_rate=0.05, steps=6, batch_size=8, seed=3)
FEATURES = ("a", "b", "c")
WEIGHTS = np.array([1.5, -1.0, 0.7])


@pytest.fixture(scope="module")
def trainer() -> TabularTrainer:
    created = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(created, TabularTrainer)
    return created


def _rows(n: int, shift: float, scale: float, seed: int) -> tuple[TabularExample, ...]:
    """Non-separable logistic rows; ``shift``/``scale`` move the site's feature distribution."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, len(FEATURES))) * scale + shift
    logits = (features - shift) / scale @ WEIGHTS
    labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(int)
    return tuple(
        TabularExample(tuple(float(v) for v in row), str(label))
        for row, label in zip(features, labels, strict=True)
    )


def _site(
    name: str, n_train: int, *, shift: float = 0.0, scale: float = 1.0, seed: int = 0
) -> RegisteredDataset:
    rows = _rows(n_train + 10, shift, scale, seed)
    return RegisteredDataset(
        name=name,
        task_type="tabular",
        fingerprint=name * 4,
        train=rows[:n_train],
        validation=rows[n_train : n_train + 4],
        test=rows[n_train + 4 :],
        feature_names=FEATURES,
        labels=("0", "1"),
    )


@pytest.fixture(scope="module")
def sites() -> list[RegisteredDataset]:
    """Three sites of different sizes and feature distributions."""
    return [
        _site("north", 24, seed=1),
        _site("south", 64, shift=2.0, scale=3.0, seed=2),
        _site("east", 40, shift=-1.0, scale=0.5, seed=3),
    ]


@pytest.fixture(scope="module")
def registered_sites(tmp_path_factory: pytest.TempPathFactory) -> list[RegisteredDataset]:
    """Two sites registered from CSV through the real registry."""
    directory = tmp_path_factory.mktemp("csv-sites")
    datasets = []
    for index, (shift, scale) in enumerate(((0.0, 1.0), (1.0, 2.0))):
        rows = _rows(50, shift, scale, seed=10 + index)
        path = directory / f"site{index}.csv"
        lines = [",".join((*FEATURES, "label"))]
        lines += [",".join([*(repr(v) for v in r.features), r.label]) for r in rows]
        path.write_text("\n".join(lines) + "\n")
        datasets.append(
            register_dataset(
                directory / "registry",
                f"site{index}",
                path,
                task_type="tabular",
                validation_fraction=0.0,
                seed=index,
            )
        )
    return datasets


def _close(left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor]) -> bool:
    return sorted(left) == sorted(right) and all(
        torch.allclose(left[k], right[k], rtol=0, atol=1e-6) for k in left
    )


def _equal(left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor]) -> bool:
    return sorted(left) == sorted(right) and all(torch.equal(left[k], right[k]) for k in left)


def _weighted_mean(
    tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        key: sum(
            (t[key].double() * (w / total) for t, w in zip(tensors, weights, strict=True)),
            torch.zeros_like(tensors[0][key], dtype=torch.float64),
        ).float()
        for key in tensors[0]
    }


# ---- sequential, local, pooled ---------------------------------------------------------------


def test_sequential_schedule_is_run_hop_chained_by_hand(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    second = dataclasses.replace(HP, learning_rate=0.02, seed=9)
    visits = [(sites[0], HP), (sites[1], second), (sites[0], HP), (sites[2], second)]

    result = train_sequential(trainer, SPEC, visits)

    tensors = None
    for dataset, hp in visits:
        tensors = trainer.run_hop(SPEC, dataset, hp, tensors).tensors
    assert tensors is not None
    assert _equal(result.tensors, tensors)
    assert [v.site for v in result.visits] == ["north", "south", "north", "east"]
    assert [v.metrics["train_examples"] for v in result.visits] == [24, 64, 24, 40]
    assert "accuracy" in result.visits[0].metrics  # the hop's validation score is kept


def test_sequential_schedule_starts_from_given_tensors(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    start = train_local(trainer, SPEC, sites[2], HP).tensors

    result = train_sequential(trainer, SPEC, [(sites[0], HP)], incoming=start)

    assert _equal(result.tensors, trainer.run_hop(SPEC, sites[0], HP, start).tensors)
    assert not _equal(result.tensors, train_local(trainer, SPEC, sites[0], HP).tensors)
    with pytest.raises(ValueError, match="at least one visit"):
        train_sequential(trainer, SPEC, [])


def test_cyclic_visits_repeat_the_sites_in_plan_order(sites: list[RegisteredDataset]) -> None:
    visits = cyclic_visits(sites, HP, cycles=2)

    assert [d.name for d, _ in visits] == ["north", "south", "east"] * 2
    assert all(hp is HP for _, hp in visits)
    with pytest.raises(ValueError):
        cyclic_visits(sites, HP, cycles=0)


def test_pooled_dataset_concatenates_train_and_validation_rows_and_has_no_test(
    sites: list[RegisteredDataset],
) -> None:
    pooled = pooled_dataset(sites, name="all")

    assert pooled.name == "all"
    assert pooled.train == sites[0].train + sites[1].train + sites[2].train
    assert len(pooled.train) == 24 + 64 + 40
    assert len(pooled.validation) == 3 * 4
    assert pooled.test == ()
    assert pooled.feature_names == FEATURES
    assert pooled.labels == ("0", "1")
    assert pooled.fingerprint != pooled_dataset(sites[::-1]).fingerprint


def test_pooled_dataset_refuses_mismatched_or_repeated_sites(
    sites: list[RegisteredDataset],
) -> None:
    other_features = dataclasses.replace(sites[1], feature_names=("x", "y", "z"))
    with pytest.raises(ValueError, match="other features"):
        pooled_dataset([sites[0], other_features])
    with pytest.raises(ValueError, match="unique"):
        pooled_dataset([sites[0], sites[0]])
    with pytest.raises(ValueError):
        pooled_dataset([])


def test_pooled_normaliser_is_torch_mean_and_std_of_all_train_rows(
    sites: list[RegisteredDataset],
) -> None:
    mean, std = pooled_normaliser(sites)

    matrix = torch.tensor(
        [e.features for s in sites for e in s.train if isinstance(e, TabularExample)],
        dtype=torch.float64,
    )
    assert matrix.shape == (128, 3)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), matrix.mean(0), atol=1e-6)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), matrix.std(0), atol=1e-6)
    # Sample (n - 1) standard deviation, as torch.std and FLamby use.
    assert not torch.allclose(
        torch.tensor(std, dtype=torch.float64), matrix.std(0, correction=0), atol=1e-6
    )


def test_pooled_training_normalises_with_the_pooled_statistics(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    consistent = pooled_normalisation_spec(SPEC, sites)

    per_site = train_pooled(trainer, SPEC, sites, HP)
    global_ = train_pooled(trainer, consistent, sites, HP)

    assert consistent.options["normalisation"] == "global"
    assert _close(per_site.tensors, global_.tensors)  # one normaliser, rounded two ways
    assert per_site.metrics["train_examples"] == 128


def test_consistent_evaluation_scores_a_site_as_part_of_the_pool(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    tensors = train_pooled(trainer, SPEC, sites, dataclasses.replace(HP, steps=30)).tensors

    flamby = evaluate_sites(trainer, SPEC, tensors, sites, "test")
    consistent = evaluate_sites(
        trainer, pooled_normalisation_spec(SPEC, sites), tensors, sites, "test"
    )

    assert list(flamby) == ["north", "south", "east"]
    # Consistent: site south's test rows normalised exactly as the pooled training rows were.
    pool_with_south_test = dataclasses.replace(pooled_dataset(sites), test=sites[1].test)
    reference = trainer.evaluate(SPEC, pool_with_south_test, "test", tensors)
    assert consistent["south"] == pytest.approx(reference, abs=1e-6)
    # FLamby's: each site uses its own train statistics, so a shifted site scores differently.
    assert flamby["south"]["loss"] != pytest.approx(consistent["south"]["loss"], abs=1e-4)
    assert flamby["north"] == trainer.evaluate(SPEC, sites[0], "test", tensors)


# ---- FedAvg on Flower ------------------------------------------------------------------------


def test_one_fedavg_round_is_the_example_weighted_mean_of_each_sites_hop(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    initial = train_local(trainer, SPEC, sites[2], HP).tensors

    result = train_fedavg(trainer, SPEC, sites, rounds=1, hyperparameters=HP, initial=initial)

    hops = [trainer.run_hop(SPEC, site, HP, initial).tensors for site in sites]
    assert _close(result.tensors, _weighted_mean(hops, [24, 64, 40]))
    assert not _close(result.tensors, _weighted_mean(hops, [1, 1, 1]))
    (round_,) = result.rounds
    assert round_.round == 1
    assert [h.site for h in round_.hops] == ["north", "south", "east"]
    losses = [h.metrics["train_loss"] for h in round_.hops]
    expected_loss = sum(loss * n for loss, n in zip(losses, [24, 64, 40], strict=True)) / 128
    assert round_.train_metrics == {"train_loss": pytest.approx(expected_loss, rel=1e-6)}
    assert round_.evaluation == {}


def test_fedavg_aggregates_with_flowers_own_code(
    trainer: TabularTrainer, sites: list[RegisteredDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.serverapp.strategy.fedavg as flower_fedavg
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    calls: list[int] = []

    def spy(records: list[RecordDict], weighted_by_key: str) -> ArrayRecord:
        calls.append(len(records))
        assert weighted_by_key == "num-examples"
        return aggregate_arrayrecords(records, weighted_by_key)

    monkeypatch.setattr(flower_fedavg, "aggregate_arrayrecords", spy)

    train_fedavg(trainer, SPEC, sites, rounds=3, hyperparameters=HP)

    assert calls == [3, 3, 3]


def test_fedavg_with_one_site_is_sequential_training_on_it(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    federated = train_fedavg(trainer, SPEC, sites[:1], rounds=3, hyperparameters=HP)
    sequential = train_sequential(trainer, SPEC, cyclic_visits(sites[:1], HP, cycles=3))

    assert _equal(federated.tensors, sequential.tensors)
    assert [r.hops[0].metrics for r in federated.rounds] == [v.metrics for v in sequential.visits]


def test_fedavg_without_initial_tensors_starts_every_site_from_the_shared_seed(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    result = train_fedavg(trainer, SPEC, sites[:2], rounds=1, hyperparameters=HP)

    hops = [trainer.run_hop(SPEC, site, HP, None).tensors for site in sites[:2]]
    assert _close(result.tensors, _weighted_mean(hops, [24, 64]))
    with pytest.raises(ValueError, match="same seed"):
        train_fedavg(
            trainer,
            SPEC,
            sites[:2],
            rounds=1,
            hyperparameters=lambda round_, site: dataclasses.replace(HP, seed=int(site == "north")),
        )


def test_fedavg_asks_the_schedule_for_each_round_and_site(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    asked: list[tuple[int, str]] = []

    def schedule(server_round: int, site: str) -> HopHyperparameters:
        asked.append((server_round, site))
        return dataclasses.replace(HP, seed=server_round, steps=2 + server_round)

    result = train_fedavg(trainer, SPEC, sites[:2], rounds=2, hyperparameters=schedule)

    assert sorted(set(asked)) == [(1, "north"), (1, "south"), (2, "north"), (2, "south")]
    assert [[h.metrics["train_steps"] for h in r.hops] for r in result.rounds] == [[3, 3], [4, 4]]


def test_fedavg_records_each_sites_score_of_every_rounds_global_model(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    result = train_fedavg(
        trainer, SPEC, sites, rounds=2, hyperparameters=HP, evaluate_split="validation"
    )

    assert [list(r.evaluation) for r in result.rounds] == [["north", "south", "east"]] * 2
    final = evaluate_sites(trainer, SPEC, result.tensors, sites, "validation")
    assert result.rounds[-1].evaluation == final
    assert result.rounds[0].evaluation != final


def test_fedprox_keeps_client_updates_near_the_global_model(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    initial = train_local(trainer, SPEC, sites[0], HP).tensors
    strong = dataclasses.replace(HP, learning_rate=0.2, steps=20)

    def distance(mu: float) -> float:
        hp = dataclasses.replace(strong, proximal_mu=mu)
        tensors = train_fedavg(
            trainer, SPEC, sites, rounds=1, hyperparameters=hp, initial=initial
        ).tensors
        return sum(float((tensors[k] - initial[k]).pow(2).sum()) for k in tensors)

    assert distance(10.0) < 0.5 * distance(0.0)


def test_fedavg_is_reproducible_and_leaves_the_global_random_generator_alone(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    random.seed(1234)
    state = random.getstate()

    first = train_fedavg(trainer, SPEC, sites, rounds=2, hyperparameters=HP)
    assert random.getstate() == state
    second = train_fedavg(trainer, SPEC, sites, rounds=2, hyperparameters=HP)

    assert _equal(first.tensors, second.tensors)
    assert first.rounds == second.rounds


def test_a_failing_site_stops_fedavg_instead_of_being_averaged_away(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    row = sites[1].train[0]
    assert isinstance(row, TabularExample)
    broken = dataclasses.replace(
        sites[1], train=(*sites[1].train, TabularExample(row.features, "2"))
    )

    with pytest.raises(ValueError, match="not in the run's label set"):
        train_fedavg(trainer, SPEC, [sites[0], broken], rounds=1, hyperparameters=HP)


def test_fedavg_refuses_bad_arguments(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    with pytest.raises(ValueError, match="rounds"):
        train_fedavg(trainer, SPEC, sites, rounds=0, hyperparameters=HP)
    with pytest.raises(ValueError, match="unique"):
        train_fedavg(trainer, SPEC, [sites[0], sites[0]], rounds=1, hyperparameters=HP)


# ---- cross-validation ------------------------------------------------------------------------


class _Untouchable(tuple[Example, ...]):
    """A test split that fails the test if anything reads it."""

    def __iter__(self) -> Iterator[Example]:
        raise AssertionError("the test split was read")

    def __len__(self) -> int:
        raise AssertionError("the test split was read")

    def __getitem__(self, index: object) -> Example:  # type: ignore[override]
        raise AssertionError("the test split was read")

    def __bool__(self) -> bool:
        raise AssertionError("the test split was read")


def test_cross_validation_holds_out_every_train_row_once_and_never_reads_test(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    guarded = [dataclasses.replace(site, test=_Untouchable()) for site in sites]
    seen: list[list[RegisteredDataset]] = []

    def schedule(views: Sequence[RegisteredDataset]) -> Mapping[str, torch.Tensor]:
        seen.append(list(views))
        return train_sequential(trainer, SPEC, cyclic_visits(views, HP)).tensors

    result = cross_validate(trainer, SPEC, guarded, 4, schedule)

    assert result.folds == 4 and len(seen) == 4 and len(result.per_fold) == 4
    for index, site in enumerate(sites):
        views = [fold[index] for fold in seen]
        assert all(view.name == site.name and view.test == () for view in views)
        held_out = Counter(row for view in views for row in view.validation)
        assert held_out == Counter(site.train)
        for view in views:
            assert Counter(view.train) + Counter(view.validation) == Counter(site.train)
        assert result.sites[site.name]["examples"] == len(site.train)


def test_cross_validation_pools_folds_into_out_of_fold_scores(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    result = cross_validate(
        trainer, SPEC, sites, 3, lambda views: train_pooled(trainer, SPEC, views, HP).tensors
    )

    for site in sites:
        folds = [fold[site.name] for fold in result.per_fold]
        correct = sum(f["accuracy"] * f["examples"] for f in folds)
        assert result.sites[site.name]["accuracy"] == pytest.approx(correct / len(site.train))
    accuracies = [result.sites[s.name]["accuracy"] for s in sites]
    assert result.mean["accuracy"] == pytest.approx(sum(accuracies) / 3)
    assert result.mean["examples"] == result.pooled["examples"] == 128
    weighted = sum(a * len(s.train) for a, s in zip(accuracies, sites, strict=True)) / 128
    assert result.pooled["accuracy"] == pytest.approx(weighted)


def test_cross_validation_scores_with_the_spec_built_from_the_fold_views(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    trained_on: list[Sequence[RegisteredDataset]] = []
    scored_with: list[Sequence[RegisteredDataset]] = []

    def schedule(views: Sequence[RegisteredDataset]) -> Mapping[str, torch.Tensor]:
        trained_on.append(views)
        return train_pooled(trainer, SPEC, views, HP).tensors

    def consistent(views: Sequence[RegisteredDataset]) -> TaskSpec:
        scored_with.append(views)
        return pooled_normalisation_spec(SPEC, views)

    result = cross_validate(trainer, SPEC, sites, 2, schedule, evaluation_spec=consistent)

    assert [list(v) for v in scored_with] == [list(v) for v in trained_on]
    fold = trained_on[1]
    tensors = train_pooled(trainer, SPEC, fold, HP).tensors
    expected = evaluate_sites(trainer, consistent(fold), tensors, fold, "validation")
    assert result.per_fold[1] == expected


def test_cross_validated_fedavg_on_registered_sites_is_reproducible(
    trainer: TabularTrainer, registered_sites: list[RegisteredDataset]
) -> None:
    def fedavg(views: Sequence[RegisteredDataset]) -> Mapping[str, torch.Tensor]:
        return train_fedavg(trainer, SPEC, views, rounds=2, hyperparameters=HP).tensors

    first = cross_validate(trainer, SPEC, registered_sites, 3, fedavg)
    second = cross_validate(trainer, SPEC, registered_sites, 3, fedavg)

    assert first == second
    assert set(first.sites) == {"site0", "site1"}
    assert first.pooled["examples"] == sum(len(s.train) for s in registered_sites)


def test_cross_validation_refuses_more_folds_than_rows(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    tiny = dataclasses.replace(sites[0], train=sites[0].train[:3])

    with pytest.raises(ValueError, match="fewer than"):
        cross_validate(trainer, SPEC, [tiny], 4, lambda views: {})


def test_pool_metrics_sums_counts_and_weights_the_rest() -> None:
    pooled = pool_metrics(
        [
            {"accuracy": 1.0, "loss": 0.2, "auroc": 0.9, "examples": 1.0},
            {"accuracy": 0.5, "loss": 0.8, "examples": 3.0},
        ]
    )
    assert pooled == pytest.approx({"accuracy": 0.625, "loss": 0.65, "auroc": 0.9, "examples": 4.0})
    lm = pool_metrics(
        [
            {"loss": 1.0, "perplexity": math.e, "examples": 5.0, "tokens": 10.0},
            {"loss": 2.0, "perplexity": math.e**2, "examples": 1.0, "tokens": 30.0},
        ]
    )
    assert lm["loss"] == pytest.approx(1.75)
    assert lm["perplexity"] == pytest.approx(math.exp(1.75))
    assert (lm["examples"], lm["tokens"]) == (6.0, 40.0)
    with pytest.raises(ValueError):
        pool_metrics([])


# ---- the shared heart-disease data -----------------------------------------------------------

CENTERS = ("cleveland", "hungarian", "switzerland", "va")


@pytest.mark.skipif(not HEART_DISEASE_DIR.is_dir(), reason="shared heart-disease data not found")
def test_heart_disease_baselines_run_on_flambys_four_centers(
    tmp_path: Path, trainer: TabularTrainer
) -> None:
    centers = [
        register_dataset(
            tmp_path,
            name,
            HEART_DISEASE_DIR / f"processed.{name}.data",
            task_type="tabular",
            fmt="heart-disease",
            validation_fraction=0.0,
        )
        for name in CENTERS
    ]
    hp = HopHyperparameters(
        learning_rate=1e-3, epochs=1, batch_size=4, max_grad_norm=0, lr_schedule="constant",
        seed=42,
    )  # fmt: skip

    pooled = train_pooled(trainer, SPEC, centers, hp).tensors
    flamby = evaluate_sites(trainer, SPEC, pooled, centers, "test")
    consistent = evaluate_sites(
        trainer, pooled_normalisation_spec(SPEC, centers), pooled, centers, "test"
    )
    federated = train_fedavg(trainer, SPEC, centers, rounds=2, hyperparameters=hp)

    assert [flamby[c]["examples"] for c in CENTERS] == [104, 89, 16, 45]  # FLamby's test sizes
    assert set(consistent) == set(CENTERS)
    assert sorted(federated.tensors) == ["linear.bias", "linear.weight"]
    assert federated.tensors["linear.weight"].shape == (1, 13)


# ---- collapse, divergence and forgetting -------------------------------------------------------


def _constant(tensors: Mapping[str, torch.Tensor], bias: float) -> dict[str, torch.Tensor]:
    """The same model with every weight zero and the given bias: one class for every row."""
    return {
        name: torch.full_like(t, bias) if name.endswith("bias") else torch.zeros_like(t)
        for name, t in tensors.items()
    }


def test_prediction_shares_are_the_share_of_rows_predicted_as_each_label(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    tensors = train_sequential(trainer, SPEC, cyclic_visits(sites, HP)).tensors
    site = dataclasses.replace(sites[1], validation=sites[1].train[:20])
    shares = prediction_shares(trainer, SPEC, tensors, site, "validation")
    predicted_one = 0
    for row in site.validation:
        one = dataclasses.replace(site, validation=(dataclasses.replace(row, label="1"),))
        predicted_one += int(trainer.evaluate(SPEC, one, "validation", tensors)["accuracy"])
    assert shares["1"] == pytest.approx(predicted_one / 20)
    assert shares["0"] == pytest.approx(1 - predicted_one / 20)


def test_a_constant_predictor_is_reported_as_collapsed_and_a_trained_model_is_not(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    tensors = train_sequential(trainer, SPEC, cyclic_visits(sites, HP)).tensors
    assert collapse_reason(trainer, SPEC, tensors, sites, "test") is None
    reason = collapse_reason(trainer, SPEC, _constant(tensors, 10.0), sites, "test")
    assert reason == "collapsed: predicts label '1' for every one of the 18 test rows of 3 site(s)"


def test_cross_validation_names_a_collapsed_schedule_and_keeps_its_scores(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    def collapsing(views: Sequence[RegisteredDataset]) -> Mapping[str, torch.Tensor]:
        return _constant(train_sequential(trainer, SPEC, cyclic_visits(views, HP)).tensors, -10)

    result = cross_validate(trainer, SPEC, sites, 2, collapsing)
    assert result.failure_reason is not None
    assert result.failure_reason.startswith("fold 0: collapsed: predicts label '0'")
    assert set(result.sites) == {s.name for s in sites}
    unguarded = cross_validate(trainer, SPEC, sites, 2, collapsing, guard=False)
    assert unguarded.failure_reason is None
    healthy = cross_validate(
        trainer, SPEC, sites, 2, lambda v: train_sequential(trainer, SPEC, cyclic_visits(v, HP))
    )
    assert healthy.failure_reason is None


def test_divergence_is_a_non_finite_loss_or_ten_times_a_chance_predictors() -> None:
    def visits(*losses: float) -> list[HopRecord]:
        return [HopRecord("north", {"train_loss": loss}) for loss in losses]

    # An easy first site's tiny loss is no reference: 0.03 then 0.6 has not diverged.
    assert divergence_reason(visits(0.03, 0.6, 6.9), labels=2) is None
    grown = divergence_reason(visits(0.7, 0.6, 7.5), labels=2)
    assert grown == (
        "diverged: train loss 7.5 at visit 3 (north) is above 10 times a chance predictor's 0.6931"
    )
    assert divergence_reason(visits(0.7, 7.5), labels=3) is None  # bound 10 ln 3
    assert divergence_reason(visits(0.7, math.inf), labels=2) == (
        "diverged: train loss inf at visit 2 (north)"
    )


def test_cross_validation_scores_each_visit_out_of_fold_and_measures_forgetting(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    results: list[SequentialResult] = []

    def schedule(views: Sequence[RegisteredDataset]) -> SequentialResult:
        results.append(train_sequential(trainer, SPEC, cyclic_visits(views, HP, cycles=2)))
        return results[-1]

    result = cross_validate(trainer, SPEC, sites, 3, schedule)
    assert [site for site, _ in result.visits] == [s.name for s in sites] * 2
    for index, (_site, metrics) in enumerate(result.visits):
        hops = [r.visits[index].metrics for r in results]
        correct = sum(h["accuracy"] * h["examples"] for h in hops)
        assert metrics["accuracy"] == pytest.approx(correct / sum(h["examples"] for h in hops))
        assert metrics["examples"] == len(sites[index % 3].train)
    forgetting = result.forgetting()
    for site in sites:
        best = max(v for s, v in result.visit_scores() if s == site.name)
        assert forgetting[site.name] == pytest.approx(best - result.sites[site.name]["accuracy"])


# ---- cross-validation cycle by cycle (the twin's per-cycle reports) ----------------------------


def _cycles(sites: Sequence[RegisteredDataset]) -> list[list[tuple[str, HopHyperparameters]]]:
    first = [(site.name, HP) for site in sites]
    second = [(site.name, dataclasses.replace(HP, seed=HP.seed + 1)) for site in reversed(sites)]
    return [first, second]


def test_cross_validation_cycle_by_cycle_equals_the_whole_schedule_and_reports_each_cycle(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    cycles = _cycles(sites)
    by_name = {site.name: site for site in sites}

    def whole(views: Sequence[RegisteredDataset]) -> SequentialResult:
        named = {view.name: view for view in views}
        return train_sequential(trainer, SPEC, [(named[s], hp) for c in cycles for s, hp in c])

    expected = cross_validate(trainer, SPEC, sites, 2, whole)
    reported: list[tuple[int, float]] = []
    staged = cross_validate_cycles(
        trainer, SPEC, sites, 2, cycles, after_cycle=lambda c, v: reported.append((c, v))
    )

    assert staged == expected
    assert [c for c, _ in reported] == [0, 1]
    assert reported[1][1] == pytest.approx(expected.mean["accuracy"])
    # The value after cycle 0 is the CV score of the one-cycle schedule.
    one_cycle = cross_validate_cycles(trainer, SPEC, sites, 2, cycles[:1])
    assert reported[0][1] == pytest.approx(one_cycle.mean["accuracy"])
    assert len(staged.visits) == 2 * len(by_name)


def test_cross_validation_hop_by_hop_equals_the_whole_schedule_and_reports_each_hop(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    cycles = _cycles(sites)
    by_cycle: list[tuple[int, float]] = []
    whole = cross_validate_cycles(
        trainer, SPEC, sites, 2, cycles, after_cycle=lambda c, v: by_cycle.append((c, v))
    )
    by_hop: list[tuple[int, int, float]] = []
    also: list[tuple[int, float]] = []
    staged = cross_validate_cycles(
        trainer,
        SPEC,
        sites,
        2,
        cycles,
        after_cycle=lambda c, v: also.append((c, v)),
        after_hop=lambda c, h, v: by_hop.append((c, h, v)),
    )

    assert staged == whole
    n = len(sites)
    assert [(c, h) for c, h, _ in by_hop] == [(h // n, h) for h in range(2 * n)]
    # After a cycle's last hop the value is that cycle's; after hop 0, the CV score of the
    # one-visit schedule.
    assert [by_hop[n - 1][2], by_hop[-1][2]] == pytest.approx([v for _, v in by_cycle])
    assert [c for c, _ in also] == [0, 1]
    assert [v for _, v in also] == pytest.approx([v for _, v in by_cycle])
    first_visit = cross_validate_cycles(trainer, SPEC, sites, 2, [cycles[0][:1]])
    assert by_hop[0][2] == pytest.approx(first_visit.mean["accuracy"])


class _Stop(Exception):
    pass


def _counting_hops(trainer: TabularTrainer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sites of the hops ``trainer`` trains from now on, in order."""
    hops: list[str] = []
    run_hop = trainer.run_hop

    def counting(spec: TaskSpec, dataset: RegisteredDataset, *args: object) -> object:
        hops.append(dataset.name)
        return run_hop(spec, dataset, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "run_hop", counting)
    return hops


def test_cross_validation_hop_by_hop_stops_training_when_the_report_raises(
    trainer: TabularTrainer, sites: list[RegisteredDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = _counting_hops(trainer, monkeypatch)

    def stop(cycle: int, hop: int, value: float) -> None:
        if hop == 1:
            raise _Stop(f"pruned after hop {hop}")

    with pytest.raises(_Stop, match="after hop 1"):
        cross_validate_cycles(trainer, SPEC, sites, 2, _cycles(sites), after_hop=stop)
    assert len(hops) == 2 * 2  # two hops in each of the 2 folds, no more


def test_cross_validation_cycle_by_cycle_stops_training_when_the_report_raises(
    trainer: TabularTrainer, sites: list[RegisteredDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = _counting_hops(trainer, monkeypatch)

    def stop(cycle: int, value: float) -> None:
        raise _Stop(f"pruned after cycle {cycle}")

    with pytest.raises(_Stop, match="after cycle 0"):
        cross_validate_cycles(trainer, SPEC, sites, 2, _cycles(sites), after_cycle=stop)
    assert len(hops) == 2 * len(sites)  # one cycle in each of the 2 folds, no more


def test_cross_validation_cycle_by_cycle_trains_each_fold_with_its_own_spec(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    trained_with: list[list[str]] = []

    def fold_normaliser(views: Sequence[RegisteredDataset]) -> TaskSpec:
        trained_with.append([f"{v.name}:{len(v.train)}" for v in views])
        return pooled_normalisation_spec(SPEC, views)

    cross_validate_cycles(trainer, SPEC, sites, 2, _cycles(sites), training_spec=fold_normaliser)
    folds = [[f"{v.name}:{len(v.train)}" for v in (s.fold_view(f, 2) for s in sites)]
             for f in range(2)]  # fmt: skip
    # Built from each fold's views (its training rows only), once per cycle and fold.
    assert trained_with == [folds[0], folds[1], folds[0], folds[1]]


def test_cross_validation_cycle_by_cycle_refuses_an_unknown_site_or_an_empty_cycle(
    trainer: TabularTrainer, sites: list[RegisteredDataset]
) -> None:
    with pytest.raises(ValueError, match="unknown sites: nowhere"):
        cross_validate_cycles(trainer, SPEC, sites, 2, [[("nowhere", HP)]])
    with pytest.raises(ValueError, match="at least one visit"):
        cross_validate_cycles(trainer, SPEC, sites, 2, [[(sites[0].name, HP)], []])
