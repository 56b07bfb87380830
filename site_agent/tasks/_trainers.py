"""Builds the trainer for a task type; the agent keeps one per task type for its lifetime."""

from __future__ import annotations

from pathlib import Path

from site_agent.tasks._causal_lm import CausalLanguageModelTrainer
from site_agent.tasks._sequence_classification import SequenceClassificationTrainer
from site_agent.tasks._spec import Trainer
from site_agent.tasks._tabular import TabularTrainer


def create_trainer(
    task_type: str,
    *,
    base_model_dir: Path | None,
    device: str | None = None,
    num_threads: int | None = None,
) -> Trainer:
    """A trainer for ``task_type``, with its base model (if any) ready to load once.

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
        return SequenceClassificationTrainer(base_model_dir, device=device, num_threads=num_threads)
    return CausalLanguageModelTrainer(base_model_dir, device=device, num_threads=num_threads)
