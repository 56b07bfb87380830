"""Source formats: UCI heart disease exactly as FLamby prepares it, and MedQuAD by NIH source."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from site_agent.examples import InstructionExample, TabularExample, TextExample
from site_agent.loaders import HEART_DISEASE_FEATURES, flamby_test_rows, parse_source
from site_agent.registry import DatasetError, load_registered, register_dataset
from tests.site_agent_tests.helpers import HEART_DISEASE_DIR, MEDQUAD_FILE

# FLamby's published per-center train/test sizes.
FLAMBY_COUNTS = {
    "cleveland": (199, 104),
    "hungarian": (172, 89),
    "switzerland": (30, 16),
    "va": (85, 45),
}
needs_heart_disease = pytest.mark.skipif(
    not HEART_DISEASE_DIR.is_dir(), reason="shared heart-disease data not found"
)
needs_medquad = pytest.mark.skipif(not MEDQUAD_FILE.is_file(), reason="MedQuAD not found")


def _heart(path: Path) -> list[TabularExample]:
    rows = parse_source(
        path.read_bytes(), path=path, task_type="tabular", fmt="heart-disease", options={}
    )
    return [e for e in rows.examples if isinstance(e, TabularExample)]


def test_heart_disease_row_is_encoded_as_flamby_does(tmp_path: Path) -> None:
    source = tmp_path / "processed.test.data"
    source.write_text(
        "63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0\n"
        "41,0,3,130,0,0,1,172,1,1.4,?,?,?,2\n"  # '?' only in dropped columns: kept; chol 0 kept
        "50,1,4,?,200,0,0,140,0,0,1,?,?,1\n"  # '?' in trestbps: dropped
    )

    rows = _heart(source)

    assert HEART_DISEASE_FEATURES == (
        "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
        "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
    )  # fmt: skip
    assert rows == [
        TabularExample((63, 1, 145, 233, 1, 150, 0, 2.3, 0, 0, 0, 0, 1), "0"),
        TabularExample((41, 0, 130, 0, 0, 172, 1, 1.4, 0, 1, 0, 1, 0), "1"),
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("63,1,1,145,233,1,2,150,0,2.3,3,0,6", "13 fields, expected 14"),
        ("63,1,5,145,233,1,2,150,0,2.3,3,0,6,0", r"cp is 5, expected one of \[1, 2, 3, 4\]"),
        ("63,1,1,145,abc,1,2,150,0,2.3,3,0,6,0", "field 5 is neither a number nor '\\?'"),
    ],
)
def test_malformed_heart_disease_line_is_named(tmp_path: Path, line: str, reason: str) -> None:
    source = tmp_path / "processed.test.data"
    source.write_text("63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n" + line + "\n")

    with pytest.raises(DatasetError, match=reason) as raised:
        _heart(source)

    assert f"{source}:2:" in str(raised.value)


def test_flamby_split_replays_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    for labels in (rng.integers(0, 2, 57).tolist(), [1] * 40 + [0] * 2, [0, 1] * 31):
        ours = flamby_test_rows(labels)
        labels_array = np.array(labels)
        levels, counts = np.unique(labels_array, return_counts=True)
        stratify = labels_array if len(levels) > 1 and all(counts > 2) else None
        _, test = train_test_split(
            np.arange(len(labels)), test_size=1.0 - 0.66, train_size=0.66, random_state=43,
            shuffle=True, stratify=stratify,
        )  # fmt: skip
        assert list(ours) == sorted(test.tolist())


@needs_heart_disease
@pytest.mark.parametrize("center", sorted(FLAMBY_COUNTS))
def test_each_hospital_gets_flambys_rows_and_test_split(tmp_path: Path, center: str) -> None:
    source = HEART_DISEASE_DIR / f"processed.{center}.data"
    rows = _heart(source)

    dataset = register_dataset(tmp_path, center, source, task_type="tabular", seed=3)

    labels = [int(e.label) for e in rows]
    test_rows = flamby_test_rows(labels)
    train_count, test_count = FLAMBY_COUNTS[center]
    assert len(rows) == train_count + test_count
    assert len(dataset.test) == test_count
    assert list(dataset.test) == [rows[i] for i in test_rows]
    assert len(dataset.train) + len(dataset.validation) == train_count
    assert len(dataset.validation) == round(0.2 * train_count)
    assert dataset.feature_names == HEART_DISEASE_FEATURES
    assert all(len(e.features) == 13 for e in rows)
    registration = json.loads((tmp_path / center / "registration.json").read_text())
    assert registration["flamby_split"] is True
    assert registration["details"]["center"] == center
    assert load_registered(tmp_path, center) == dataset


@needs_heart_disease
def test_switzerland_keeps_its_zero_cholesterol_rows() -> None:
    rows = _heart(HEART_DISEASE_DIR / "processed.switzerland.data")

    assert len(rows) == 46
    assert all(row.features[3] == 0.0 for row in rows)  # chol = 0 as recorded


def _medquad_file(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    return path


def _medquad_record(source: str, index: int, answer: str = "an answer") -> dict[str, object]:
    return {
        "source": source, "document_id": str(index), "focus": "x",
        "qtype": ("symptoms", "treatment")[index % 2], "question": f"question {index} ?",
        "answer": answer, "answer_truncated": False,
    }  # fmt: skip


def test_medquad_takes_one_source_for_either_task(tmp_path: Path) -> None:
    records = [_medquad_record("CDC", i) for i in range(10)]
    records += [_medquad_record("GHR", i) for i in range(10, 16)]
    records += [_medquad_record("CDC", 99, answer="")]
    source = _medquad_file(tmp_path / "medquad.jsonl.gz", records)

    qtypes = register_dataset(
        tmp_path / "d", "cdc-qtype", source, task_type="seq-classification",
        options={"source": "CDC"},
    )  # fmt: skip
    answers = register_dataset(
        tmp_path / "d", "cdc-answers", source, task_type="causal-lm", options={"source": "CDC"}
    )

    assert len(qtypes.train) + len(qtypes.validation) + len(qtypes.test) == 11
    assert qtypes.labels == ("symptoms", "treatment")
    assert all(isinstance(e, TextExample) for e in qtypes.train)
    # The upstream-removed answer is dropped for causal-lm.
    assert len(answers.train) + len(answers.validation) + len(answers.test) == 10
    first = answers.train[0]
    assert isinstance(first, InstructionExample) and first.response == "an answer"
    registration = json.loads((tmp_path / "d" / "cdc-answers" / "registration.json").read_text())
    assert registration["details"]["dropped_empty_answer"] == 1


def test_medquad_needs_a_known_source_and_a_fitting_target(tmp_path: Path) -> None:
    source = _medquad_file(tmp_path / "medquad.jsonl.gz", [_medquad_record("CDC", 1)])

    with pytest.raises(DatasetError, match=r"choose one NIH source.*\['CDC'\]"):
        register_dataset(tmp_path / "d", "m", source, task_type="seq-classification")
    with pytest.raises(DatasetError, match="target 'answer' does not fit"):
        register_dataset(
            tmp_path / "d", "m", source, task_type="seq-classification",
            options={"source": "CDC", "target": "answer"},
        )  # fmt: skip


def test_malformed_medquad_line_is_named(tmp_path: Path) -> None:
    bad = _medquad_record("CDC", 2)
    bad["qtype"] = 3
    source = _medquad_file(tmp_path / "medquad.jsonl.gz", [_medquad_record("CDC", 1), bad])

    with pytest.raises(DatasetError, match=r"medquad.jsonl.gz:2: 'qtype' must be a string"):
        register_dataset(
            tmp_path / "d", "m", source, task_type="seq-classification", options={"source": "CDC"}
        )


@needs_medquad
def test_real_medquad_source_registers_with_duplicates_dropped(tmp_path: Path) -> None:
    dataset = register_dataset(
        tmp_path, "cdc", MEDQUAD_FILE, task_type="seq-classification",
        options={"source": "CDC", "dedupe": "true"},
    )  # fmt: skip

    total = len(dataset.train) + len(dataset.validation) + len(dataset.test)
    assert 0 < total <= 270
    assert len(dataset.labels) > 2
