"""Aggregate statistics at a site: exact sums, the minimum-count rule, noise, text lengths."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from site_agent.examples import InstructionExample, TabularExample, TextExample
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.statistics import (
    LENGTH_BIN_EDGES,
    BelowMinimumCount,
    SiteAggregates,
    compute_statistics,
    length_histogram,
    merge_small_bins,
)
from tests.site_agent_tests.helpers import write_age_chol_csv


def _tabular(
    train: list[TabularExample], **splits: tuple[TabularExample, ...]
) -> RegisteredDataset:
    return RegisteredDataset(
        name="rows",
        task_type="tabular",
        fingerprint="0" * 64,
        train=tuple(train),
        validation=splits.get("validation", ()),
        test=splits.get("test", ()),
        feature_names=("age", "chol", "bp"),
        labels=("0", "1"),
    )


def _rows(count: int, seed: int, shift: float = 0.0) -> list[TabularExample]:
    rng = random.Random(seed)
    return [
        TabularExample(
            features=(rng.gauss(55 + shift, 8), rng.gauss(230, 40), rng.uniform(90, 180)),
            label=str(rng.randint(0, 1)),
        )
        for _ in range(count)
    ]


class _UnusedGenerator:
    """Stands in for a noise generator that must not be drawn from."""

    def normal(self, *args: object) -> None:
        raise AssertionError("noise was drawn")


def test_tabular_sums_and_label_counts_are_exact_over_registered_training_rows(
    tmp_path: Path,
) -> None:
    source = write_age_chol_csv(tmp_path / "rows.csv", seed=3)
    dataset = register_dataset(tmp_path / "registry", "rows", source, task_type="tabular")

    aggregates = compute_statistics(dataset, min_count=10)

    matrix = np.array([row.features for row in dataset.train], dtype=np.float64)
    assert aggregates.count == len(dataset.train)
    assert aggregates.feature_names == ("age", "chol")
    np.testing.assert_allclose(aggregates.feature_sums, matrix.sum(axis=0), rtol=1e-14)
    np.testing.assert_allclose(aggregates.feature_sums_of_squares, (matrix**2).sum(axis=0),
                               rtol=1e-14)  # fmt: skip
    labels = Counter(row.label for row in dataset.train)  # type: ignore[union-attr]
    assert aggregates.label_counts == {label: float(n) for label, n in labels.items()}
    assert aggregates.length_bin_edges == () and aggregates.length_histogram == ()


def test_only_the_training_split_is_read() -> None:
    train = _rows(40, seed=1)
    held_out = tuple(_rows(30, seed=2, shift=500.0))
    # Rows of another kind: reading them at all would fail the request.
    text = (TextExample(text="not a row", label="1"),)
    full = _tabular(train, validation=held_out + text, test=held_out + text)  # type: ignore[arg-type]

    assert compute_statistics(full, min_count=10) == compute_statistics(
        dataclasses.replace(full, validation=(), test=()), min_count=10
    )
    assert compute_statistics(full, min_count=10).count == 40


def test_aggregates_refuse_to_leave_below_the_minimum_count() -> None:
    # Rows that could not even be summed: the refusal comes before any computation.
    broken = [TabularExample(features=(1.0,), label="0"), TextExample(text="x", label="1")] * 4
    dataset = _tabular(broken)  # type: ignore[arg-type]
    with pytest.raises(BelowMinimumCount, match="8 training rows, fewer than the 10"):
        compute_statistics(dataset, min_count=10, noise_std=1.0, rng=_UnusedGenerator())  # type: ignore[arg-type]

    exactly = _tabular(_rows(10, seed=4))
    assert compute_statistics(exactly, min_count=10).count == 10
    with pytest.raises(BelowMinimumCount):
        compute_statistics(exactly, min_count=11)


def test_noise_is_added_to_every_released_number_with_the_requested_std() -> None:
    dataset = _tabular(_rows(25, seed=5))
    exact = compute_statistics(dataset, min_count=10)
    rng = np.random.default_rng(12345)
    draws = [compute_statistics(dataset, min_count=10, noise_std=3.0, rng=rng) for _ in range(2000)]

    def released(a: SiteAggregates) -> list[float]:
        return [a.count, *a.feature_sums, *a.feature_sums_of_squares,
                *(a.label_counts[k] for k in sorted(a.label_counts))]  # fmt: skip

    errors = np.array([released(d) for d in draws]) - np.array(released(exact))
    assert (errors != 0).all()
    # Each of the 9 released numbers gets independent N(0, 3^2) noise.
    np.testing.assert_allclose(errors.std(axis=0), 3.0, rtol=0.08)
    assert np.abs(errors.mean(axis=0)).max() < 5 * 3.0 / np.sqrt(len(draws))
    assert abs(np.corrcoef(errors[:, 0], errors[:, 1])[0, 1]) < 0.1
    assert draws[0].feature_names == exact.feature_names

    # By default a fresh OS-seeded generator: two requests never share their noise.
    first, second = (compute_statistics(dataset, min_count=10, noise_std=1.0) for _ in range(2))
    assert first.count != second.count


def test_text_rows_give_label_counts_and_a_word_length_histogram() -> None:
    lengths = [1, 7, 8, 15, 16, 40, 40, 300, 1024, 2000, 3, 64]
    rows = tuple(
        TextExample(text=" ".join(["word"] * n), label="long" if n >= 64 else "short")
        for n in lengths
    )
    dataset = RegisteredDataset(
        name="notes", task_type="seq-classification", fingerprint="0" * 64,
        train=rows, validation=rows, test=rows, labels=("long", "short"),
    )  # fmt: skip

    # min_count 1: only the empty bins are merged (into the bin before them).
    aggregates = compute_statistics(dataset, min_count=1)

    assert aggregates.length_unit == "words"
    assert LENGTH_BIN_EDGES == (0, 8, 16, 32, 64, 128, 256, 512, 1024)
    # [0,8): 1,7,3  [8,16): 8,15  [16,32): 16  [32,64): 40,40  [64,128): 64  [256,512): 300
    # [1024, inf): 1024, 2000
    assert length_histogram(lengths) == (3.0, 2.0, 1.0, 2.0, 1.0, 0.0, 1.0, 0.0, 2.0)
    assert aggregates.length_bin_edges == (0, 8, 16, 32, 64, 128, 512)
    assert aggregates.length_histogram == (3.0, 2.0, 1.0, 2.0, 1.0, 1.0, 2.0)
    assert aggregates.label_counts == {"long": 4.0, "short": 8.0}
    assert aggregates.count == 12 and aggregates.feature_names == ()


def test_text_lengths_are_counted_in_the_base_models_tokens(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    texts = [" ".join(["chest pain"] * n) for n in range(1, 13)]
    rows = tuple(TextExample(text=t, label="a" if i % 3 else "b") for i, t in enumerate(texts))
    dataset = RegisteredDataset(
        name="notes", task_type="seq-classification", fingerprint="0" * 64, train=rows,
        validation=(), test=(),
    )  # fmt: skip

    aggregates = compute_statistics(dataset, min_count=1, base_model_dir=tiny_model_dir)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    expected = np.bincount(np.searchsorted(LENGTH_BIN_EDGES, lengths, side="right") - 1,
                           minlength=len(LENGTH_BIN_EDGES))  # fmt: skip
    assert aggregates.length_unit == "tokens"
    assert (aggregates.length_bin_edges, aggregates.length_histogram) == merge_small_bins(
        LENGTH_BIN_EDGES, tuple(float(n) for n in expected), 1
    )
    assert aggregates.label_counts == {"a": 8.0, "b": 4.0}


def test_instruction_rows_are_measured_with_their_responses_and_have_no_labels() -> None:
    rows = tuple(
        InstructionExample(instruction="what causes fever ?", response=" ".join(["x"] * n))
        for n in range(10)
    )
    dataset = RegisteredDataset(name="pairs", task_type="causal-lm", fingerprint="0" * 64,
                                train=rows, validation=(), test=())  # fmt: skip

    aggregates = compute_statistics(dataset, min_count=1)

    # 4 instruction words + 0..9 response words: 4..7 in [0, 8), 8..13 in [8, 16).
    assert aggregates.length_bin_edges == (0, 8)
    assert aggregates.length_histogram == (4.0, 6.0)
    assert sum(aggregates.length_histogram) == 10
    assert aggregates.label_counts == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_count": 0}, "min_count must be >= 1"),
        ({"min_count": 5, "noise_std": -1.0}, "noise_std must be finite"),
        ({"min_count": 5, "noise_std": float("nan")}, "noise_std must be finite"),
    ],
)
def test_invalid_requests_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_statistics(_tabular(_rows(20, seed=6)), **kwargs)  # type: ignore[arg-type]


def test_non_finite_features_are_refused() -> None:
    rows = [*_rows(12, seed=7), TabularExample(features=(1.0, float("inf"), 2.0), label="0")]
    with pytest.raises(ValueError, match="non-finite"):
        compute_statistics(_tabular(rows), min_count=10)
