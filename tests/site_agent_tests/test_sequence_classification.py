"""The seq-classification task: reproducibility, hand-over between hops, refusal of bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from site_agent._synthetic import generate_site_records
from site_agent._tiny_model import write_tiny_base_model
from site_agent.registry import RegisteredDataset
from site_agent.tasks import (
    HopCancelled,
    HopHyperparameters,
    HopOutcome,
    LoraSettings,
    SequenceClassificationTrainer,
    TaskSpec,
    create_trainer,
    hash_base_model,
)

LORA = LoraSettings(r=4, alpha=8)
MAX_LENGTH = 32
HYPERPARAMETERS = HopHyperparameters(learning_rate=1e-2, steps=6, batch_size=8, seed=3)
METRIC_KEYS = {
    "loss",
    "accuracy",
    "macro_f1",
    "examples",
    "train_loss",
    "train_steps",
    "train_examples",
}


@pytest.fixture(scope="module")
def spec(labels: tuple[str, ...]) -> TaskSpec:
    return TaskSpec(
        "seq-classification", labels=labels, lora=LORA, options={"max_length": MAX_LENGTH}
    )


@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path) -> SequenceClassificationTrainer:
    created = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    assert isinstance(created, SequenceClassificationTrainer)
    return created


@pytest.fixture(scope="module")
def first_hop(
    trainer: SequenceClassificationTrainer, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> HopOutcome:
    return trainer.run_hop(spec, site_datasets[0], HYPERPARAMETERS, None)


def _tensors_equal(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_hop_trains_and_reports_finite_metrics(
    trainer: SequenceClassificationTrainer, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    dataset = site_datasets[0]
    calls: list[tuple[int, int, float]] = []

    outcome = trainer.run_hop(
        spec,
        dataset,
        HYPERPARAMETERS,
        None,
        progress=lambda step, total, loss: calls.append((step, total, loss)),
    )

    assert set(outcome.metrics) == METRIC_KEYS  # three labels: no AUROC
    assert all(math.isfinite(value) for value in outcome.metrics.values())
    assert outcome.metrics["examples"] == len(dataset.validation)
    assert outcome.metrics["train_examples"] == len(dataset.train)
    assert outcome.metrics["train_steps"] == HYPERPARAMETERS.steps
    assert 0.0 <= outcome.metrics["accuracy"] <= 1.0
    assert 0.0 <= outcome.metrics["macro_f1"] <= 1.0
    assert [step for step, _, _ in calls] == list(range(1, HYPERPARAMETERS.steps + 1))
    assert all(total == HYPERPARAMETERS.steps for _, total, _ in calls)
    assert outcome.metrics["train_loss"] == pytest.approx(
        sum(loss for _, _, loss in calls) / len(calls)
    )
    assert outcome.train_started_at_ns <= outcome.train_finished_at_ns


def test_outcome_tensors_match_the_declared_trainable_state(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    declared = trainer.trainable_state(spec, site_datasets[0])

    assert [t.name for t in declared] == sorted(first_hop.tensors)
    for tensor_spec in declared:
        tensor = first_hop.tensors[tensor_spec.name]
        assert tensor_spec.dtype == "F32"
        assert tuple(tensor.shape) == tensor_spec.shape
        assert tensor.device.type == "cpu"
        assert tensor.dtype == torch.float32
        assert tensor.is_contiguous()
        assert not tensor.requires_grad
    assert any("lora_A" in key for key in first_hop.tensors)
    assert any("classifier" in key for key in first_hop.tensors)
    assert trainer.model_sha256(spec, site_datasets[0]) == trainer.base_model_sha256


def test_adapter_config_is_json_and_not_tied_to_a_local_path(first_hop: HopOutcome) -> None:
    config = json.loads(json.dumps(first_hop.adapter_config))

    assert config["base_model_name_or_path"] == ""
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "SEQ_CLS"
    assert config["r"] == LORA.r
    assert config["target_modules"] == sorted(LORA.target_modules)


def test_same_seed_gives_bitwise_identical_tensors(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    again = trainer.run_hop(spec, site_datasets[0], HYPERPARAMETERS, None)
    other_seed = dataclasses.replace(HYPERPARAMETERS, seed=4)
    different = trainer.run_hop(spec, site_datasets[0], other_seed, None)

    assert _tensors_equal(again.tensors, first_hop.tensors)
    assert again.metrics == first_hop.metrics
    assert not _tensors_equal(different.tensors, first_hop.tensors)


def test_second_hop_starts_from_the_incoming_adapter(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    # Loading hop 1's tensors reproduces exactly the model hop 1 ended with.
    reloaded = trainer.evaluate(spec, site_datasets[0], "validation", first_hop.tensors)
    assert reloaded == {key: first_hop.metrics[key] for key in reloaded}

    second = trainer.run_hop(spec, site_datasets[1], HYPERPARAMETERS, first_hop.tensors)
    from_scratch = trainer.run_hop(spec, site_datasets[1], HYPERPARAMETERS, None)

    assert second.tensors.keys() == first_hop.tensors.keys()
    assert not _tensors_equal(second.tensors, first_hop.tensors)
    assert not _tensors_equal(second.tensors, from_scratch.tensors)


def test_incoming_tensors_are_not_modified_by_training(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    snapshot = {key: tensor.clone() for key, tensor in first_hop.tensors.items()}

    trainer.run_hop(spec, site_datasets[2], HYPERPARAMETERS, first_hop.tensors)

    assert _tensors_equal(first_hop.tensors, snapshot)


def test_evaluation_on_the_test_split_counts_test_examples(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    metrics = trainer.evaluate(spec, site_datasets[0], "test", first_hop.tensors)

    assert metrics["examples"] == len(site_datasets[0].test)
    assert set(metrics) == {"loss", "accuracy", "macro_f1", "examples"}


def test_predictions_are_the_rows_behind_the_reported_accuracy(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    dataset = site_datasets[0]
    predicted = trainer.predict(spec, dataset, "test", first_hop.tensors)
    targets = [spec.labels.index(example.label) for example in dataset.test]  # type: ignore[union-attr]
    accuracy = trainer.evaluate(spec, dataset, "test", first_hop.tensors)["accuracy"]
    assert len(predicted) == len(dataset.test)
    assert sum(p == t for p, t in zip(predicted, targets, strict=True)) / len(targets) == (
        pytest.approx(accuracy, abs=1e-12)
    )


def test_binary_task_reports_auroc(
    trainer: SequenceClassificationTrainer, site_datasets: list[RegisteredDataset]
) -> None:
    kept = ("cardiac", "respiratory")
    dataset = site_datasets[0]
    binary = dataclasses.replace(
        dataset,
        train=tuple(e for e in dataset.train if getattr(e, "label", None) in kept),
        validation=tuple(e for e in dataset.validation if getattr(e, "label", None) in kept),
    )
    spec = TaskSpec("seq-classification", labels=kept, lora=LORA, options={"max_length": 32})

    outcome = trainer.run_hop(spec, binary, HYPERPARAMETERS, None)

    assert 0.0 <= outcome.metrics["auroc"] <= 1.0


def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(
    tmp_path: Path,
    tiny_model_dir: Path,
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    labels: tuple[str, ...],
    first_hop: HopOutcome,
) -> None:
    save_file(first_hop.tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(first_hop.adapter_config))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    validation = site_datasets[0].validation
    texts = [example.text for example in validation]
    inputs = tokenizer(
        texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    trainer_model = trainer.adapter_model(spec, first_hop.tensors).eval()

    with torch.no_grad():
        expected = trainer_model(**inputs).logits
        actual = loaded(**inputs).logits

    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    targets = torch.tensor([labels.index(e.label) for e in validation])
    loss = torch.nn.functional.cross_entropy(actual, targets).item()
    assert loss == pytest.approx(first_hop.metrics["loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        ("unexpected", r"unexpected keys \['base_model.model.extra.lora_A.weight'\]"),
        ("missing", r"missing keys \['base_model.model.classifier.bias'\]"),
        ("shape", r"base_model.model.classifier.bias.*has shape \(4,\), expected \(3,\)"),
    ],
)
def test_incoming_adapter_that_does_not_fit_is_refused(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
    mutation: str,
    message: str,
) -> None:
    incoming = dict(first_hop.tensors)
    if mutation == "unexpected":
        incoming["base_model.model.extra.lora_A.weight"] = torch.zeros(4, 32)
    elif mutation == "missing":
        del incoming["base_model.model.classifier.bias"]
    else:
        incoming["base_model.model.classifier.bias"] = torch.zeros(4)

    with pytest.raises(ValueError, match=message):
        trainer.run_hop(spec, site_datasets[1], HYPERPARAMETERS, incoming)


def test_incoming_adapter_of_another_rank_is_refused(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    other_rank = dataclasses.replace(spec, lora=LoraSettings(r=2))

    with pytest.raises(ValueError, match="has shape"):
        trainer.run_hop(other_rank, site_datasets[1], HYPERPARAMETERS, first_hop.tensors)


def test_incoming_adapter_with_nan_is_refused(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    incoming = dict(first_hop.tensors)
    key = next(k for k in incoming if "lora_B" in k)
    poisoned = incoming[key].clone()
    poisoned[0, 0] = float("nan")
    incoming[key] = poisoned

    with pytest.raises(ValueError, match=r"non-finite values in \[.*lora_B"):
        trainer.run_hop(spec, site_datasets[1], HYPERPARAMETERS, incoming)
    with pytest.raises(ValueError, match="non-finite"):
        trainer.evaluate(spec, site_datasets[1], "validation", incoming)


def test_diverging_training_raises(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    first_hop: HopOutcome,
) -> None:
    # Finite but huge head weights overflow the logits, so the very first loss is not finite.
    incoming = dict(first_hop.tensors)
    incoming["base_model.model.classifier.weight"] = torch.full_like(
        incoming["base_model.model.classifier.weight"], 3e38
    )

    with pytest.raises(ValueError, match="training diverged"):
        trainer.run_hop(spec, site_datasets[1], HYPERPARAMETERS, incoming)


def test_cancellation_stops_the_hop_between_steps(
    trainer: SequenceClassificationTrainer, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    steps_done: list[int] = []

    with pytest.raises(HopCancelled, match="after 2 of 6 steps"):
        trainer.run_hop(
            spec,
            site_datasets[0],
            HYPERPARAMETERS,
            None,
            progress=lambda step, total, loss: steps_done.append(step),
            should_cancel=lambda: len(steps_done) >= 2,
        )
    assert steps_done == [1, 2]


def test_examples_with_a_label_outside_the_run_are_refused(
    trainer: SequenceClassificationTrainer, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    two_labels = dataclasses.replace(spec, labels=("cardiac", "respiratory"))

    with pytest.raises(ValueError, match="not in the run's label set"):
        trainer.run_hop(two_labels, site_datasets[0], HYPERPARAMETERS, None)


def test_unknown_task_option_and_too_long_max_length_are_refused(
    trainer: SequenceClassificationTrainer, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    with pytest.raises(
        ValueError, match=r"unknown seq-classification task option\(s\) \['maxlen'\]"
    ):
        trainer.run_hop(
            dataclasses.replace(spec, options={"maxlen": 8}),
            site_datasets[0],
            HYPERPARAMETERS,
            None,
        )
    with pytest.raises(ValueError, match="max_length must be <= 128"):
        trainer.run_hop(
            dataclasses.replace(spec, options={"max_length": 4096}),
            site_datasets[0],
            HYPERPARAMETERS,
            None,
        )


def test_hop_leaves_the_callers_random_state_alone(
    trainer: SequenceClassificationTrainer, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    before = torch.get_rng_state()

    trainer.run_hop(spec, site_datasets[0], HYPERPARAMETERS, None)

    assert torch.equal(torch.get_rng_state(), before)


def test_base_model_hash_is_the_sha256_of_the_weights_file(
    tiny_model_dir: Path, trainer: SequenceClassificationTrainer
) -> None:
    expected = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()

    assert hash_base_model(tiny_model_dir) == expected
    assert trainer.base_model_sha256 == expected


def test_sharded_weights_hash_covers_names_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second")
    original = hash_base_model(tmp_path)

    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"secone")

    assert hash_base_model(tmp_path) != original
    with pytest.raises(FileNotFoundError):
        hash_base_model(tmp_path / "missing")


def test_tiny_model_is_deterministic_and_loads_offline(tmp_path: Path) -> None:
    first = write_tiny_base_model(tmp_path / "a", words=["zebra"], seed=5)
    second = write_tiny_base_model(tmp_path / "b", words=["zebra"], seed=5)

    for name in ("config.json", "model.safetensors", "vocab.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    model = AutoModelForSequenceClassification.from_pretrained(first, num_labels=3)
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert model.config.hidden_size == 32
    assert tokenizer.tokenize("Zebra reports chest pain") == ["zebra", "reports", "chest", "pain"]


def test_tiny_tokenizer_covers_the_synthetic_vocabulary(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [
        record["text"]
        for site in range(4)
        for record in generate_site_records(site, 4, n=50, seed=1)
    ]

    encoded = tokenizer(texts)["input_ids"]

    assert all(tokenizer.unk_token_id not in ids for ids in encoded)
