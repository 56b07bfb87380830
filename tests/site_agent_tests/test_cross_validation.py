"""Cross-validation runs: seeded stratified folds, one model per fold, test data never read."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import torch

from site_agent.examples import Example, TabularExample
from site_agent.registry import RegisteredDataset, load_registered, register_dataset
from site_agent.tasks import (
    CrossValidatedTrainer,
    HopHyperparameters,
    TabularTrainer,
    TaskSpec,
    create_trainer,
)
from site_agent.tasks._cross_validation import split_folds
from site_agent.tasks._metrics import pool_metrics

SPEC = TaskSpec("tabular", labels=("0", "1"))
HP = HopHyperparameters(learning_rate=0.05, epochs=2.0, batch_size=8, seed=3)


def _write_rows(directory: Path, rows: int, seed: int, positive_share: float = 0.3) -> Path:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, 3))
    labels = (rng.random(rows) < positive_share).astype(int)
    lines = ["a,b,c,label"] + [
        f"{x[0]!r},{x[1]!r},{x[2]!r},{y}" for x, y in zip(features.tolist(), labels, strict=True)
    ]
    path = directory / f"rows-{seed}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trainer() -> TabularTrainer:
    created = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(created, TabularTrainer)
    return created


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> RegisteredDataset:
    directory = tmp_path_factory.mktemp("cv")
    source = _write_rows(directory, 103, seed=5)
    return register_dataset(
        directory / "registry",
        "rows",
        source,
        task_type="tabular",
        seed=11,
        validation_fraction=0.0,
        test_fraction=0.2,
    )


class _Untouchable(tuple[Example, ...]):
    """A split that fails the test the moment anything reads its rows."""

    def _touched(self, *_: object) -> NoReturn:
        raise AssertionError("the test split was read")

    __iter__ = _touched  # type: ignore[assignment]
    __len__ = _touched  # type: ignore[assignment]
    __getitem__ = _touched  # type: ignore[assignment]
    __bool__ = _touched  # type: ignore[assignment]


def _without_readable_test(dataset: RegisteredDataset) -> RegisteredDataset:
    return dataclasses.replace(dataset, test=_Untouchable(()))


def test_folds_are_fixed_by_the_registration(dataset: RegisteredDataset, tmp_path: Path) -> None:
    assert dataset.fold_ids(5) == dataset.fold_ids(5)
    # Registering the same bytes with the same seed elsewhere, or loading that registration
    # again, deals the same folds; another seed deals others.
    source = _write_rows(tmp_path, 103, seed=5)
    same = register_dataset(tmp_path / "a", "rows", source, task_type="tabular", seed=11,
                            validation_fraction=0.0, test_fraction=0.2)  # fmt: skip
    assert load_registered(tmp_path / "a", "rows").fold_ids(5) == dataset.fold_ids(5)
    other = register_dataset(tmp_path / "b", "rows", source, task_type="tabular", seed=12,
                             validation_fraction=0.0, test_fraction=0.2)  # fmt: skip
    assert same.fold_ids(5) == dataset.fold_ids(5)
    assert other.fold_ids(5) != dataset.fold_ids(5)
    assert dataset.fold_ids(4) != dataset.fold_ids(5)


@pytest.mark.parametrize("folds", [2, 3, 5, 10])
def test_folds_are_stratified_and_balanced(dataset: RegisteredDataset, folds: int) -> None:
    ids = dataset.fold_ids(folds)
    assert len(ids) == len(dataset.train)
    sizes = Counter(ids)
    assert set(sizes) == set(range(folds))
    assert max(sizes.values()) - min(sizes.values()) <= 1
    labels = [e.label for e in dataset.train if isinstance(e, TabularExample)]
    for label, total in Counter(labels).items():
        per_fold = Counter(f for f, y in zip(ids, labels, strict=True) if y == label)
        expected = total / folds
        assert all(abs(per_fold.get(f, 0) - expected) < 1 for f in range(folds)), (label, per_fold)


def test_fold_views_hold_out_every_training_row_exactly_once(dataset: RegisteredDataset) -> None:
    held_out: list[Example] = []
    for fold in range(5):
        view = dataset.fold_view(fold, 5)
        assert view.test == ()
        assert len(view.train) + len(view.validation) == len(dataset.train)
        assert not set(view.train) & set(view.validation) or len(set(dataset.train)) < len(
            dataset.train
        )
        held_out.extend(view.validation)
    assert Counter(held_out) == Counter(dataset.train)


def test_too_few_rows_or_folds_are_refused(dataset: RegisteredDataset) -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        dataset.fold_ids(1)
    tiny = dataclasses.replace(dataset, train=dataset.train[:3])
    with pytest.raises(ValueError, match="fewer than the 5 folds"):
        tiny.fold_ids(5)
    with pytest.raises(ValueError, match="not within"):
        dataset.fold_view(5, 5)


def test_each_fold_model_trains_on_its_view_and_is_scored_on_its_fold(
    trainer: TabularTrainer, dataset: RegisteredDataset
) -> None:
    cv = CrossValidatedTrainer(trainer, folds=5)
    outcome = cv.run_hop(SPEC, dataset, HP, None)
    declared = {t.name for t in cv.trainable_state(SPEC, dataset)}
    assert set(outcome.tensors) == declared
    assert declared == {f"fold{f}.linear.{p}" for f in range(5) for p in ("weight", "bias")}
    # Fold 2's model is exactly what the plain trainer makes on fold 2's view.
    direct = trainer.run_hop(SPEC, dataset.fold_view(2, 5), HP, None)
    for name, tensor in direct.tensors.items():
        assert torch.equal(outcome.tensors[f"fold2.{name}"], tensor)
    assert outcome.metrics["folds"] == 5
    assert outcome.metrics["examples"] == len(dataset.train)
    assert outcome.metrics["train_examples"] == len(dataset.train)

    scores = cv.evaluate(SPEC, dataset, "validation", outcome.tensors)
    assert scores["folds"] == 5 and scores["examples"] == len(dataset.train)
    per_fold = [
        trainer.evaluate(
            SPEC,
            dataset.fold_view(f, 5),
            "validation",
            {k.removeprefix(f"fold{f}."): v for k, v in outcome.tensors.items()
             if k.startswith(f"fold{f}.")},
        )
        for f in range(5)
    ]  # fmt: skip
    correct = sum(m["accuracy"] * m["examples"] for m in per_fold)
    assert scores["accuracy"] == pytest.approx(correct / len(dataset.train), abs=1e-12)
    assert scores["fold3.accuracy"] == per_fold[3]["accuracy"]
    # The hop's own metrics are the same cross-validated score of the models it made.
    assert outcome.metrics["accuracy"] == pytest.approx(scores["accuracy"], abs=1e-12)


def test_incoming_fold_models_continue_fold_by_fold(
    trainer: TabularTrainer, dataset: RegisteredDataset
) -> None:
    cv = CrossValidatedTrainer(trainer, folds=3)
    first = cv.run_hop(SPEC, dataset, HP, None)
    second = cv.run_hop(SPEC, dataset, HP, first.tensors)
    start = split_folds(first.tensors, 3)[1]
    direct = trainer.run_hop(SPEC, dataset.fold_view(1, 3), HP, start)
    for name, tensor in direct.tensors.items():
        assert torch.equal(second.tensors[f"fold1.{name}"], tensor)


def test_a_cross_validation_run_never_reads_a_test_split(
    trainer: TabularTrainer, dataset: RegisteredDataset
) -> None:
    guarded = _without_readable_test(dataset)
    cv = CrossValidatedTrainer(trainer, folds=5)
    outcome = cv.run_hop(SPEC, guarded, HP, None)
    cv.run_hop(SPEC, guarded, HP, outcome.tensors)
    cv.evaluate(SPEC, guarded, "validation", outcome.tensors)
    with pytest.raises(ValueError, match="validation only"):
        cv.evaluate(SPEC, dataset, "test", outcome.tensors)
    # The guard itself works: reading the split fails the test.
    with pytest.raises(AssertionError):
        list(guarded.test)


def test_a_site_with_enough_validation_rows_scores_on_them(
    trainer: TabularTrainer, tmp_path: Path
) -> None:
    source = _write_rows(tmp_path, 200, seed=8)
    big = register_dataset(tmp_path / "r", "big", source, task_type="tabular", seed=2,
                           validation_fraction=0.2, test_fraction=0.2)  # fmt: skip
    cv = CrossValidatedTrainer(trainer, folds=4, min_validation_rows=30)
    assert cv.uses_validation_split(big)
    outcome = cv.run_hop(SPEC, _without_readable_test(big), HP, None)
    scores = cv.evaluate(SPEC, big, "validation", outcome.tensors)
    assert scores["folds"] == 1
    assert scores["examples"] == len(big.validation)
    # Every fold model trained on the whole training split from the same seed: identical.
    folds = split_folds(outcome.tensors, 4)
    assert all(torch.equal(folds[0][k], folds[3][k]) for k in folds[0])
    assert not CrossValidatedTrainer(trainer, 4, len(big.validation) + 1).uses_validation_split(big)


def test_fold_checkpoints_must_hold_every_fold(
    trainer: TabularTrainer, dataset: RegisteredDataset
) -> None:
    cv = CrossValidatedTrainer(trainer, folds=3)
    tensors = cv.run_hop(SPEC, dataset, HP, None).tensors
    with pytest.raises(ValueError, match="same tensors"):
        split_folds({k: v for k, v in tensors.items() if not k.startswith("fold2.")}, 3)
    with pytest.raises(ValueError, match="none of the 3 folds"):
        split_folds({**tensors, "linear.weight": tensors["fold0.linear.weight"]}, 3)
    with pytest.raises(ValueError, match="none of the 3 folds"):
        cv.run_hop(SPEC, dataset, HP, {k.replace("fold", "fold9"): v for k, v in tensors.items()})


def test_fold_metrics_combine_by_examples() -> None:
    combined = pool_metrics(
        [
            {"accuracy": 1.0, "loss": 0.5, "examples": 3.0},
            {"accuracy": 0.0, "loss": 1.5, "examples": 1.0},
        ]
    )
    assert combined == {"accuracy": 0.75, "loss": 0.75, "examples": 4.0}
