"""The built-in task types a site can train, behind one ``Trainer`` seam.

No code travels to a site: a run names a task type, its ``TaskSpec`` and per-hop
``HopHyperparameters``; the site trains with the Baton it has installed. The LoRA trainers
(transformers, peft) are imported on first use, so a tabular site never imports them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from site_agent.base_model import hash_base_model
from site_agent.examples import TASK_TYPES
from site_agent.tasks._cross_validation import CrossValidatedTrainer
from site_agent.tasks._spec import (
    HopCancelled,
    HopHyperparameters,
    HopOutcome,
    LoraSettings,
    PreparingTrainer,
    TaskSpec,
    TensorSpec,
    Trainer,
)
from site_agent.tasks._state import serialized, tensors_from_values
from site_agent.tasks._tabular import TabularTrainer, architecture_sha256
from site_agent.tasks._trainers import create_trainer, load_base_models

if TYPE_CHECKING:
    from site_agent.tasks._causal_lm import PROMPT_TEMPLATE, CausalLanguageModelTrainer
    from site_agent.tasks._lora_trainer import LoraTask, LoraTrainer
    from site_agent.tasks._sequence_classification import SequenceClassificationTrainer

# Names whose modules import transformers and peft: loaded when first asked for.
_LORA_NAMES = {
    "PROMPT_TEMPLATE": "site_agent.tasks._causal_lm",
    "CausalLanguageModelTrainer": "site_agent.tasks._causal_lm",
    "LoraTask": "site_agent.tasks._lora_trainer",
    "LoraTrainer": "site_agent.tasks._lora_trainer",
    "SequenceClassificationTrainer": "site_agent.tasks._sequence_classification",
}


def __getattr__(name: str) -> Any:
    module = _LORA_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "PROMPT_TEMPLATE",
    "TASK_TYPES",
    "CausalLanguageModelTrainer",
    "CrossValidatedTrainer",
    "HopCancelled",
    "HopHyperparameters",
    "HopOutcome",
    "LoraSettings",
    "LoraTask",
    "LoraTrainer",
    "PreparingTrainer",
    "SequenceClassificationTrainer",
    "TabularTrainer",
    "TaskSpec",
    "TensorSpec",
    "Trainer",
    "architecture_sha256",
    "create_trainer",
    "hash_base_model",
    "load_base_models",
    "serialized",
    "tensors_from_values",
]
