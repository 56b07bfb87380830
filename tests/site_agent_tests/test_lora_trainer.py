"""The LoRA trainer is pinned: the same seed gives the same adapter bytes and metrics.

The expected values were computed before the two LoRA tasks were moved onto one trainer, so a
refactor that changes what a hop produces (RNG order, head init, loss, schedule, proximal term)
fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from site_agent.registry import RegisteredDataset
from site_agent.tasks import (
    HopHyperparameters,
    LoraSettings,
    LoraTrainer,
    SequenceClassificationTrainer,
    TaskSpec,
    create_trainer,
)
from site_agent.tasks._device import ComputeDevice
from site_agent.tasks._lora_trainer import Features
from site_agent.tasks._sequence_classification import SequenceClassificationTask

FIRST = HopHyperparameters(learning_rate=1e-2, steps=5, batch_size=8, seed=11, warmup_steps=1)
# The second hop exercises the incoming adapter, the proximal term and the constant schedule.
SECOND = HopHyperparameters(
    learning_rate=5e-3, steps=4, batch_size=4, seed=12, proximal_mu=0.5, lr_schedule="constant"
)


def _sha256(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(save(tensors)).hexdigest()


def _config_sha256(config: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def test_sequence_classification_hops_are_pinned(
    tiny_model_dir: Path, labels: tuple[str, ...], site_datasets: list[RegisteredDataset]
) -> None:
    trainer = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    spec = TaskSpec(
        "seq-classification",
        labels=labels,
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),
        options={"max_length": 24},
    )
    dataset = site_datasets[1]

    first = trainer.run_hop(spec, dataset, FIRST, None)
    second = trainer.run_hop(spec, dataset, SECOND, first.tensors)
    evaluated = trainer.evaluate(spec, dataset, "test", second.tensors)
    assert isinstance(trainer, SequenceClassificationTrainer)
    predicted = trainer.predict(spec, dataset, "test", second.tensors)

    assert _sha256(first.tensors) == (
        "b249c0e73fbdf08950892adb5511a401c87fa8d9838ebf6b005064efaabb9db7"
    )
    assert first.metrics == {
        "loss": 1.0874139070510864,
        "accuracy": 0.375,
        "macro_f1": 0.1818181818181818,
        "examples": 8.0,
        "train_loss": 1.1863804101943969,
        "train_steps": 5.0,
        "train_examples": 24.0,
    }
    assert _sha256(second.tensors) == (
        "338fa07bccd80d1a186f636a67f94a5a460fa0be6b03369578d4854eb1cc8e5d"
    )
    assert second.metrics == {
        "loss": 1.1048327684402466,
        "accuracy": 0.25,
        "macro_f1": 0.13333333333333333,
        "examples": 8.0,
        "train_loss": 1.004578709602356,
        "train_steps": 4.0,
        "train_examples": 24.0,
    }
    assert _config_sha256(second.adapter_config) == (
        "38c40bd8a6233b3808cc0f40d43449f67306d34418db8cc59485f8494dad89d9"
    )
    assert evaluated == {
        "loss": 1.1111102104187012,
        "accuracy": 0.375,
        "macro_f1": 0.27777777777777773,
        "examples": 8.0,
    }
    assert predicted == [2, 1, 2, 1, 2, 1, 2, 1]


def test_causal_lm_hops_are_pinned(
    tiny_causal_lm_dir: Path, instruction_dataset: RegisteredDataset
) -> None:
    trainer = create_trainer("causal-lm", base_model_dir=tiny_causal_lm_dir, device="cpu")
    spec = TaskSpec(
        "causal-lm",
        lora=LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj")),
        options={"max_length": 40},
    )

    first = trainer.run_hop(spec, instruction_dataset, FIRST, None)
    second = trainer.run_hop(spec, instruction_dataset, SECOND, first.tensors)
    evaluated = trainer.evaluate(spec, instruction_dataset, "test", second.tensors)

    assert _sha256(first.tensors) == (
        "77fc36a7af164a4fd62a65b1fff03a408cdcffd32a59e86ba8fa0898ba411097"
    )
    assert first.metrics == {
        "loss": 6.156619262695313,
        "perplexity": 471.8302413306756,
        "examples": 8.0,
        "tokens": 80.0,
        "train_loss": 6.537137603759765,
        "train_steps": 5.0,
        "train_examples": 24.0,
    }
    assert _sha256(second.tensors) == (
        "10cd020a6ad7c582f2af49bbf813e07f50d4830fec991d51d8e284478191a8df"
    )
    assert second.metrics == {
        "loss": 5.851916122436523,
        "perplexity": 347.90036191312254,
        "examples": 8.0,
        "tokens": 80.0,
        "train_loss": 6.150836110115051,
        "train_steps": 4.0,
        "train_examples": 24.0,
    }
    assert _config_sha256(second.adapter_config) == (
        "cc9370bfef4bd17b0b71bc5d327e487c792e41661f74a0e15bd9f2fe405c02a2"
    )
    assert evaluated == {
        "loss": 6.097342681884766,
        "perplexity": 444.67455693637817,
        "examples": 8.0,
        "tokens": 80.0,
    }


class _RecordingTask(SequenceClassificationTask):
    """Text classification that records what the trainer asks of it, in order."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)
        self.calls: list[tuple[str, int, bool]] = []

    def prepare_base(self, base: PreTrainedModel, seed: int) -> None:
        self.calls.append(("prepare_base", seed, base.training))
        super().prepare_base(base, seed)

    def loss(
        self,
        model: PeftModel,
        features: Features,
        targets: torch.Tensor,
        index: torch.Tensor,
        compute: ComputeDevice,
    ) -> torch.Tensor:
        self.calls.append(("loss", len(index), model.training))
        return super().loss(model, features, targets, index, compute)

    def evaluate(
        self,
        model: PeftModel,
        spec: TaskSpec,
        features: Features,
        targets: torch.Tensor,
        compute: ComputeDevice,
    ) -> dict[str, float]:
        self.calls.append(("evaluate", len(targets), model.training))
        return super().evaluate(model, spec, features, targets, compute)


def test_the_lora_trainer_drives_a_task_through_its_hooks(
    tiny_model_dir: Path, labels: tuple[str, ...], site_datasets: list[RegisteredDataset]
) -> None:
    built: list[_RecordingTask] = []

    def recording_task(tokenizer: PreTrainedTokenizerBase) -> _RecordingTask:
        built.append(_RecordingTask(tokenizer))
        return built[-1]

    trainer = LoraTrainer(tiny_model_dir, recording_task, device="cpu")
    spec = TaskSpec("seq-classification", labels=labels, options={"max_length": 16})
    dataset = site_datasets[1]
    assert len(dataset.train) % FIRST.batch_size == 0  # every batch is full

    outcome = trainer.run_hop(spec, dataset, FIRST, None)

    (task,) = built
    # The head is seeded from the hop's seed on the (evaluation-mode) base copy; every step
    # scores one batch of a model in training mode; validation runs once, in evaluation mode.
    assert task.calls == [
        ("prepare_base", FIRST.seed, False),
        *[("loss", FIRST.batch_size, True)] * FIRST.steps,
        ("evaluate", len(dataset.validation), False),
    ]
    assert outcome.metrics["train_steps"] == FIRST.steps
    assert [t.name for t in trainer.trainable_state(spec, dataset)] == list(outcome.tensors)


def test_a_lora_trainer_refuses_another_task_type(
    tiny_model_dir: Path, site_datasets: list[RegisteredDataset]
) -> None:
    trainer = LoraTrainer(tiny_model_dir, SequenceClassificationTask, device="cpu")
    spec = TaskSpec("causal-lm", lora=LoraSettings(target_modules=("query", "value")))

    with pytest.raises(ValueError, match="runs seq-classification tasks, not 'causal-lm'"):
        trainer.run_hop(spec, site_datasets[0], FIRST, None)


def test_the_cpu_runs_forward_passes_without_autocast() -> None:
    compute = ComputeDevice.resolve("cpu")

    assert compute.device == torch.device("cpu")
    assert compute.autocast_dtype is None
    assert not compute.fp16


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_unavailable_cuda_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device 'cuda:1' requested but CUDA is not available"):
        ComputeDevice.resolve("cuda:1")


class _Scale(torch.nn.Module):
    def forward(self, values: torch.Tensor, factor: float) -> SimpleNamespace:
        return SimpleNamespace(logits=values * factor)


def test_logits_are_the_models_output_for_the_batch_and_options() -> None:
    compute = ComputeDevice.resolve("cpu")

    logits = compute.logits(_Scale(), {"values": torch.tensor([1.0, 2.0])}, factor=3.0)

    assert logits.tolist() == [3.0, 6.0]
    assert logits.device == compute.device
