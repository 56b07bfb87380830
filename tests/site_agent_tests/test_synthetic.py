"""The synthetic per-site triage notes: deterministic, skewed per site, and learnable."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from site_agent._synthetic import (
    SYNTHETIC_LABELS,
    generate_site_records,
    synthetic_vocabulary,
    write_site_dataset,
)
from site_agent.registry import register_dataset


def test_records_are_deterministic_for_a_seed() -> None:
    first = generate_site_records(1, 3, n=50, seed=11)

    assert first == generate_site_records(1, 3, n=50, seed=11)
    assert first != generate_site_records(1, 3, n=50, seed=12)
    assert first != generate_site_records(2, 3, n=50, seed=11)
    assert len(first) == 50
    assert all(set(record) == {"text", "label"} for record in first)
    assert all(record["label"] in SYNTHETIC_LABELS for record in first)


def test_each_site_over_represents_a_different_label() -> None:
    n_sites = 3
    majority = []
    for site in range(n_sites):
        counts = Counter(r["label"] for r in generate_site_records(site, n_sites, n=300))
        label, count = counts.most_common(1)[0]
        assert count / 300 > 0.45
        majority.append(label)

    assert majority == list(SYNTHETIC_LABELS)


def test_sites_write_in_different_styles() -> None:
    def words(site: int) -> set[str]:
        records = generate_site_records(site, 4, n=200)
        return {word for record in records for word in re.findall(r"[a-z]+", record["text"])}

    # Odd sites abbreviate: "sob" instead of "shortness of breath".
    assert "sob" in words(1) and "shortness" not in words(1)
    assert "shortness" in words(0) and "sob" not in words(0)
    assert words(2) != words(0)


def test_keywords_predict_the_label() -> None:
    records = generate_site_records(0, 3, n=600, seed=3)
    keywords = {"troponin": "cardiac", "wheezing": "respiratory", "slurred": "neurological"}

    for keyword, label in keywords.items():
        with_keyword = [r["label"] for r in records if keyword in r["text"]]
        assert with_keyword, keyword
        assert Counter(with_keyword)[label] / len(with_keyword) > 0.6


def test_written_dataset_loads_with_the_declared_labels(tmp_path: Path) -> None:
    records = generate_site_records(0, 2, n=30, seed=5)
    path = write_site_dataset(tmp_path / "nested" / "site0.jsonl", records)

    dataset = register_dataset(
        tmp_path / "data", "site0", path, task_type="seq-classification",
        options={"labels": ",".join(SYNTHETIC_LABELS), "dedupe": "true"},
    )  # fmt: skip

    loaded = sorted((e.text, e.label) for e in (*dataset.train, *dataset.validation, *dataset.test))
    assert loaded == sorted({(r["text"], r["label"]) for r in records})


def test_vocabulary_lists_every_word_the_generator_emits() -> None:
    vocabulary = synthetic_vocabulary()
    for site in range(4):
        for record in generate_site_records(site, 4, n=100):
            for word in re.findall(r"[a-z]+", record["text"]):
                assert word in vocabulary


@pytest.mark.parametrize(
    ("site", "n_sites", "n"), [(3, 3, 10), (-1, 3, 10), (0, 0, 10), (0, 1, -1)]
)
def test_out_of_range_arguments_are_refused(site: int, n_sites: int, n: int) -> None:
    with pytest.raises(ValueError):
        generate_site_records(site, n_sites, n=n)


def test_synthetic_module_does_not_import_torch() -> None:
    code = "import sys, site_agent._synthetic; assert 'torch' not in sys.modules"

    subprocess.run([sys.executable, "-c", code], check=True)
