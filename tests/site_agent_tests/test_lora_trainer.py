"""The LoRA trainer is pinned: the same seed gives the same adapter and metrics (up to the
CPU's float rounding).

The expected metrics were computed before the two LoRA tasks were moved onto one trainer, so a
refactor that changes what a hop produces (RNG order, head init, loss, schedule, proximal term)
fails here. The adapters' fingerprints were taken from the same code on an AVX-512 machine, where
the bytes first pinned (on another CPU) came out different by rounding only: every metric within
2e-7 of the pinned one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from site_agent.examples import TextExample
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


def _layout_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The adapter's tensor names, shapes and dtypes: the same on every machine."""
    layout = [[key, list(t.shape), str(t.dtype)] for key, t in sorted(tensors.items())]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def _fingerprint(tensors: dict[str, torch.Tensor]) -> list[float]:
    """The adapter's values laid end to end (names sorted, float64): their sum, their sum of
    squares and a sum weighted by position, which moves if any value moves."""
    values = torch.cat([tensors[key].double().reshape(-1) for key in sorted(tensors)])
    weights = torch.sin(torch.arange(values.numel(), dtype=torch.float64))
    return [values.sum().item(), values.square().sum().item(), (values * weights).sum().item()]


def _pinned(tensors: dict[str, torch.Tensor], layout: str, fingerprint: list[float]) -> bool:
    """The adapter matches its pin: its layout exactly, its values up to float rounding. The
    same seed on another CPU (vector width, MKL's kernels) rounds a few values differently
    (~1e-7), so bytes cannot be pinned; a changed RNG order, init, loss or schedule moves
    these sums by far more than the tolerance."""
    return _layout_sha256(tensors) == layout and _fingerprint(tensors) == pytest.approx(
        fingerprint, rel=1e-5, abs=1e-6
    )


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

    assert _pinned(
        first.tensors,
        "0a68cf31f9b6e9233f176a93255dc001534dada3a63111ca298c5eec2de69cea",
        [1.189067076338688, 9.45836435094228, 0.19255373684302302],
    )
    assert first.metrics == pytest.approx(
        {
            "loss": 1.0874139070510864,
            "accuracy": 0.375,
            "macro_f1": 0.1818181818181818,
            "examples": 8.0,
            "train_loss": 1.1863804101943969,
            "train_steps": 5.0,
            "train_examples": 24.0,
        },
        rel=1e-5,
    )
    assert _pinned(
        second.tensors,
        "0a68cf31f9b6e9233f176a93255dc001534dada3a63111ca298c5eec2de69cea",
        [0.6116683357395232, 9.459898392768363, 0.1666534269417853],
    )
    assert second.metrics == pytest.approx(
        {
            "loss": 1.1048327684402466,
            "accuracy": 0.25,
            "macro_f1": 0.13333333333333333,
            "examples": 8.0,
            "train_loss": 1.004578709602356,
            "train_steps": 4.0,
            "train_examples": 24.0,
        },
        rel=1e-5,
    )
    assert _config_sha256(second.adapter_config) == (
        "38c40bd8a6233b3808cc0f40d43449f67306d34418db8cc59485f8494dad89d9"
    )
    assert evaluated == pytest.approx(
        {
            "loss": 1.1111102104187012,
            "accuracy": 0.375,
            "macro_f1": 0.27777777777777773,
            "examples": 8.0,
        },
        rel=1e-5,
    )
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

    assert _pinned(
        first.tensors,
        "023291c17045cb1639bdcb15c5a266fd1410864601ae8a8bf4e381b345b03379",
        [0.1632250694092363, 5.677827829512964, -1.471593555280894],
    )
    assert first.metrics == pytest.approx(
        {
            "loss": 6.156619262695313,
            "perplexity": 471.8302413306756,
            "examples": 8.0,
            "tokens": 80.0,
            "train_loss": 6.537137603759765,
            "train_steps": 5.0,
            "train_examples": 24.0,
        },
        rel=1e-5,
    )
    assert _pinned(
        second.tensors,
        "023291c17045cb1639bdcb15c5a266fd1410864601ae8a8bf4e381b345b03379",
        [-0.3528432225866709, 6.670286307080399, -1.693307640483534],
    )
    assert second.metrics == pytest.approx(
        {
            "loss": 5.851916122436523,
            "perplexity": 347.90036191312254,
            "examples": 8.0,
            "tokens": 80.0,
            "train_loss": 6.150836110115051,
            "train_steps": 4.0,
            "train_examples": 24.0,
        },
        rel=1e-5,
    )
    assert _config_sha256(second.adapter_config) == (
        "cc9370bfef4bd17b0b71bc5d327e487c792e41661f74a0e15bd9f2fe405c02a2"
    )
    assert evaluated == pytest.approx(
        {
            "loss": 6.097342681884766,
            "perplexity": 444.67455693637817,
            "examples": 8.0,
            "tokens": 80.0,
        },
        rel=1e-5,
    )


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
    # The last step's graph goes with the outcome (the agent drops it after the hand back).
    [last_step] = outcome.leftovers
    assert isinstance(last_step, torch.Tensor) and last_step.grad_fn is not None


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


class _CountingTask(SequenceClassificationTask):
    """Text classification that counts the examples whose texts the trainer reads."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer)
        self.texts_read = 0

    def texts(self, example: TextExample) -> tuple[str, ...]:
        self.texts_read += 1
        return super().texts(example)


def test_a_split_the_trainer_has_encoded_is_not_hashed_again_on_the_next_hop(
    tiny_model_dir: Path, labels: tuple[str, ...], site_datasets: list[RegisteredDataset]
) -> None:
    trainer = LoraTrainer(tiny_model_dir, _CountingTask, device="cpu")
    task = trainer._task
    assert isinstance(task, _CountingTask)
    spec = TaskSpec("seq-classification", labels=labels, options={"max_length": 16})
    dataset = site_datasets[1]
    trainer.prepare(spec, dataset, FIRST.seed)  # "you are next": both splits encoded
    assert task.texts_read == len(dataset.train) + len(dataset.validation)

    trainer.run_hop(spec, dataset, FIRST, None)  # the same split tuples (the registry's)
    assert task.texts_read == len(dataset.train) + len(dataset.validation)

    # Other texts in a new tuple are hashed, and encoded as what they are.
    train = task.examples(dataset, "train")
    edited = (replace(train[0], text=train[1].text), *train[1:])
    before = trainer._encode(dataset.name, train, 16)
    after = trainer._encode(dataset.name, edited, 16)
    assert task.texts_read == 2 * len(dataset.train) + len(dataset.validation)
    assert not torch.equal(before["input_ids"], after["input_ids"])
