"""The task types a run may name: one list both ends check against (no code travels to a site)."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["CLASSIFICATION_TASK_TYPES", "LORA_TASK_TYPES", "TASK_TYPES", "TaskType"]

TaskType = Literal["seq-classification", "causal-lm", "tabular"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
# Tasks that train a LoRA adapter on a base model (tabular trains a small model from scratch).
LORA_TASK_TYPES: tuple[str, ...] = ("seq-classification", "causal-lm")
# Tasks whose examples carry a label.
CLASSIFICATION_TASK_TYPES: tuple[str, ...] = ("seq-classification", "tabular")
