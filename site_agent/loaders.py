"""Reads a site's source file into examples: JSON Lines, CSV, UCI heart disease, MedQuAD.

Every reader validates the whole file and names the file and 1-based line of the first problem.
The heart-disease reader applies FLamby's Fed-Heart-Disease preprocessing and train/test split
exactly (owkin/FLamby, flamby/datasets/fed_heart_disease/dataset.py). No torch, no pandas; numpy
only for that split (imported there: a site's start registers text data without it).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from site_agent.examples import (
    TASK_TYPES,
    DatasetError,
    Example,
    InstructionExample,
    TabularExample,
    TextExample,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "FLAMBY_TRAIN_FRACTION",
    "FORMATS",
    "FORMAT_OPTIONS",
    "HEART_DISEASE_FEATURES",
    "SourceRows",
    "detect_format",
    "flamby_test_rows",
    "parse_source",
]

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("jsonl", "csv", "heart-disease", "medquad")

# Options each format reads (``--option key=value``); anything else is refused by the registry.
FORMAT_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "jsonl": (),
    "csv": ("label_column",),
    "heart-disease": ("center",),
    "medquad": ("source", "target"),
}

_FORMAT_TASKS: Mapping[str, tuple[str, ...]] = {
    "jsonl": TASK_TYPES,
    "csv": ("tabular",),
    "heart-disease": ("tabular",),
    "medquad": ("seq-classification", "causal-lm"),
}

# Echo at most this much of a field value in an error: labels are class names, but a malformed
# line could hold anything.
_ECHO_CHARS = 40

# ---- UCI heart disease as FLamby prepares it -------------------------------------------------
# processed.*.data columns: age sex cp trestbps chol fbs restecg thalach exang oldpeak slope ca
# thal num. FLamby drops slope, ca and thal (columns 10-12), drops rows still holding a '?',
# one-hot encodes cp and restecg with pandas.get_dummies(drop_first=True) over the pooled
# centers (so the dummies come last, cp's before restecg's), and labels num > 0 as disease.
_HEART_COLUMNS = 14
_HEART_DROPPED_COLUMNS = frozenset({10, 11, 12})
_HEART_CP_COLUMN = 2
_HEART_RESTECG_COLUMN = 6
_HEART_KEPT_NUMERIC: tuple[tuple[int, str], ...] = (
    (0, "age"),
    (1, "sex"),
    (3, "trestbps"),
    (4, "chol"),
    (5, "fbs"),
    (7, "thalach"),
    (8, "exang"),
    (9, "oldpeak"),
)
_HEART_CP_LEVELS = (1.0, 2.0, 3.0, 4.0)  # the first level is dropped (drop_first=True)
_HEART_RESTECG_LEVELS = (0.0, 1.0, 2.0)
HEART_DISEASE_FEATURES: tuple[str, ...] = (
    *(name for _, name in _HEART_KEPT_NUMERIC),
    *(f"cp_{int(level)}" for level in _HEART_CP_LEVELS[1:]),
    *(f"restecg_{int(level)}" for level in _HEART_RESTECG_LEVELS[1:]),
)
# FLamby: train_fraction = 0.66, test_size = 1.0 - 0.66, random_state = 43, shuffle, stratified
# by the binary label when both classes have more than two rows.
FLAMBY_TRAIN_FRACTION = 0.66
_FLAMBY_RANDOM_STATE = 43


@dataclass(frozen=True)
class SourceRows:
    """Every usable row of a source file, in file order, with where each came from."""

    examples: tuple[Example, ...]
    lines: tuple[int, ...]  # 1-based line of each example (in the decompressed text for .gz)
    feature_names: tuple[str, ...] = ()
    # Rows the format itself holds out for test (FLamby's split), as indices into ``examples``.
    fixed_test_rows: tuple[int, ...] | None = None
    # Aggregate facts worth recording at registration: dropped-row counts, center, source...
    details: Mapping[str, object] = field(default_factory=dict)


def detect_format(source: Path, task_type: str) -> str:
    """Picks a format from a file's name.

    Args:
        source: The source file.
        task_type: The task the data is registered for.

    Returns:
        ``heart-disease`` for ``*.data``, ``medquad`` for ``*.jsonl.gz``, ``csv`` for ``*.csv``,
        ``jsonl`` for ``*.jsonl``.

    Raises:
        DatasetError: If the name says nothing; pass a format explicitly then.
    """
    name = source.name.lower()
    if name.endswith(".data") and task_type == "tabular":
        return "heart-disease"
    if name.endswith(".jsonl.gz"):
        return "medquad"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".jsonl"):
        return "jsonl"
    raise DatasetError(
        f"{source}: cannot tell the format from the file name; give one of {list(FORMATS)}"
    )


def parse_source(
    data: bytes, *, path: Path, task_type: str, fmt: str, options: Mapping[str, str]
) -> SourceRows:
    """Parses and validates a whole source file.

    Args:
        data: The file's bytes (the caller fingerprints the same bytes).
        path: The file's path, for error messages.
        task_type: One of ``TASK_TYPES``.
        fmt: One of ``FORMATS``.
        options: Format options (see ``FORMAT_OPTIONS``); others are ignored here.

    Returns:
        The usable rows in file order.

    Raises:
        DatasetError: If the file is malformed, empty, or the format does not fit the task.
    """
    if fmt not in FORMATS:
        raise DatasetError(f"{path}: unknown format {fmt!r}; expected one of {list(FORMATS)}")
    if task_type not in _FORMAT_TASKS[fmt]:
        raise DatasetError(
            f"{path}: format {fmt!r} holds no {task_type!r} data; it serves "
            f"{list(_FORMAT_TASKS[fmt])}"
        )
    if fmt == "jsonl":
        rows = _parse_jsonl(_decode(data, path), path, task_type)
    elif fmt == "csv":
        rows = _parse_csv(_decode(data, path), path, options.get("label_column", "label"))
    elif fmt == "heart-disease":
        rows = _parse_heart_disease(_decode(data, path), path, options.get("center"))
    else:
        rows = _parse_medquad(data, path, task_type, options)
    if not rows.examples:
        raise DatasetError(f"{path}: dataset is empty (no usable records)")
    return rows


# ---- JSON Lines ------------------------------------------------------------------------------


def _parse_jsonl(content: str, path: Path, task_type: str) -> SourceRows:
    examples: list[Example] = []
    lines: list[int] = []
    width: int | None = None
    for line_number, line in _numbered_lines(content):
        where = f"{path}:{line_number}"
        record = _json_object(line, where)
        example: Example
        if task_type == "seq-classification":
            example = TextExample(
                text=_text_field(record, "text", where), label=_label_field(record, where)
            )
        elif task_type == "causal-lm":
            example = InstructionExample(
                instruction=_text_field(record, "instruction", where),
                response=_text_field(record, "response", where),
            )
        else:
            features = _feature_list(record, where)
            if width is None:
                width = len(features)
            elif len(features) != width:
                raise DatasetError(
                    f"{where}: 'features' has {len(features)} values; earlier rows have {width}"
                )
            example = TabularExample(features=features, label=_label_field(record, where))
        examples.append(example)
        lines.append(line_number)
    names = tuple(f"x{index}" for index in range(width)) if width is not None else ()
    return SourceRows(examples=tuple(examples), lines=tuple(lines), feature_names=names)


def _json_object(line: str, where: str) -> dict[str, object]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: invalid JSON: {error.msg}") from error
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _text_field(record: Mapping[str, object], key: str, where: str) -> str:
    if key not in record:
        raise DatasetError(f"{where}: missing {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: {key!r} is empty")
    return value


def _label_field(record: Mapping[str, object], where: str) -> str:
    if "label" not in record:
        raise DatasetError(f"{where}: missing 'label'")
    label = record["label"]
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    if not isinstance(label, str) or not label.strip():
        raise DatasetError(f"{where}: 'label' must be a non-empty string or an integer")
    return label


def _feature_list(record: Mapping[str, object], where: str) -> tuple[float, ...]:
    if "features" not in record:
        raise DatasetError(f"{where}: missing 'features'")
    values = record["features"]
    if not isinstance(values, list) or not values:
        raise DatasetError(f"{where}: 'features' must be a non-empty list of numbers")
    features: list[float] = []
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DatasetError(f"{where}: feature {position} is not a number")
        if not math.isfinite(value):
            raise DatasetError(f"{where}: feature {position} is not finite")
        features.append(float(value))
    return tuple(features)


# ---- CSV (tabular) ---------------------------------------------------------------------------


def _parse_csv(content: str, path: Path, label_column: str) -> SourceRows:
    reader = csv.reader(io.StringIO(content, newline=""))
    try:
        header = next(reader)
    except StopIteration as error:
        raise DatasetError(f"{path}: dataset is empty (no header row)") from error
    except csv.Error as error:
        raise DatasetError(f"{path}:1: malformed CSV: {error}") from error
    header = [name.strip() for name in header]
    if label_column not in header:
        raise DatasetError(f"{path}:1: header has no label column {label_column!r}")
    if len(set(header)) != len(header) or not all(header):
        raise DatasetError(f"{path}:1: header column names must be unique and non-empty")
    label_index = header.index(label_column)
    feature_columns = [i for i in range(len(header)) if i != label_index]
    if not feature_columns:
        raise DatasetError(f"{path}:1: header has no feature columns")

    examples: list[Example] = []
    lines: list[int] = []
    line_number = reader.line_num
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise DatasetError(f"{path}:{start}: malformed CSV: {error}") from error
        line_number = start
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{path}:{line_number}"
        if len(row) != len(header):
            raise DatasetError(f"{where}: {len(row)} fields, the header has {len(header)}")
        label = row[label_index].strip()
        if not label:
            raise DatasetError(f"{where}: empty label")
        features = tuple(_csv_number(row[i], header[i], where) for i in feature_columns)
        examples.append(TabularExample(features=features, label=label))
        lines.append(line_number)
    names = tuple(header[i] for i in feature_columns)
    return SourceRows(examples=tuple(examples), lines=tuple(lines), feature_names=names)


def _csv_number(cell: str, column: str, where: str) -> float:
    text = cell.strip()
    if not text:
        raise DatasetError(f"{where}: empty value in column {column!r}")
    try:
        value = float(text)
    except ValueError as error:
        raise DatasetError(f"{where}: column {column!r} is not a number") from error
    if not math.isfinite(value):
        raise DatasetError(f"{where}: column {column!r} is not finite")
    return value


# ---- UCI heart disease (FLamby) --------------------------------------------------------------


def _parse_heart_disease(content: str, path: Path, center: str | None) -> SourceRows:
    examples: list[Example] = []
    lines: list[int] = []
    missing = 0
    for line_number, line in _numbered_lines(content):
        where = f"{path}:{line_number}"
        fields = [cell.strip() for cell in line.split(",")]
        if len(fields) != _HEART_COLUMNS:
            raise DatasetError(f"{where}: {len(fields)} fields, expected {_HEART_COLUMNS}")
        values: dict[int, float] = {}
        has_missing = False
        for column, cell in enumerate(fields):
            if column in _HEART_DROPPED_COLUMNS:
                continue
            if cell == "?":
                has_missing = True
                continue
            try:
                values[column] = float(cell)
            except ValueError as error:
                message = f"{where}: field {column + 1} is neither a number nor '?'"
                raise DatasetError(message) from error
            if not math.isfinite(values[column]):
                raise DatasetError(f"{where}: field {column + 1} is not finite")
        if has_missing:
            # FLamby drops these rows (dropna after dropping slope, ca and thal).
            missing += 1
            continue
        features = [values[column] for column, _ in _HEART_KEPT_NUMERIC]
        features += _one_hot(values[_HEART_CP_COLUMN], _HEART_CP_LEVELS, "cp", where)
        features += _one_hot(values[_HEART_RESTECG_COLUMN], _HEART_RESTECG_LEVELS, "restecg", where)
        label = "1" if values[_HEART_COLUMNS - 1] > 0 else "0"
        examples.append(TabularExample(features=tuple(features), label=label))
        lines.append(line_number)

    if center is None:
        parts = path.name.split(".")
        center = parts[1] if len(parts) == 3 and parts[0] == "processed" else ""
    test_rows = flamby_test_rows([int(e.label) for e in examples if isinstance(e, TabularExample)])
    logger.info(
        "heart-disease file %s: %d rows kept, %d dropped for missing values, %d FLamby test rows",
        path.name,
        len(examples),
        missing,
        len(test_rows),
    )
    return SourceRows(
        examples=tuple(examples),
        lines=tuple(lines),
        feature_names=HEART_DISEASE_FEATURES,
        fixed_test_rows=test_rows,
        details={
            "center": center,
            "dropped_missing": missing,
            "flamby": {
                "preprocessing": "drop slope, ca, thal; drop rows with '?'; one-hot cp, restecg",
                "test_split": "sklearn train_test_split(train_size=0.66, random_state=43)",
            },
        },
    )


def _one_hot(value: float, levels: Sequence[float], column: str, where: str) -> list[float]:
    if value not in levels:
        raise DatasetError(
            f"{where}: {column} is {value:g}, expected one of {[int(v) for v in levels]}"
        )
    return [1.0 if value == level else 0.0 for level in levels[1:]]


def flamby_test_rows(labels: Sequence[int]) -> tuple[int, ...]:
    """FLamby's per-center test rows, reproduced without scikit-learn.

    FLamby calls ``sklearn.model_selection.train_test_split(np.arange(n), test_size=1 - 0.66,
    train_size=0.66, random_state=43, shuffle=True, stratify=y)``, stratifying by the binary
    label only when both classes have more than two rows. This replays the same numpy
    ``RandomState`` draws (StratifiedShuffleSplit or ShuffleSplit).

    Args:
        labels: The binary label (0 or 1) of each kept row, in file order.

    Returns:
        The sorted indices of the test rows; every other row is a train row.
    """
    count = len(labels)
    if count == 0:
        return ()
    import numpy as np  # here, not at the top: a site registering text data never loads numpy

    y = np.asarray(labels, dtype=np.int64)
    n_train = math.floor(FLAMBY_TRAIN_FRACTION * count)
    n_test = math.ceil((1.0 - FLAMBY_TRAIN_FRACTION) * count)
    if n_train == 0 or n_train + n_test > count:
        raise DatasetError(f"FLamby's split needs more rows than {count}")
    rng = np.random.RandomState(_FLAMBY_RANDOM_STATE)
    levels, level_counts = np.unique(y, return_counts=True)
    if len(levels) > 1 and all(int(c) > 2 for c in level_counts):
        test = _stratified_shuffle_test(y, n_train, n_test, rng)
    else:
        test = [int(index) for index in rng.permutation(count)[:n_test]]
    return tuple(sorted(int(index) for index in test))


def _stratified_shuffle_test(
    y: np.ndarray, n_train: int, n_test: int, rng: np.random.RandomState
) -> list[int]:
    """The test half of scikit-learn's ``StratifiedShuffleSplit._iter_indices`` (one split)."""
    import numpy as np

    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if n_train < len(classes) or n_test < len(classes):
        raise DatasetError("FLamby's stratified split needs a row of each class on each side")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    test: list[int] = []
    for i in range(len(classes)):
        permutation = rng.permutation(class_counts[i])
        shuffled = class_indices[i].take(permutation, mode="clip")
        test.extend(int(index) for index in shuffled[n_i[i] : n_i[i] + t_i[i]])
    # scikit-learn shuffles the train indices and then the test indices; the draws change
    # nothing about which rows are in which set, so they are not replayed.
    return test


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """scikit-learn's ``sklearn.utils.extmath._approximate_mode``, with the same RNG draws."""
    import numpy as np

    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        values = np.sort(np.unique(remainder))[::-1]
        for value in values:
            (indices,) = np.where(remainder == value)
            add_now = min(len(indices), need_to_add)
            drawn = rng.choice(indices, size=add_now, replace=False)
            floored[drawn] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    result: np.ndarray = floored.astype(int)
    return result


# ---- MedQuAD ---------------------------------------------------------------------------------

_MEDQUAD_FIELDS = ("source", "qtype", "question", "answer")
_MEDQUAD_TARGETS = {"qtype": "seq-classification", "answer": "causal-lm"}


def _parse_medquad(
    data: bytes, path: Path, task_type: str, options: Mapping[str, str]
) -> SourceRows:
    target = options.get("target", "qtype" if task_type == "seq-classification" else "answer")
    if _MEDQUAD_TARGETS.get(target) != task_type:
        raise DatasetError(
            f"{path}: MedQuAD target {target!r} does not fit task {task_type!r} (qtype is "
            f"seq-classification, answer is causal-lm)"
        )
    wanted = options.get("source")
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: not a readable gzip file: {error}") from error
    content = _decode(raw, path)

    sources: Counter[str] = Counter()
    examples: list[Example] = []
    lines: list[int] = []
    empty_answers = 0
    for line_number, line in _numbered_lines(content):
        where = f"{path}:{line_number}"
        record = _json_object(line, where)
        for key in _MEDQUAD_FIELDS:
            if not isinstance(record.get(key), str):
                raise DatasetError(f"{where}: {key!r} must be a string")
        source = str(record["source"])
        sources[source] += 1
        if source != wanted:
            continue
        question = _text_field(record, "question", where)
        example: Example
        if target == "qtype":
            example = TextExample(text=question, label=_text_field(record, "qtype", where))
        else:
            answer = str(record["answer"])
            if not answer.strip():
                # Upstream removed these answers (MedlinePlus copyright); not a malformed row.
                empty_answers += 1
                continue
            example = InstructionExample(instruction=question, response=answer)
        examples.append(example)
        lines.append(line_number)
    if wanted is None or wanted not in sources:
        raise DatasetError(
            f"{path}: choose one NIH source with --option source=NAME; the file holds "
            f"{sorted(sources)}"
        )
    return SourceRows(
        examples=tuple(examples),
        lines=tuple(lines),
        details={"source": wanted, "target": target, "dropped_empty_answer": empty_answers},
    )


# ---- shared ----------------------------------------------------------------------------------


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not valid UTF-8 (byte {error.start})") from error


def _numbered_lines(content: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; only ``\\n`` ends a line (JSON strings may
    hold U+2028 and friends, which ``str.splitlines`` would split on)."""
    for index, line in enumerate(content.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield index, line
