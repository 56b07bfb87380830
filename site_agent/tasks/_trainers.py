"""Builds the trainer for a task type; the agent keeps one per task type for its lifetime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from site_agent.tasks._spec import TaskSpec, Trainer
from site_agent.tasks._tabular import TabularTrainer


def create_trainer(
    task_type: str,
    *,
    base_model_dir: Path | None,
    device: str | None = None,
    num_threads: int | None = None,
) -> Trainer:
    """A trainer for ``task_type``, with its base model (if any) ready to load once.

    The LoRA trainers' libraries (transformers, peft) are imported here, on first use.

    Args:
        task_type: One of ``TASK_TYPES``.
        base_model_dir: The transformers model folder for LoRA tasks; ignored (may be None) for
            ``tabular``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when available.
        num_threads: If given, sets torch's intra-op CPU threads (process-wide).

    Returns:
        The trainer.

    Raises:
        ValueError: If the task type is unknown, a LoRA task has no base model folder, or the
            device is unavailable.
        FileNotFoundError: If the base model folder does not exist.
    """
    if task_type == "tabular":
        return TabularTrainer(device=device, num_threads=num_threads)
    if task_type not in ("seq-classification", "causal-lm"):
        raise ValueError(f"unknown task type {task_type!r}")
    if base_model_dir is None:
        raise ValueError(f"{task_type} tasks need a base model folder")
    if task_type == "seq-classification":
        from site_agent.tasks._sequence_classification import SequenceClassificationTrainer

        return SequenceClassificationTrainer(base_model_dir, device=device, num_threads=num_threads)
    from site_agent.tasks._causal_lm import CausalLanguageModelTrainer

    return CausalLanguageModelTrainer(base_model_dir, device=device, num_threads=num_threads)


def load_base_models(trainer: Trainer, label_sets: Sequence[Sequence[str]]) -> None:
    """Loads a LoRA trainer's base model for each label set (one per number of labels), so
    that a first hop on a dataset with these labels does not load it; other trainers have
    nothing to load. A label set no run could use (fewer than two labels, an empty or a
    repeated name) is skipped.

    Raises:
        Exception: Whatever the base model's loading raises (a corrupt weights file...).
    """
    if isinstance(trainer, TabularTrainer):
        return
    from site_agent.tasks._causal_lm import CausalLanguageModelTrainer
    from site_agent.tasks._lora_trainer import LoraTrainer

    if not isinstance(trainer, LoraTrainer):
        return
    specs: list[TaskSpec] = []
    if isinstance(trainer, CausalLanguageModelTrainer):
        specs.append(TaskSpec("causal-lm"))
    else:
        for labels in label_sets:
            try:
                specs.append(TaskSpec("seq-classification", labels=tuple(labels)))
            except ValueError:  # one label, an empty or a repeated name: no run can use it
                continue
    for spec in specs:
        trainer.load_base_model(spec)
