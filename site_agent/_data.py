"""Loads a site's labelled text records (JSON Lines) and splits them into train and validation."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextExample:
    """One labelled text."""

    text: str
    label: str


@dataclass(frozen=True)
class TextDataset:
    """A site's examples, split into train and validation."""

    name: str
    train: tuple[TextExample, ...]
    validation: tuple[TextExample, ...]


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file and, where it applies, the line."""


def load_text_dataset(
    path: Path,
    *,
    labels: Sequence[str] | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> TextDataset:
    """Reads ``{"text": str, "label": str}`` JSON Lines and splits them per label.

    Blank lines are skipped; other keys on a line are ignored. The split is stratified:
    each label keeps about ``validation_fraction`` of its rows for validation, at least one when
    it has two or more rows, and always leaves at least one for training. It depends only on the
    file content and ``seed``. Both splits keep file order.

    Args:
        path: The JSON Lines file.
        labels: The declared label set; when given, any other label is an error.
        validation_fraction: Share of each label's rows held out, in ``(0, 1)``.
        seed: Seed for choosing the held-out rows.
        name: Dataset name; defaults to the file's stem.

    Returns:
        The split dataset.

    Raises:
        DatasetError: If the file cannot be read or decoded, is empty, or a line is malformed.
        ValueError: If ``validation_fraction`` is outside ``(0, 1)``.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    path = Path(path)
    examples = _read_examples(path, None if labels is None else frozenset(labels))

    by_label: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(index)

    held_out: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        count = _validation_count(len(indices), validation_fraction)
        # One RNG per label so that rows of one label never shift another label's split.
        rng = random.Random(_split_seed(seed, label))
        shuffled = list(indices)
        rng.shuffle(shuffled)
        held_out.update(shuffled[:count])

    train = tuple(e for i, e in enumerate(examples) if i not in held_out)
    validation = tuple(e for i, e in enumerate(examples) if i in held_out)
    logger.info(
        "loaded dataset %s: %d train, %d validation, %d labels",
        path.name,
        len(train),
        len(validation),
        len(by_label),
    )
    return TextDataset(
        name=name if name is not None else path.stem, train=train, validation=validation
    )


def _read_examples(path: Path, labels: frozenset[str] | None) -> list[TextExample]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read dataset: {error}") from error
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not valid UTF-8 (byte {error.start})") from error

    examples: list[TextExample] = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        examples.append(_parse_line(path, line_number, line, labels))
    if not examples:
        raise DatasetError(f"{path}: dataset is empty (no records)")
    return examples


def _parse_line(
    path: Path, line_number: int, line: str, labels: frozenset[str] | None
) -> TextExample:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: invalid JSON: {error.msg}") from error
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" not in record:
        raise DatasetError(f"{where}: missing 'text'")
    text = record["text"]
    if not isinstance(text, str):
        raise DatasetError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DatasetError(f"{where}: 'text' is empty")
    if "label" not in record:
        raise DatasetError(f"{where}: missing 'label'")
    label = record["label"]
    if not isinstance(label, str) or not label:
        raise DatasetError(f"{where}: 'label' must be a non-empty string")
    if labels is not None and label not in labels:
        # Labels are class names, not patient text; still cap what a malformed line can echo.
        raise DatasetError(f"{where}: label {label[:40]!r} is not one of {sorted(labels)}")
    return TextExample(text=text, label=label)


def _validation_count(rows: int, fraction: float) -> int:
    if rows < 2:
        return 0
    return min(rows - 1, max(1, math.floor(rows * fraction + 0.5)))


def _split_seed(seed: int, label: str) -> int:
    digest = hashlib.sha256(f"baton-split:{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "big")
