"""The built-in task types a site can train, behind one ``Trainer`` seam.

No code travels to a site: a run names a task type, its ``TaskSpec`` and per-hop
``HopHyperparameters``; the site trains with the Baton it has installed.
"""

from site_agent.base_model import hash_base_model
from site_agent.examples import TASK_TYPES
from site_agent.tasks._causal_lm import PROMPT_TEMPLATE, CausalLanguageModelTrainer
from site_agent.tasks._cross_validation import CrossValidatedTrainer
from site_agent.tasks._lora_trainer import LoraTask, LoraTrainer
from site_agent.tasks._sequence_classification import SequenceClassificationTrainer
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
from site_agent.tasks._tabular import TabularTrainer, architecture_sha256
from site_agent.tasks._trainers import create_trainer, load_base_models

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
]
