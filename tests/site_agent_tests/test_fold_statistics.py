"""Per-fold statistics at a site: each fold's training part, its guards, and the fold models
of a cross-validation run normalised with their own fold's statistics."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.statistics import combine, fold_normaliser_options
from protocols.approval import ApprovalBundle
from protocols.statistics import FOLD_NORMALISERS_OPTION
from protocols.v1 import baton_pb2 as pb
from site_agent.examples import TabularExample, TextExample
from site_agent.registry import RegisteredDataset, load_registered, register_dataset
from site_agent.releases import (
    ReleaseLimits,
    ReleaseRefused,
    StatisticsReleases,
    answer_request,
)
from site_agent.simulation import pooled_normalisation_spec
from site_agent.statistics import BelowMinimumCount, compute_statistics, l2_sensitivity
from site_agent.tasks import (
    CrossValidatedTrainer,
    HopHyperparameters,
    TabularTrainer,
    TaskSpec,
    create_trainer,
)
from site_agent.tasks._cross_validation import fold_spec, split_folds
from tests.site_agent_tests.helpers import RecordingStub, statistics_agent


def _rows(count: int, seed: int, shift: float = 0.0) -> list[TabularExample]:
    rng = random.Random(seed)
    return [
        TabularExample(
            features=(rng.gauss(55 + shift, 8), rng.gauss(230 - shift, 40), rng.gauss(130, 15)),
            label=str(rng.randint(0, 1)),
        )
        for _ in range(count)
    ]


def _tabular(rows: list[TabularExample], name: str = "heart", seed: int = 0) -> RegisteredDataset:
    return RegisteredDataset(
        name=name, task_type="tabular", fingerprint="0" * 64, train=tuple(rows),
        validation=(), test=(), feature_names=("age", "chol", "bp"), labels=("0", "1"), seed=seed,
    )  # fmt: skip


def _matrix(rows: tuple[object, ...]) -> np.ndarray:
    return np.array([row.features for row in rows if isinstance(row, TabularExample)])


# ---- what a site releases -----------------------------------------------------------------------


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_each_folds_aggregates_are_those_of_its_cross_validation_training_rows(
    folds: int,
) -> None:
    dataset = _tabular(_rows(97, seed=1), seed=7)
    aggregates = compute_statistics(dataset, min_count=10, cv_folds=folds)

    assert [f.fold for f in aggregates.folds] == list(range(folds))
    for fold in aggregates.folds:
        # The rows fold k's model trains on in a cross-validation run (fold_view).
        training = _matrix(dataset.fold_view(fold.fold, folds).train)
        assert fold.count == len(training)
        np.testing.assert_allclose(fold.feature_sums, training.sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(fold.feature_sums_of_squares, (training**2).sum(axis=0),
                                   rtol=1e-12)  # fmt: skip
    # The global answer is unchanged by the folds; without cv_folds there are none.
    plain = compute_statistics(dataset, min_count=10)
    assert not plain.folds and dataclasses.replace(aggregates, folds=()) == plain
    # The folds follow the registration's seed, as cross-validation runs deal them.
    reseeded = compute_statistics(dataclasses.replace(dataset, seed=8), min_count=10,
                                  cv_folds=folds)  # fmt: skip
    assert reseeded.folds != aggregates.folds and reseeded.feature_sums == plain.feature_sums


def test_a_fold_smaller_than_the_minimum_is_refused_before_anything_is_computed(
    tmp_path: Path,
) -> None:
    dataset = _tabular(_rows(44, seed=2))
    with pytest.raises(BelowMinimumCount, match=(
        "dataset 'heart' has 44 training rows: with 5 folds its smallest fold holds 8, fewer "
        "than the 10 any released aggregate \\(or difference of two\\) must cover"
    )):  # fmt: skip
        compute_statistics(dataset, min_count=10, cv_folds=5)
    releases = StatisticsReleases(tmp_path / "releases.json")
    with pytest.raises(BelowMinimumCount, match="smallest fold holds 8"):
        answer_request(dataset, releases, min_count=10, cv_folds=5)
    assert not (tmp_path / "releases.json").exists()  # nothing released, nothing recorded
    assert len(compute_statistics(dataset, min_count=8, cv_folds=5).folds) == 5
    notes = RegisteredDataset(
        name="notes", task_type="seq-classification", fingerprint="0" * 64,
        train=tuple(TextExample(text="a b c", label=str(i % 2)) for i in range(60)),
        validation=(), test=(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="per-fold statistics are for tabular datasets"):
        compute_statistics(notes, min_count=10, cv_folds=3)


def test_fold_training_parts_are_guarded_and_recorded_against_differencing(
    tmp_path: Path,
) -> None:
    releases = StatisticsReleases(tmp_path / "releases.json")
    dataset = _tabular(_rows(60, seed=3))
    answer_request(dataset, releases, min_count=10, cv_folds=3)
    assert releases.spent("heart") == (1, 0.0)  # one answer, whatever the folds
    # The same request again: the same row sets, no differencing risk.
    answer_request(dataset, releases, min_count=10, cv_folds=3)

    # Fold 0's training part less 3 rows, under another name, would describe those 3 rows.
    part = dataset.fold_view(0, 3).train
    subset = _tabular(list(part[3:]), name="heart-subset")  # type: ignore[arg-type]
    with pytest.raises(ReleaseRefused, match="differ by 3 rows") as refused:
        answer_request(subset, releases, min_count=10)
    assert refused.value.code == "differencing-risk"
    # The released fold parts each differ from the split by a whole fold (20 rows): fine.
    assert releases.spent("heart") == (2, 0.0)


def test_fold_training_parts_are_checked_against_earlier_global_answers(tmp_path: Path) -> None:
    releases = StatisticsReleases(tmp_path / "releases.json")
    dataset = _tabular(_rows(60, seed=3))
    part = dataset.fold_view(0, 3).train
    answer_request(_tabular(list(part[3:]), name="heart-subset"), releases,  # type: ignore[arg-type]
                   min_count=10)  # fmt: skip
    # Fold 0's training part would differ from that global answer by 3 rows: refused.
    with pytest.raises(ReleaseRefused, match="differ by 3 rows") as refused:
        answer_request(dataset, releases, min_count=10, cv_folds=3)
    assert refused.value.code == "differencing-risk"
    # A global answer over the split itself differs from each training part by a whole fold.
    other = _tabular(_rows(60, seed=13), name="other")
    answer_request(other, releases, min_count=10)
    assert len(answer_request(other, releases, min_count=10, cv_folds=3).folds) == 3


def test_training_rows_are_released_per_fold_at_one_fold_count_only(tmp_path: Path) -> None:
    """Partitions at several fold counts each pass the differencing guard, but together their
    training parts nearly determine single rows: the first per-fold answer fixes the count."""
    releases = StatisticsReleases(tmp_path / "releases.json", ReleaseLimits(max_answers=3))
    dataset = _tabular(_rows(60, seed=3))
    answer_request(dataset, releases, min_count=10, cv_folds=3)

    with pytest.raises(ReleaseRefused) as refused:
        answer_request(dataset, releases, min_count=10, cv_folds=2)
    assert refused.value.code == "fold-count-released"
    assert str(refused.value) == (
        "per-fold statistics of the training rows of dataset 'heart' were already released at "
        "3 folds as dataset 'heart', and this site releases one fold partition per training "
        "set (several together would describe single rows): request --cv-folds 3, or "
        "re-register the dataset with a new split (`baton-site register --replace --seed N`) "
        "to choose again"
    )
    # The same rows under another name, or dealt by another seed at the same count: refused.
    with pytest.raises(ReleaseRefused, match="already released at 3 folds as dataset 'heart'"):
        answer_request(dataclasses.replace(dataset, name="heart-b"), releases, min_count=10,
                       cv_folds=5)  # fmt: skip
    with pytest.raises(ReleaseRefused, match=(
        "already released in another 3-fold partition \\(a registration with another seed\\)"
    )):  # fmt: skip
        answer_request(dataclasses.replace(dataset, seed=8), releases, min_count=10, cv_folds=3)
    assert releases.spent("heart") == (1, 0.0)  # refusals spend nothing
    assert releases.spent("heart-b") == (0, 0.0)

    # The released count again, and the global answer alone, are answered within the budget.
    again = answer_request(dataset, releases, min_count=10, cv_folds=3)
    assert len(again.folds) == 3
    assert not answer_request(dataset, releases, min_count=10).folds
    with pytest.raises(ReleaseRefused) as exhausted:
        answer_request(dataset, releases, min_count=10, cv_folds=3)
    assert exhausted.value.code == "statistics-budget-exhausted"


def test_a_dataset_re_registered_with_a_new_split_chooses_its_fold_count_anew(
    tmp_path: Path,
) -> None:
    rng = random.Random(9)
    lines = ["age,chol,label"] + [
        f"{rng.gauss(55, 8):.3f},{rng.gauss(230, 40):.3f},{rng.randint(0, 1)}" for _ in range(120)
    ]
    (tmp_path / "heart.csv").write_text("\n".join(lines) + "\n")
    releases = StatisticsReleases(tmp_path / "releases.json")

    def register(seed: int) -> RegisteredDataset:
        return register_dataset(tmp_path / "data", "heart", tmp_path / "heart.csv",
                                task_type="tabular", seed=seed, replace=True)  # fmt: skip

    answer_request(register(4), releases, min_count=10, cv_folds=3)
    # Re-registered with the same split: the same training rows, so the same fold count.
    with pytest.raises(ReleaseRefused, match="request --cv-folds 3"):
        answer_request(register(4), releases, min_count=10, cv_folds=2)
    # A new split holds other training rows: its first per-fold answer chooses again.
    assert len(answer_request(register(5), releases, min_count=10, cv_folds=2).folds) == 2
    with pytest.raises(ReleaseRefused, match="already released at 2 folds"):
        answer_request(register(5), releases, min_count=10, cv_folds=3)


def test_noised_per_fold_answers_are_charged_for_every_fold_a_row_is_in() -> None:
    dataset = _tabular(_rows(60, seed=4))
    plain = compute_statistics(dataset, min_count=10)
    folded = compute_statistics(dataset, min_count=10, cv_folds=3)
    bound = max(abs(v) for row in dataset.train for v in row.features)  # type: ignore[attr-defined]
    per_row = 3 * (bound**2 + bound**4)
    # A row is in 2 of the 3 fold training parts: 2 more (count, sums, squares) vectors move.
    assert l2_sensitivity(dataset, folded) ** 2 == pytest.approx(
        l2_sensitivity(dataset, plain) ** 2 + 2 * (1 + per_row)
    )
    noisy = compute_statistics(dataset, min_count=10, cv_folds=3, noise_std=1.0,
                               rng=np.random.default_rng(0))  # fmt: skip
    assert all(n.count != f.count for n, f in zip(noisy.folds, folded.folds, strict=True))


def test_the_site_answers_a_per_fold_task_and_refuses_one_that_differs_from_its_bundle(
    tmp_path: Path,
) -> None:
    agent = statistics_agent(tmp_path, csv_seed=5, dataset_seed=4)
    dataset = load_registered(tmp_path / "data", "heart")

    def task(bundle_folds: int, task_folds: int = 3) -> pb.StatisticsTask:
        bundle = ApprovalBundle.for_statistics("tabular", "heart", min_count=10, noise_std=0.0,
                                               cv_folds=bundle_folds)  # fmt: skip
        return pb.StatisticsTask(
            statistics_id="s1", lease_token="t", task_type="tabular", dataset="heart",
            min_count=10, approval_bundle_json=bundle.canonical_json(),
            expires_at=int(time.time() + 3600), cv_folds=task_folds,
        )  # fmt: skip

    stub = RecordingStub()
    agent._run_statistics(stub, task(3))  # type: ignore[arg-type]
    agent._run_statistics(stub, task(0))  # type: ignore[arg-type]
    # What an agent that predates per-fold statistics sees: no cv_folds field, a bundle with it.
    agent._run_statistics(stub, task(3, task_folds=0))  # type: ignore[arg-type]
    agent._run_statistics(stub, task(2, task_folds=2))  # type: ignore[arg-type]
    answered, refused, old, other_count = stub.results
    assert answered.ok and [f.fold for f in answered.folds] == [0, 1, 2]
    expected = compute_statistics(dataset, min_count=10, cv_folds=3)
    assert [f.count for f in answered.folds] == [f.count for f in expected.folds]
    assert list(answered.folds[2].feature_sums) == list(expected.folds[2].feature_sums)
    assert (refused.ok, refused.error_code) == (False, "not-approved")
    assert not refused.folds
    assert (old.ok, old.error_code, old.error_message) == (
        False, "not-approved", "the statistics request differs from its bundle")  # fmt: skip
    assert not old.count and not old.folds
    # Another fold count over rows released per fold at 3: refused in one line, nothing sent.
    assert (other_count.ok, other_count.error_code) == (False, "fold-count-released")
    assert "were already released at 3 folds" in other_count.error_message
    assert "\n" not in other_count.error_message and not other_count.folds


# ---- the twin computes the real system's per-fold normalisers -----------------------------------


def test_the_in_process_twins_fold_normalisers_equal_the_statistics_rounds() -> None:
    """The twin (benchmarks/heart_disease_paired.py's ``global`` setting fits
    ``pooled_normalisation_spec`` on each fold's views) against the real round: each site's
    ``compute_statistics`` answer pooled by the coordinator's ``combine``."""
    sites = [
        _tabular(_rows(n, seed=10 + i, shift=7.0 * i), name=f"site-{i}", seed=3)
        for i, n in enumerate((64, 41, 87))
    ]
    folds = 4
    answers = [
        dataclasses.replace(compute_statistics(d, min_count=5, cv_folds=folds), site=d.name)
        for d in sites
    ]
    real = combine(answers, cv_folds=folds)
    base = TaskSpec("tabular", labels=("0", "1"), options={"model": "logistic"})

    for fold in real.folds:
        twin = pooled_normalisation_spec(base, [d.fold_view(fold.fold, folds) for d in sites])
        np.testing.assert_allclose(twin.options["mean"], fold.mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(twin.options["std"], fold.std, rtol=0, atol=1e-9)
    twin = pooled_normalisation_spec(base, sites)
    np.testing.assert_allclose(twin.options["mean"], real.mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(twin.options["std"], real.std, rtol=0, atol=1e-9)


# ---- fold k's model uses fold k's normaliser ----------------------------------------------------


@pytest.fixture(scope="module")
def trainer() -> TabularTrainer:
    created = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(created, TabularTrainer)
    return created


def test_fold_models_train_and_score_with_their_own_folds_normaliser(
    trainer: TabularTrainer,
) -> None:
    folds = 3
    dataset = _tabular(_rows(75, seed=6), seed=2)
    combined = combine(
        [dataclasses.replace(compute_statistics(dataset, min_count=10, cv_folds=folds),
                             site="s")],
        cv_folds=folds,
    )  # fmt: skip
    options = {"model": "logistic", "normalisation": "global", "mean": list(combined.mean),
               "std": list(combined.std), **fold_normaliser_options(combined)}  # fmt: skip
    spec = TaskSpec("tabular", labels=("0", "1"), options=options)
    glob = TaskSpec(
        "tabular",
        labels=("0", "1"),
        options={k: v for k, v in options.items() if k != FOLD_NORMALISERS_OPTION},
    )
    for fold in range(folds):
        assert fold_spec(spec, fold, folds).options == {
            **glob.options, "mean": list(combined.folds[fold].mean),
            "std": list(combined.folds[fold].std)}  # fmt: skip
    assert fold_spec(glob, 1, folds) is glob

    cv = CrossValidatedTrainer(trainer, folds)
    hp = HopHyperparameters(learning_rate=0.05, steps=6, batch_size=8, seed=1)
    outcome = cv.run_hop(spec, dataset, hp, None)
    assert outcome.adapter_config["options"] == options  # the run's, not the last fold's
    per_fold = split_folds(outcome.tensors, folds)
    scored = cv.evaluate(spec, dataset, "validation", outcome.tensors)
    for fold in range(folds):
        view = dataset.fold_view(fold, folds)
        own = trainer.evaluate(fold_spec(spec, fold, folds), view, "validation", per_fold[fold])
        assert scored[f"fold{fold}.loss"] == own["loss"]
        assert scored[f"fold{fold}.loss"] != trainer.evaluate(glob, view, "validation",
                                                              per_fold[fold])["loss"]  # fmt: skip
        # The same training as the inner trainer with the fold's normaliser, fold by fold.
        alone = trainer.run_hop(fold_spec(spec, fold, folds), view, hp, None)
        for name, tensor in alone.tensors.items():
            assert torch.equal(per_fold[fold][name], tensor)
    assert cv.model_sha256(spec, dataset) == trainer.model_sha256(glob, dataset)

    bad = dataclasses.replace(spec, options={**options, FOLD_NORMALISERS_OPTION: [{"mean": [0]}]})
    with pytest.raises(ValueError, match="must list 3 normalisers \\(one per fold\\)"):
        cv.run_hop(bad, dataset, hp, None)
    with pytest.raises(ValueError, match="must list 3 normalisers"):
        cv.model_sha256(bad, dataset)
    per_site = dataclasses.replace(spec, options={**options, "normalisation": "per-site"})
    with pytest.raises(ValueError, match="needs normalisation 'global'"):
        cv.evaluate(per_site, dataset, "validation", outcome.tensors)
