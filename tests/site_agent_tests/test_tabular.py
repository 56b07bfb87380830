"""The tabular task: logistic regression / MLP in plain torch, FLamby's heart-disease setting."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from site_agent.examples import TabularExample
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.tasks import (
    HopHyperparameters,
    TabularTrainer,
    TaskSpec,
    architecture_sha256,
    create_trainer,
)
from tests.site_agent_tests.helpers import HEART_DISEASE_DIR

SPEC = TaskSpec("tabular", labels=("0", "1"))
CLASSIFICATION_KEYS = {"loss", "accuracy", "macro_f1", "examples", "auroc"}
TRAIN_KEYS = {"train_loss", "train_steps", "train_examples"}


@pytest.fixture(scope="module")
def trainer() -> TabularTrainer:
    created = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(created, TabularTrainer)
    return created


@pytest.fixture(scope="module")
def logistic_dataset(tmp_path_factory: pytest.TempPathFactory) -> RegisteredDataset:
    """A non-separable 3-feature logistic problem, registered from CSV."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(240, 3)) * np.array([1.0, 3.0, 0.5]) + np.array([0.0, 5.0, -1.0])
    logits = features @ np.array([1.5, -0.4, 2.0]) + 0.3
    labels = (rng.random(240) < 1 / (1 + np.exp(-logits))).astype(int)
    directory = tmp_path_factory.mktemp("logistic")
    lines = ["a,b,c,label"] + [
        f"{x[0]!r},{x[1]!r},{x[2]!r},{y}" for x, y in zip(features.tolist(), labels, strict=True)
    ]
    (directory / "rows.csv").write_text("\n".join(lines) + "\n")
    return register_dataset(
        directory / "registry", "rows", directory / "rows.csv", task_type="tabular", seed=1
    )


def _per_site_normalised(dataset: RegisteredDataset, split: str) -> np.ndarray:
    """FLamby's normalisation by hand: the site's train mean and (n-1) std, plus 1e-9."""
    train = np.array([e.features for e in dataset.train if isinstance(e, TabularExample)])
    rows = np.array([e.features for e in getattr(dataset, split)])
    mean = train.astype(np.float32).mean(axis=0)
    std = train.astype(np.float32).std(axis=0, ddof=1)
    normalised: np.ndarray = (rows.astype(np.float32) - mean) / (std + 1e-9)
    return normalised


def _labels(dataset: RegisteredDataset, split: str) -> np.ndarray:
    return np.array([int(e.label) for e in getattr(dataset, split)])


def test_full_batch_training_matches_scikit_learn_logistic_regression(
    trainer: TabularTrainer, logistic_dataset: RegisteredDataset
) -> None:
    n_train = len(logistic_dataset.train)
    hp = HopHyperparameters(
        learning_rate=0.1, steps=600, batch_size=n_train, max_grad_norm=0,
        lr_schedule="constant", seed=0,
    )  # fmt: skip

    outcome = trainer.run_hop(SPEC, logistic_dataset, hp, None)

    reference = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000)
    reference.fit(
        _per_site_normalised(logistic_dataset, "train"), _labels(logistic_dataset, "train")
    )
    np.testing.assert_allclose(
        outcome.tensors["linear.weight"].numpy()[0], reference.coef_[0], atol=1e-3
    )
    np.testing.assert_allclose(
        outcome.tensors["linear.bias"].numpy(), reference.intercept_, atol=1e-3
    )
    # The validation metrics are those of the same model, features normalised the same way.
    probabilities = reference.predict_proba(_per_site_normalised(logistic_dataset, "validation"))
    truth = _labels(logistic_dataset, "validation")
    assert outcome.metrics["accuracy"] == pytest.approx(
        float(((probabilities[:, 1] > 0.5) == truth).mean())
    )
    expected_loss = -np.mean(np.log(probabilities[np.arange(len(truth)), truth]))
    assert outcome.metrics["loss"] == pytest.approx(expected_loss, abs=1e-3)
    assert set(outcome.metrics) == CLASSIFICATION_KEYS | TRAIN_KEYS


def test_trainable_state_is_the_whole_model_and_matches_the_outcome(
    trainer: TabularTrainer, logistic_dataset: RegisteredDataset
) -> None:
    declared = trainer.trainable_state(SPEC, logistic_dataset)
    outcome = trainer.run_hop(SPEC, logistic_dataset, HopHyperparameters(steps=3), None)

    assert [(t.name, t.dtype, t.shape) for t in declared] == [
        ("linear.bias", "F32", (1,)),
        ("linear.weight", "F32", (1, 3)),
    ]
    assert list(outcome.tensors) == [t.name for t in declared]
    assert outcome.adapter_config == {
        "task_type": "tabular", "n_features": 3, "labels": ["0", "1"], "options": {},
    }  # fmt: skip


def test_architecture_hash_is_the_sha256_of_canonical_json(
    trainer: TabularTrainer, logistic_dataset: RegisteredDataset
) -> None:
    canonical = '{"labels":["0","1"],"n_features":3,"options":{},"task_type":"tabular"}'

    assert (
        trainer.model_sha256(SPEC, logistic_dataset)
        == hashlib.sha256(canonical.encode()).hexdigest()
    )
    assert trainer.base_model_sha256 == ""
    mlp = dataclasses.replace(SPEC, options={"model": "mlp", "hidden": [8]})
    assert architecture_sha256(mlp, 3) != architecture_sha256(SPEC, 3)
    assert architecture_sha256(SPEC, 4) != architecture_sha256(SPEC, 3)


def test_same_seed_is_bitwise_reproducible_and_incoming_weights_are_used(
    trainer: TabularTrainer, logistic_dataset: RegisteredDataset
) -> None:
    hp = HopHyperparameters(learning_rate=0.01, epochs=2, batch_size=8, seed=5)
    first = trainer.run_hop(SPEC, logistic_dataset, hp, None)
    again = trainer.run_hop(SPEC, logistic_dataset, hp, None)
    continued = trainer.run_hop(SPEC, logistic_dataset, hp, first.tensors)

    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert first.metrics == again.metrics
    assert first.metrics["train_steps"] == 2 * math.ceil(len(logistic_dataset.train) / 8)
    assert not torch.equal(continued.tensors["linear.weight"], first.tensors["linear.weight"])
    reloaded = trainer.evaluate(SPEC, logistic_dataset, "validation", first.tensors)
    assert reloaded == {key: first.metrics[key] for key in reloaded}


def test_a_large_proximal_term_keeps_the_model_near_the_incoming_weights(
    trainer: TabularTrainer, logistic_dataset: RegisteredDataset
) -> None:
    start = {"linear.weight": torch.zeros(1, 3), "linear.bias": torch.zeros(1)}
    hp = HopHyperparameters(learning_rate=0.05, steps=200, batch_size=64, lr_schedule="constant")

    free = trainer.run_hop(SPEC, logistic_dataset, hp, start)
    held = trainer.run_hop(
        SPEC, logistic_dataset, dataclasses.replace(hp, proximal_mu=100.0), start
    )

    assert float(held.tensors["linear.weight"].norm()) < 0.05 * float(
        free.tensors["linear.weight"].norm()
    )


def test_mlp_and_multiclass_models_train(
    trainer: TabularTrainer, logistic_dataset: RegisteredDataset
) -> None:
    mlp = TaskSpec("tabular", labels=("0", "1"), options={"model": "mlp", "hidden": [8, 4]})
    outcome = trainer.run_hop(mlp, logistic_dataset, HopHyperparameters(steps=5), None)
    three = TaskSpec("tabular", labels=("0", "1", "2"))
    multiclass = trainer.run_hop(three, logistic_dataset, HopHyperparameters(steps=5), None)

    assert [t.name for t in trainer.trainable_state(mlp, logistic_dataset)] == [
        "layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight",
        "layers.4.bias", "layers.4.weight",
    ]  # fmt: skip
    assert outcome.tensors["layers.4.weight"].shape == (1, 4)
    assert multiclass.tensors["linear.weight"].shape == (3, 3)
    assert "auroc" not in multiclass.metrics


def test_global_normalisation_uses_the_given_statistics(
    trainer: TabularTrainer, logistic_dataset: RegisteredDataset
) -> None:
    spec = TaskSpec(
        "tabular", labels=("0", "1"),
        options={"normalisation": "global", "mean": [0.0, 5.0, -1.0], "std": [1.0, 3.0, 0.5]},
    )  # fmt: skip
    weights = {"linear.weight": torch.tensor([[1.0, -1.0, 0.5]]), "linear.bias": torch.zeros(1)}

    metrics = trainer.evaluate(spec, logistic_dataset, "test", weights)

    rows = np.array([e.features for e in logistic_dataset.test if isinstance(e, TabularExample)])
    scaled = (rows - [0.0, 5.0, -1.0]) / (np.array([1.0, 3.0, 0.5]) + 1e-9)
    predicted = (scaled @ np.array([1.0, -1.0, 0.5]) > 0).astype(int)
    assert metrics["accuracy"] == pytest.approx(
        float((predicted == _labels(logistic_dataset, "test")).mean())
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "forest"}, "'model' must be one of"),
        ({"model": "mlp", "hidden": []}, "'hidden' must be a non-empty list"),
        ({"hidden": [4]}, "only applies to model 'mlp'"),
        ({"normalisation": "global", "mean": [0.0]}, "'mean' must be a list of 3 numbers"),
        ({"normalisation": "per-site", "std": [1, 1, 1]}, "only apply to normalisation 'global'"),
        ({"learning_rate": 1}, r"unknown tabular task option\(s\) \['learning_rate'\]"),
    ],
)
def test_bad_task_options_are_refused(
    trainer: TabularTrainer,
    logistic_dataset: RegisteredDataset,
    options: dict[str, object],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        trainer.run_hop(
            TaskSpec("tabular", labels=("0", "1"), options=options),
            logistic_dataset,
            HopHyperparameters(steps=1),
            None,
        )


def test_incoming_tensors_that_do_not_fit_are_refused(
    trainer: TabularTrainer, logistic_dataset: RegisteredDataset
) -> None:
    with pytest.raises(ValueError, match=r"'linear.weight' has shape \(1, 4\), expected \(1, 3\)"):
        trainer.run_hop(
            SPEC,
            logistic_dataset,
            HopHyperparameters(steps=1),
            {"linear.weight": torch.zeros(1, 4), "linear.bias": torch.zeros(1)},
        )
    with pytest.raises(ValueError, match=r"missing keys \['linear.bias'\]"):
        trainer.evaluate(SPEC, logistic_dataset, "test", {"linear.weight": torch.zeros(1, 3)})


@pytest.mark.skipif(not HEART_DISEASE_DIR.is_dir(), reason="shared heart-disease data not found")
def test_flamby_heart_disease_protocol_runs_on_one_hospital(
    tmp_path: Path, trainer: TabularTrainer
) -> None:
    # FLamby: Linear(13, 1) + sigmoid, BCE, Adam (AdamW without decay), lr 1e-3, batch 4.
    dataset = register_dataset(
        tmp_path, "cleveland", HEART_DISEASE_DIR / "processed.cleveland.data", task_type="tabular"
    )
    hp = HopHyperparameters(
        learning_rate=1e-3, epochs=5, batch_size=4, max_grad_norm=0, lr_schedule="constant",
        seed=42,
    )  # fmt: skip

    outcome = trainer.run_hop(SPEC, dataset, hp, None)
    test = trainer.evaluate(SPEC, dataset, "test", outcome.tensors)

    assert outcome.tensors["linear.weight"].shape == (1, 13)
    assert test["examples"] == 104
    assert set(test) == CLASSIFICATION_KEYS
    assert test["accuracy"] > 0.6  # well above the 0.54 majority rate of this test split
    json.dumps(outcome.adapter_config)
