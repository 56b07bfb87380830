"""Aggregate statistics of a site's training rows: what a statistics request may release.

Counts, per-feature sums and sums of squares (tabular), label counts (classification) and a
histogram of text lengths (text tasks), over the registered **train** split only, refused below
a minimum row count, with label and histogram cells below it suppressed or merged, optionally
with Gaussian noise on every released number. No row, text or per-row value leaves this
module. numpy only; the tokenizer (transformers) is imported on demand.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from protocols.statistics import FoldAggregates, SiteAggregates
from site_agent.examples import Example, InstructionExample, TabularExample, TextExample
from site_agent.registry import RegisteredDataset

if TYPE_CHECKING:  # numpy is imported where statistics are computed, not by a site's hello
    import numpy as np

__all__ = [
    "LENGTH_BIN_EDGES",
    "SUPPRESSED_LABEL",
    "BelowMinimumCount",
    "FoldAggregates",
    "SiteAggregates",
    "check_fold_sizes",
    "coarsened_histogram",
    "compute_statistics",
    "l2_sensitivity",
    "length_histogram",
    "merge_small_bins",
    "noised",
    "suppress_small_labels",
]

logger = logging.getLogger(__name__)

# Lower edges of the text-length bins; the last bin is open-ended ([1024, inf)).
LENGTH_BIN_EDGES: tuple[int, ...] = (0, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENIZE_BATCH = 256
# The one label cell that stands for every label suppressed below the minimum count.
SUPPRESSED_LABEL = "<suppressed>"


class BelowMinimumCount(ValueError):
    """The training split holds fewer rows than the minimum any released aggregate must cover."""


def compute_statistics(
    dataset: RegisteredDataset,
    *,
    min_count: int,
    noise_std: float = 0.0,
    base_model_dir: Path | None = None,
    rng: np.random.Generator | None = None,
    cv_folds: int = 0,
) -> SiteAggregates:
    """Aggregates of the dataset's training rows, refused below ``min_count`` rows.

    Tabular rows give float64 per-feature sums and sums of squares; classification rows give
    label counts; text rows (``TextExample``, ``InstructionExample``: instruction and response
    together) give a histogram of their lengths in ``LENGTH_BIN_EDGES`` bins, counted in tokens
    of the base model's tokenizer (special tokens included, as the model sees them) when
    ``base_model_dir`` is given, else in whitespace-separated words. Validation and test rows
    are never read. Small cells are never released: label counts below ``min_count`` are
    suppressed (``suppress_small_labels``) and length bins merged with their neighbours until
    each holds ``min_count`` rows (``merge_small_bins``), before any noise is added.

    Args:
        dataset: The registered dataset; only ``dataset.train`` is used.
        min_count: No aggregate over fewer training rows than this is computed (>= 1).
        noise_std: > 0: independent N(0, noise_std^2) noise is added to every released number
            (count, sums, sums of squares, label counts, histogram bins).
        base_model_dir: Where the base model's tokenizer lives (text tasks; local files only).
        rng: The noise generator; default a fresh one seeded by the operating system.
        cv_folds: > 1 (tabular only): also, per cross-validation fold as
            ``RegisteredDataset.fold_ids`` deals them, the count, sums and sums of squares of
            the training rows outside that fold (what fold k's model trains on); each fold
            must hold at least ``min_count`` rows (``check_fold_sizes``).

    Returns:
        The aggregates to release.

    Raises:
        BelowMinimumCount: If the training split holds fewer than ``min_count`` rows, or a
            fold does; nothing is computed then.
        ValueError: If ``min_count``, ``noise_std`` or ``cv_folds`` is invalid, the rows are
            of mixed kinds or lengths, a value is not finite, or the tokenizer cannot be
            loaded.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
    rows = dataset.train
    if len(rows) < min_count:
        raise BelowMinimumCount(
            f"dataset {dataset.name!r} has {len(rows)} training rows, fewer than the "
            f"{min_count} any released aggregate must cover"
        )
    kinds = {type(row) for row in rows}
    if len(kinds) != 1:
        names = ", ".join(sorted(kind.__name__ for kind in kinds))
        raise ValueError(f"dataset {dataset.name!r} mixes example kinds: {names}")
    [kind] = kinds
    if cv_folds and kind is not TabularExample:
        raise ValueError(
            f"per-fold statistics are for tabular datasets; {dataset.name!r} holds "
            f"{kind.__name__} rows"
        )
    if cv_folds:
        check_fold_sizes(dataset, cv_folds, min_count)
    if kind is TabularExample:
        aggregates = _tabular(dataset, rows, cv_folds)
    elif kind in (TextExample, InstructionExample):
        aggregates = _text(rows, base_model_dir)
    else:
        raise ValueError(f"no aggregate statistics for {kind.__name__} rows")
    logger.info(
        "statistics of %s: %d training rows%s",
        dataset.name,
        len(rows),
        f", noise std {noise_std}" if noise_std > 0 else "",
    )
    edges, histogram = merge_small_bins(
        aggregates.length_bin_edges, aggregates.length_histogram, min_count
    )
    aggregates = dataclasses.replace(
        aggregates,
        label_counts=suppress_small_labels(aggregates.label_counts, min_count),
        length_bin_edges=edges,
        length_histogram=histogram,
    )
    if noise_std > 0:
        import numpy as np

        aggregates = noised(aggregates, noise_std, rng or np.random.default_rng())
    return aggregates


def check_fold_sizes(dataset: RegisteredDataset, folds: int, min_count: int) -> None:
    """Refuses per-fold statistics unless every fold holds at least ``min_count`` rows.

    Within one answer, fold k's training part differs from the whole training split by exactly
    fold k's rows, and two folds' training parts by those two folds' rows: every difference of
    two aggregates of that answer then covers at least ``min_count`` rows. That bound is per
    partition only: answers at several fold counts partition the same rows independently and
    together nearly determine single rows, so the site releases one fold count per training
    set (``site_agent.releases``, ``fold-count-released``).

    Raises:
        BelowMinimumCount: If a fold holds fewer rows.
        ValueError: If ``folds`` < 2 or exceeds the training rows.
    """
    sizes = Counter(dataset.fold_ids(folds))
    smallest = min(sizes[fold] for fold in range(folds))
    if smallest < min_count:
        raise BelowMinimumCount(
            f"dataset {dataset.name!r} has {len(dataset.train)} training rows: with {folds} "
            f"folds its smallest fold holds {smallest}, fewer than the {min_count} any released "
            "aggregate (or difference of two) must cover"
        )


def suppress_small_labels(counts: Mapping[str, float], min_count: int) -> dict[str, float]:
    """Label counts with every cell under ``min_count`` folded into one ``<suppressed>`` cell.

    Labels below the minimum are removed. If their total is itself below the minimum, the
    smallest released labels join them until it is not (otherwise the total row count minus
    the released labels would give the small cell back); the ``<suppressed>`` cell then holds
    that total, which always reaches the minimum when the labels together do. If it cannot
    (every label together is below the minimum), no label count is released at all.

    Raises:
        ValueError: If a label is itself named ``<suppressed>``.
    """
    if SUPPRESSED_LABEL in counts:
        raise ValueError(f"a label is named {SUPPRESSED_LABEL!r}, which marks suppressed labels")
    released = {label: n for label, n in counts.items() if n >= min_count}
    hidden = math.fsum(n for n in counts.values() if n < min_count)
    if hidden == 0:
        return released
    for label in sorted(released, key=lambda k: (released[k], k)):
        if hidden >= min_count:
            break
        hidden += released.pop(label)
    if hidden < min_count:
        return {}
    return {**released, SUPPRESSED_LABEL: hidden}


def merge_small_bins(
    edges: Sequence[int], histogram: Sequence[float], min_count: int
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Merges adjacent histogram bins until each holds at least ``min_count`` rows.

    From the first bin up, bins are joined until the group reaches the minimum; a last group
    that stays below it joins the group before it. The merged histogram keeps the lower edge
    of each group, so its bins are unions of the original ones and its total is unchanged.
    Empty bins are merged like small ones. A histogram whose total is below the minimum
    becomes one bin.
    """
    merged_edges: list[int] = []
    merged: list[float] = []
    group_edge: int | None = None
    group = 0.0
    for edge, count in zip(edges, histogram, strict=True):
        if group_edge is None:
            group_edge, group = edge, 0.0
        group += count
        if group >= min_count:
            merged_edges.append(group_edge)
            merged.append(group)
            group_edge = None
    if group_edge is not None:
        if merged:
            merged[-1] += group
        else:
            merged_edges.append(group_edge)
            merged.append(group)
    return tuple(merged_edges), tuple(merged)


def coarsened_histogram(aggregates: SiteAggregates, kept_edges: Iterable[int]) -> SiteAggregates:
    """The aggregates with their histogram bins joined so that only ``kept_edges`` remain.

    Each bin joins the kept bin whose lower edge is the largest not above its own; the first
    edge is always kept. Releasing a coarsening of an earlier release's bins tells nothing the
    earlier release did not.
    """
    edges = aggregates.length_bin_edges
    if not edges:
        return aggregates
    kept = sorted({edges[0], *(e for e in kept_edges if e in edges)})
    sums = [0.0] * len(kept)
    for edge, count in zip(edges, aggregates.length_histogram, strict=True):
        sums[bisect.bisect_right(kept, edge) - 1] += count
    return dataclasses.replace(
        aggregates, length_bin_edges=tuple(kept), length_histogram=tuple(sums)
    )


def l2_sensitivity(dataset: RegisteredDataset, aggregates: SiteAggregates) -> float:
    """How far one training row more or less moves the released numbers, in L2 norm.

    The count, one label cell and one histogram bin each move by 1; each feature's sum by
    up to B and its sum of squares by up to B^2, where B is the largest absolute feature value
    in the training split (a bound taken from the data itself: see docs/statistics.md).
    Per-fold aggregates add, for k folds, the count, sums and sums of squares of the k - 1
    fold training parts a row belongs to.
    """
    squared = 1.0
    if aggregates.label_counts:
        squared += 1.0
    if aggregates.length_histogram:
        squared += 1.0
    if aggregates.feature_names:
        bound = max(
            (abs(v) for row in dataset.train if isinstance(row, TabularExample)
             for v in row.features),
            default=0.0,
        )  # fmt: skip
        per_row = len(aggregates.feature_names) * (bound**2 + bound**4)
        squared += per_row
        if aggregates.folds:
            squared += (len(aggregates.folds) - 1) * (1.0 + per_row)
    return math.sqrt(squared)


def _tabular(
    dataset: RegisteredDataset, rows: Sequence[Example], cv_folds: int = 0
) -> SiteAggregates:
    import numpy as np

    tabular = [row for row in rows if isinstance(row, TabularExample)]
    widths = {len(row.features) for row in tabular}
    if len(widths) != 1:
        raise ValueError(f"dataset {dataset.name!r} has training rows of {sorted(widths)} features")
    matrix = np.asarray([row.features for row in tabular], dtype=np.float64)
    if not np.isfinite(matrix).all():
        raise ValueError(f"dataset {dataset.name!r} has non-finite feature values")
    names = dataset.feature_names or tuple(f"x{index}" for index in range(matrix.shape[1]))
    if len(names) != matrix.shape[1]:
        raise ValueError(
            f"dataset {dataset.name!r} names {len(names)} features but its rows hold "
            f"{matrix.shape[1]}"
        )
    folds: list[FoldAggregates] = []
    if cv_folds:
        ids = np.asarray(dataset.fold_ids(cv_folds))
        for fold in range(cv_folds):
            part = matrix[ids != fold]  # what fold k's model trains on
            folds.append(
                FoldAggregates(
                    fold=fold,
                    count=float(len(part)),
                    feature_sums=tuple(float(v) for v in part.sum(axis=0)),
                    feature_sums_of_squares=tuple(float(v) for v in np.square(part).sum(axis=0)),
                )
            )
    return SiteAggregates(
        count=float(len(tabular)),
        feature_names=tuple(names),
        feature_sums=tuple(float(v) for v in matrix.sum(axis=0)),
        feature_sums_of_squares=tuple(float(v) for v in np.square(matrix).sum(axis=0)),
        label_counts=_label_counts(row.label for row in tabular),
        folds=tuple(folds),
    )


def _text(rows: Sequence[Example], base_model_dir: Path | None) -> SiteAggregates:
    texts: list[str] = []
    labels: list[str] = []
    for row in rows:
        if isinstance(row, TextExample):
            texts.append(row.text)
            labels.append(row.label)
        elif isinstance(row, InstructionExample):
            texts.append(f"{row.instruction}\n{row.response}")
    if base_model_dir is not None:
        lengths, unit = _token_lengths(texts, base_model_dir), "tokens"
    else:
        lengths, unit = [len(text.split()) for text in texts], "words"
    return SiteAggregates(
        count=float(len(rows)),
        label_counts=_label_counts(labels),
        length_bin_edges=LENGTH_BIN_EDGES,
        length_histogram=length_histogram(lengths),
        length_unit=unit,
    )


def length_histogram(lengths: Sequence[int]) -> tuple[float, ...]:
    """Rows per ``LENGTH_BIN_EDGES`` bin: bin i holds lengths in [edge i, edge i+1)."""
    import numpy as np

    edges = np.asarray(LENGTH_BIN_EDGES)
    bins = np.searchsorted(edges, np.asarray(lengths, dtype=np.int64), side="right") - 1
    counts = np.bincount(bins, minlength=len(LENGTH_BIN_EDGES))
    return tuple(float(c) for c in counts)


def _token_lengths(texts: Sequence[str], base_model_dir: Path) -> list[int]:
    from site_agent._library_logs import route_library_output

    route_library_output()  # a site with only tabular trainers loads transformers here first
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot load the base model's tokenizer from {base_model_dir}: {exc}"
        ) from exc
    lengths: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = list(texts[start : start + _TOKENIZE_BATCH])
        encoded = tokenizer(batch, add_special_tokens=True, truncation=False)["input_ids"]
        lengths.extend(len(ids) for ids in encoded)
    return lengths


def _label_counts(labels: Iterable[str]) -> dict[str, float]:
    counts = Counter(labels)
    return {label: float(counts[label]) for label in sorted(counts)}


def noised(aggregates: SiteAggregates, std: float, rng: np.random.Generator) -> SiteAggregates:
    """Every released number plus independent N(0, std^2) noise."""
    import numpy as np

    def noisy(values: Sequence[float]) -> tuple[float, ...]:
        return tuple(float(v) for v in np.asarray(values) + rng.normal(0.0, std, len(values)))

    labels = sorted(aggregates.label_counts)
    noisy_labels = noisy([aggregates.label_counts[label] for label in labels])
    return SiteAggregates(
        count=noisy([aggregates.count])[0],
        feature_names=aggregates.feature_names,
        feature_sums=noisy(aggregates.feature_sums),
        feature_sums_of_squares=noisy(aggregates.feature_sums_of_squares),
        label_counts=dict(zip(labels, noisy_labels, strict=True)),
        length_bin_edges=aggregates.length_bin_edges,
        length_histogram=noisy(aggregates.length_histogram),
        length_unit=aggregates.length_unit,
        folds=tuple(
            FoldAggregates(
                fold=f.fold,
                count=noisy([f.count])[0],
                feature_sums=noisy(f.feature_sums),
                feature_sums_of_squares=noisy(f.feature_sums_of_squares),
            )
            for f in aggregates.folds
        ),
    )
