"""Loading site datasets from JSON Lines and splitting them into train and validation."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from site_agent._data import DatasetError, TextExample, load_text_dataset


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _rows(counts: dict[str, int]) -> list[dict[str, str]]:
    return [
        {"text": f"note {label} {index}", "label": label}
        for label, count in counts.items()
        for index in range(count)
    ]


def test_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "site.jsonl", _rows({"a": 50, "b": 20, "c": 10}))

    first = load_text_dataset(path, validation_fraction=0.2, seed=1)
    second = load_text_dataset(path, validation_fraction=0.2, seed=1)

    assert first == second
    assert Counter(e.label for e in first.validation) == {"a": 10, "b": 4, "c": 2}
    assert Counter(e.label for e in first.train) == {"a": 40, "b": 16, "c": 8}
    assert set(first.train).isdisjoint(first.validation)


def test_split_depends_on_the_seed(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "site.jsonl", _rows({"a": 50, "b": 50}))

    one = load_text_dataset(path, seed=1)
    other = load_text_dataset(path, seed=2)

    assert set(one.validation) != set(other.validation)
    assert Counter(e.label for e in one.validation) == Counter(e.label for e in other.validation)


def test_every_label_with_two_rows_gets_a_validation_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "site.jsonl", _rows({"common": 30, "pair": 2, "single": 1}))

    dataset = load_text_dataset(path, validation_fraction=0.1)

    held_out = Counter(e.label for e in dataset.validation)
    assert held_out["pair"] == 1
    assert held_out["single"] == 0
    assert Counter(e.label for e in dataset.train)["single"] == 1


def test_splits_keep_file_order_and_name_defaults_to_the_stem(tmp_path: Path) -> None:
    rows = _rows({"a": 10, "b": 10})
    path = _write_jsonl(tmp_path / "north_site.jsonl", rows)

    dataset = load_text_dataset(path)

    order = [TextExample(**row) for row in rows]
    assert list(dataset.train) == [e for e in order if e in dataset.train]
    assert list(dataset.validation) == [e for e in order if e in dataset.validation]
    assert dataset.name == "north_site"
    assert load_text_dataset(path, name="north").name == "north"


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"text": "cough", "label": ', "invalid JSON"),
        ('["cough", "respiratory"]', "expected a JSON object"),
        ('{"label": "respiratory"}', "missing 'text'"),
        ('{"text": "   ", "label": "respiratory"}', "'text' is empty"),
        ('{"text": 3, "label": "respiratory"}', "'text' must be a string"),
        ('{"text": "cough"}', "missing 'label'"),
        ('{"text": "cough", "label": "renal"}', "label 'renal' is not one of"),
    ],
)
def test_malformed_line_error_names_the_file_and_line(
    tmp_path: Path, bad_line: str, reason: str
) -> None:
    path = tmp_path / "site.jsonl"
    good = json.dumps({"text": "chest pain", "label": "cardiac"})
    # A blank line still counts towards the line number.
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")

    with pytest.raises(DatasetError, match=reason) as raised:
        load_text_dataset(path, labels=["cardiac", "respiratory"])

    assert f"{path}:3:" in str(raised.value)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")

    with pytest.raises(DatasetError, match="empty") as raised:
        load_text_dataset(path)

    assert str(path) in str(raised.value)


def test_unreadable_or_undecodable_file_is_a_dataset_error(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "fi\xe8vre", "label": "a"}\n'.encode("latin-1"))

    with pytest.raises(DatasetError, match="UTF-8"):
        load_text_dataset(latin1)
    with pytest.raises(DatasetError, match="cannot read"):
        load_text_dataset(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_validation_fraction_must_be_strictly_between_zero_and_one(
    tmp_path: Path, fraction: float
) -> None:
    path = _write_jsonl(tmp_path / "site.jsonl", _rows({"a": 4}))

    with pytest.raises(ValueError, match="validation_fraction"):
        load_text_dataset(path, validation_fraction=fraction)


def test_data_module_does_not_import_torch() -> None:
    code = "import sys, site_agent._data; assert 'torch' not in sys.modules"

    subprocess.run([sys.executable, "-c", code], check=True)
