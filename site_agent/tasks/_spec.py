"""The values a hop is described by and produces, and the ``Trainer`` seam every task implements."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from protocols.checkpoint import TensorSpec as TensorSpec

# The trainers' hyperparameters are the model both ends share (re-exported for the tasks).
from protocols.hyperparameters import HopHyperparameters as HopHyperparameters
from site_agent.examples import TASK_TYPES
from site_agent.registry import RegisteredDataset

# safetensors' dtype names for what may travel between sites; adapters always travel as float32.
TENSOR_DTYPE = "F32"


@dataclass(frozen=True)
class LoraSettings:
    """Shape of the LoRA adapter; every site in a run must use the same settings."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(self.target_modules):
            raise ValueError("LoRA target_modules must name at least one module")


@dataclass(frozen=True)
class TaskSpec:
    """What is trained, fixed for a whole run and identical at every site.

    ``options`` are task-specific and JSON-able: ``seq-classification`` and ``causal-lm`` read
    ``max_length``; ``tabular`` reads ``model`` (``logistic`` or ``mlp``), ``hidden`` (layer
    widths of the MLP) and ``normalisation`` (``per-site``, or ``global`` with ``mean`` and
    ``std`` lists). Unknown options are refused by the trainer.
    """

    task_type: str
    labels: tuple[str, ...] = ()  # classification tasks, in model output order
    lora: LoraSettings = LoraSettings()  # LoRA tasks
    options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"unknown task type {self.task_type!r}; expected one of {TASK_TYPES}")
        if isinstance(self.labels, str):
            raise ValueError("labels must be a sequence of label names, not one string")
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.task_type == "causal-lm":
            if self.labels:
                raise ValueError("causal-lm tasks have no labels")
        else:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be unique, got {list(self.labels)}")
            if len(self.labels) < 2 or not all(isinstance(x, str) and x for x in self.labels):
                raise ValueError(f"need at least two non-empty label names, got {self.labels}")
        try:
            options = json.loads(json.dumps(dict(self.options), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise ValueError(f"task options must be JSON-able: {error}") from error
        object.__setattr__(self, "options", options)


@dataclass(frozen=True)
class HopOutcome:
    """What one hop produces: the trainable state to pass on, and how it did."""

    tensors: dict[str, torch.Tensor]  # exactly trainable_state(): CPU, contiguous, float32
    adapter_config: dict[str, object]  # LoRA: PEFT adapter_config; tabular: the architecture
    metrics: dict[str, float]  # evaluate() on validation + train_loss, train_steps, train_examples
    train_started_at_ns: int  # time.time_ns() right before the first optimizer step
    train_finished_at_ns: int  # time.time_ns() right after the last optimizer step
    # Set when the validation pass was deferred (``run_hop(defer_validation=True)``): runs it
    # on the trained model and returns its metrics (``metrics`` then holds only train_* keys).
    validate: Callable[[], dict[str, float]] | None = field(default=None, compare=False)
    # Freed with the outcome, not before: the last training step's autograd graph
    # (`TrainingRun.last_step`). The agent keeps a handed-back hop's outcome until the hand
    # back is answered.
    leftovers: tuple[object, ...] = field(default=(), compare=False, repr=False)


class HopCancelled(Exception):
    """The hop was cancelled between optimizer steps (``should_cancel`` returned True)."""


ProgressCallback = Callable[[int, int, float], None]
CancelCheck = Callable[[], bool]
Split = Literal["validation", "test"]


@runtime_checkable
class PreparingTrainer(Protocol):
    """A trainer that can get a hop ready before its input arrives (the site is next)."""

    def prepare(self, spec: TaskSpec, dataset: RegisteredDataset, seed: int) -> None:
        """Loads and encodes what a hop with this spec and seed needs, off the critical path."""
        ...

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        *,
        defer_validation: bool = False,
    ) -> HopOutcome:
        """As ``Trainer.run_hop``; with ``defer_validation`` the validation pass is left to
        ``HopOutcome.validate`` (run after the hop is handed back)."""
        ...


class Trainer(Protocol):
    """Trains and evaluates one task type; one instance per task type for the process lifetime."""

    @property
    def base_model_sha256(self) -> str:
        """sha256 of the base model's weights (``hash_base_model``); ``""`` for tabular."""
        ...

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        """What a run pins: the base model hash, or (tabular) the architecture hash."""
        ...

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        """The exact names, shapes and dtypes that may move between sites, sorted by name."""
        ...

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> HopOutcome:
        """Trains for one hop from ``incoming`` (None: fresh, seeded) on the train split."""
        ...

    def evaluate(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        split: Split,
        tensors: Mapping[str, torch.Tensor],
    ) -> dict[str, float]:
        """Evaluates the given trainable state on a split of the dataset."""
        ...


def check_task_options(spec: TaskSpec, known: Sequence[str]) -> None:
    """Refuses task options this task does not read (a typo must not be silently ignored)."""
    unknown = sorted(set(spec.options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown {spec.task_type} task option(s) {unknown}; known: {sorted(known)}"
        )
