"""The LoRA trainer is pinned: the same seed gives the same adapter bytes and metrics.

The expected values were computed before the two LoRA tasks were moved onto one trainer, so a
refactor that changes what a hop produces (RNG order, head init, loss, schedule, proximal term)
fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save

from site_agent.registry import RegisteredDataset
from site_agent.tasks import (
    HopHyperparameters,
    LoraSettings,
    SequenceClassificationTrainer,
    TaskSpec,
    create_trainer,
)

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
