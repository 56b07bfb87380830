"""A hop's model is built over the cached base model's weights (shared, never cloned) and trains
exactly as on a deep copy of the base; a write into the shared weights is refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import site_agent.tasks._lora_trainer as lora_trainer
from site_agent._tiny_model import TINY_CAUSAL_LM_TARGET_MODULES
from site_agent.registry import RegisteredDataset
from site_agent.tasks import HopHyperparameters, HopOutcome, LoraSettings, TaskSpec, create_trainer
from site_agent.tasks._spec import Trainer

FIRST = HopHyperparameters(learning_rate=1e-2, steps=3, batch_size=8, seed=11)
SECOND = HopHyperparameters(learning_rate=5e-3, steps=3, batch_size=4, seed=12, proximal_mu=0.5)


def _classification(labels: tuple[str, ...]) -> TaskSpec:
    return TaskSpec(
        "seq-classification",
        labels=labels,
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),
        options={"max_length": 24},
    )


CAUSAL = TaskSpec(
    "causal-lm",
    lora=LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=TINY_CAUSAL_LM_TARGET_MODULES),
    options={"max_length": 48},
)


def _frozen_storage(trainer: Trainer, spec: TaskSpec) -> list[set[int]]:
    """Where the frozen base weights of two adapter models built side by side live."""
    models = [trainer.adapter_model(spec, None) for _ in range(2)]  # type: ignore[attr-defined]
    return [
        {
            parameter.data_ptr()
            for name, parameter in model.named_parameters()
            if not parameter.requires_grad and "classifier" not in name and "score" not in name
        }
        for model in models
    ]


def _hops(
    trainer: Trainer, spec: TaskSpec, dataset: RegisteredDataset
) -> tuple[HopOutcome, HopOutcome, dict[str, float]]:
    first = trainer.run_hop(spec, dataset, FIRST, None)
    second = trainer.run_hop(spec, dataset, SECOND, first.tensors)
    evaluation = trainer.evaluate(spec, dataset, "validation", second.tensors)
    return first, second, evaluation


@pytest.mark.parametrize("task", ["seq-classification", "causal-lm"])
def test_hops_share_the_base_weights_and_train_exactly_as_on_a_deep_copy(
    task: str,
    tiny_model_dir: Path,
    tiny_causal_lm_dir: Path,
    labels: tuple[str, ...],
    site_datasets: list[RegisteredDataset],
    instruction_dataset: RegisteredDataset,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if task == "causal-lm":
        spec, directory, dataset = CAUSAL, tiny_causal_lm_dir, instruction_dataset
    else:
        spec, directory, dataset = _classification(labels), tiny_model_dir, site_datasets[0]
    with monkeypatch.context() as patched:  # the earlier way: a deep copy of the base per hop
        patched.setattr(lora_trainer, "private_copy", copy.deepcopy)
        reference = create_trainer(task, base_model_dir=directory, device="cpu")
        expected = _hops(reference, spec, dataset)
        copies = _frozen_storage(reference, spec)
        assert copies[0] and not copies[0] & copies[1]  # deep copies: storage of their own
    trainer = create_trainer(task, base_model_dir=directory, device="cpu")

    actual = _hops(trainer, spec, dataset)

    for want, got in zip(expected[:2], actual[:2], strict=True):
        assert want.metrics == got.metrics
        assert want.tensors.keys() == got.tensors.keys()
        for name, tensor in want.tensors.items():
            assert torch.equal(tensor, got.tensors[name]), name
    assert expected[2] == actual[2]
    # Two models built after those hops: the same frozen storage, the cached base's.
    shared = _frozen_storage(trainer, spec)
    assert shared[0] and shared[0] == shared[1]


def test_a_write_into_the_shared_base_weights_is_refused_at_the_next_copy(
    tiny_model_dir: Path, labels: tuple[str, ...]
) -> None:
    spec = _classification(labels)
    trainer = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    model = trainer.adapter_model(spec, None)  # type: ignore[attr-defined]
    frozen = next(p for n, p in model.named_parameters() if "embeddings" in n)
    trainer.adapter_model(spec, None)  # type: ignore[attr-defined]  # unchanged: fine

    with torch.no_grad():
        frozen.add_(1.0)

    with pytest.raises(ValueError, match="base model held in memory was written in place"):
        trainer.adapter_model(spec, None)  # type: ignore[attr-defined]
