"""What a site's data is made of: one example type per task type, and the error bad files raise.

Stdlib only, so that registering data never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.task_types import TASK_TYPES

__all__ = [
    "TASK_TYPES",
    "DatasetError",
    "Example",
    "InstructionExample",
    "TabularExample",
    "TextExample",
]


@dataclass(frozen=True)
class TextExample:
    """One labelled text (``seq-classification``)."""

    text: str
    label: str


@dataclass(frozen=True)
class InstructionExample:
    """One instruction and the response the model should learn to give (``causal-lm``)."""

    instruction: str
    response: str


@dataclass(frozen=True)
class TabularExample:
    """One row of numeric features and its class label (``tabular``)."""

    features: tuple[float, ...]
    label: str


Example = TextExample | InstructionExample | TabularExample


class DatasetError(ValueError):
    """A dataset file or registration is unusable; the message names the file and, where it
    applies, the 1-based line."""
