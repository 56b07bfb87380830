"""Combines sites' aggregate statistics into pooled ones and a global normaliser (pure functions).

Sites release counts, per-feature sums and sums of squares, label counts and text-length
histograms (see ``site_agent.statistics``); pooled they give the mean and sample standard
deviation of the union of the sites' training rows, without any row leaving a site. A per-fold
request also pools, per cross-validation fold, the sites' training parts of that fold: fold k's
normaliser never sees a row that fold k's model is scored on.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from coordinator.plan import RunPlan, parse_plan
from protocols.statistics import (
    FOLD_NORMALISERS_OPTION,
    FoldAggregates,
    SiteAggregates,
    StatisticsMismatch,
)

__all__ = [
    "FOLD_NORMALISERS_OPTION",
    "CombinedStatistics",
    "FoldAggregates",
    "FoldNormaliser",
    "SiteAggregates",
    "StatisticsMismatch",
    "combine",
    "fold_normaliser_options",
    "normaliser_options",
    "plan_with_normaliser",
]


@dataclass(frozen=True)
class FoldNormaliser:
    """The pooled mean and sample std of one fold's training parts (every site's rows outside
    fold ``fold``): what fold ``fold``'s model normalises with in a cross-validation run."""

    fold: int
    count: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {"fold": self.fold, "count": self.count, "mean": list(self.mean),
                "std": list(self.std)}  # fmt: skip

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> FoldNormaliser:
        return cls(
            fold=int(document["fold"]),
            count=float(document["count"]),
            mean=tuple(float(v) for v in document["mean"]),
            std=tuple(float(v) for v in document["std"]),
        )


@dataclass(frozen=True)
class CombinedStatistics:
    """The pooled statistics of every site's training rows."""

    count: float
    feature_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()  # sample standard deviation (n - 1)
    label_counts: Mapping[str, float] = field(default_factory=dict)
    length_bin_edges: tuple[int, ...] = ()
    length_histogram: tuple[float, ...] = ()
    length_unit: str = ""
    folds: tuple[FoldNormaliser, ...] = ()  # per-fold requests: fold k's normaliser

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["label_counts"] = dict(self.label_counts)
        if self.folds:
            document["folds"] = [fold.to_json() for fold in self.folds]
        else:
            del document["folds"]  # results without folds keep the shape they always had
        for key in ("feature_names", "mean", "std", "length_bin_edges", "length_histogram"):
            document[key] = list(document[key])
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> CombinedStatistics:
        return cls(
            count=float(document["count"]),
            feature_names=tuple(str(v) for v in document.get("feature_names", ())),
            mean=tuple(float(v) for v in document.get("mean", ())),
            std=tuple(float(v) for v in document.get("std", ())),
            label_counts={str(k): float(v) for k, v in document.get("label_counts", {}).items()},
            length_bin_edges=tuple(int(v) for v in document.get("length_bin_edges", ())),
            length_histogram=tuple(float(v) for v in document.get("length_histogram", ())),
            length_unit=str(document.get("length_unit", "")),
            folds=tuple(FoldNormaliser.from_json(f) for f in document.get("folds", ())),
        )


def combine(aggregates: Sequence[SiteAggregates], *, cv_folds: int = 0) -> CombinedStatistics:
    """Pools per-site aggregates.

    count = sum of counts; mean = sum of sums / count; sample variance =
    (sum of sums of squares - count * mean^2) / (count - 1), clipped at 0 (noise or rounding
    can push it below), all in float64 with exactly rounded sums; label counts are summed
    (a site that suppressed a label adds nothing to it and its share to ``<suppressed>``, so a
    pooled label count is a lower bound where a site suppressed it). Sites merge small length
    bins, so their bins may differ: the pooled histogram has the bins every site's bins fit in
    (the lower edges all sites released) and sums each site's bins into them.

    With ``cv_folds`` every site must have released that many folds; fold k's normaliser pools
    the sites' fold-k training parts the same way (count, mean, sample std).

    Raises:
        StatisticsMismatch: If there are no aggregates, sites report different feature names,
            units or histograms of different first edges, a site released other folds than
            asked for, or a pooled count is too small for a sample variance.
    """
    if not aggregates:
        raise StatisticsMismatch("no site aggregates to combine")
    first = aggregates[0]
    for other in aggregates[1:]:
        for what, mine, theirs in (
            ("feature names", first.feature_names, other.feature_names),
            ("first length bin", first.length_bin_edges[:1], other.length_bin_edges[:1]),
            ("length unit", first.length_unit, other.length_unit),
        ):
            if mine != theirs:
                raise StatisticsMismatch(
                    f"sites report different {what}: {first.site} {_shown(mine)}, "
                    f"{other.site} {_shown(theirs)}"
                )
    count = math.fsum(a.count for a in aggregates)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    if first.feature_names:
        if not count > 1:
            raise StatisticsMismatch(
                f"the pooled count {count:g} is too small for a mean and standard deviation"
            )
        columns = range(len(first.feature_names))
        sums = [math.fsum(a.feature_sums[i] for a in aggregates) for i in columns]
        squares = [math.fsum(a.feature_sums_of_squares[i] for a in aggregates) for i in columns]
        mean = tuple(s / count for s in sums)
        std = tuple(
            math.sqrt(max((q - count * m * m) / (count - 1), 0.0))
            for q, m in zip(squares, mean, strict=True)
        )
    labels = sorted({label for a in aggregates for label in a.label_counts})
    edges, histogram = _pooled_histogram(aggregates)
    folds: list[FoldNormaliser] = []
    for a in aggregates:
        if len(a.folds) != cv_folds:
            raise StatisticsMismatch(
                f"site {a.site} released {len(a.folds)} folds; the request asked for {cv_folds}"
            )
    for fold in range(cv_folds):
        pooled = combine([
            SiteAggregates(site=a.site, count=a.folds[fold].count,
                           feature_names=a.feature_names,
                           feature_sums=a.folds[fold].feature_sums,
                           feature_sums_of_squares=a.folds[fold].feature_sums_of_squares)
            for a in aggregates
        ])  # fmt: skip
        folds.append(FoldNormaliser(fold, pooled.count, pooled.mean, pooled.std))
    return CombinedStatistics(
        count=count,
        feature_names=first.feature_names,
        mean=mean,
        std=std,
        label_counts={
            label: math.fsum(a.label_counts.get(label, 0.0) for a in aggregates) for label in labels
        },
        length_bin_edges=edges,
        length_histogram=histogram,
        length_unit=first.length_unit,
        folds=tuple(folds),
    )


def _pooled_histogram(
    aggregates: Sequence[SiteAggregates],
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The histograms summed over the lower edges every site released.

    Each site's bins are unions of the same fixed bins, so each lies inside one common bin:
    the one with the largest common edge not above its own lower edge.
    """
    common = sorted(set.intersection(*(set(a.length_bin_edges) for a in aggregates)))
    parts: list[list[float]] = [[] for _ in common]
    for a in aggregates:
        for edge, count in zip(a.length_bin_edges, a.length_histogram, strict=True):
            parts[bisect.bisect_right(common, edge) - 1].append(count)
    return tuple(common), tuple(math.fsum(part) for part in parts)


def _shown(value: object) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


class _Normaliser(Protocol):
    @property
    def feature_names(self) -> Sequence[str]: ...
    @property
    def mean(self) -> Sequence[float]: ...
    @property
    def std(self) -> Sequence[float]: ...


def normaliser_options(statistics: _Normaliser) -> dict[str, Any]:
    """A tabular run plan's ``options`` for global normalisation with these statistics.

    Accepts ``CombinedStatistics`` or the admin view (``StatisticsStatus``), which must be done.

    Raises:
        ValueError: If the statistics are not done or hold no per-feature mean and std.
    """
    status = getattr(statistics, "status", "done")
    if status != "done":
        raise ValueError(f"the statistics are {status}, not done")
    if not statistics.feature_names or len(statistics.mean) != len(statistics.feature_names):
        raise ValueError("the statistics hold no per-feature mean and std (not a tabular request)")
    return {
        "normalisation": "global",
        "mean": [float(v) for v in statistics.mean],
        "std": [float(v) for v in statistics.std],
    }


class _FoldNormaliserView(Protocol):
    @property
    def fold(self) -> int: ...
    @property
    def mean(self) -> Sequence[float]: ...
    @property
    def std(self) -> Sequence[float]: ...


class _FoldsView(Protocol):
    @property
    def feature_names(self) -> Sequence[str]: ...
    @property
    def folds(self) -> Sequence[_FoldNormaliserView]: ...


def fold_normaliser_options(statistics: _FoldsView) -> dict[str, Any]:
    """A cross-validation run's option holding the per-fold normalisers (empty without folds).

    Fold k's model then normalises with fold k's entry; the run's ``mean`` and ``std`` (the
    global normaliser, which a final run keeps) are not used by its fold models.
    Accepts ``CombinedStatistics`` or the admin view (``StatisticsStatus``).
    """
    if not statistics.folds:
        return {}
    return {
        FOLD_NORMALISERS_OPTION: [
            {"mean": [float(v) for v in fold.mean], "std": [float(v) for v in fold.std]}
            for fold in sorted(statistics.folds, key=lambda f: f.fold)
        ]
    }


class _StatisticsView(_Normaliser, _FoldsView, Protocol):
    @property
    def status(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def task_type(self) -> str: ...


def plan_with_normaliser(plan: RunPlan, statistics: _StatisticsView) -> RunPlan:
    """The tabular plan with global normalisation by a done statistics request of its dataset.

    The mean and std become plan options, so they are part of the run's approval bundle. A
    cross-validation plan also gets the per-fold normalisers (``fold_normalisers``) when the
    statistics hold them for its number of folds; without them its fold models use the global
    normaliser, fitted on their held-out rows too (slightly optimistic scores).

    Raises:
        ValueError: If the plan is not tabular, the statistics are not done, are of another
            dataset or task, hold folds for another number of folds than the plan's
            cross-validation, or the plan already chose another normalisation.
    """
    if plan.task != "tabular":
        raise ValueError(f"a global normaliser applies to tabular runs, not {plan.task}")
    if statistics.task_type != "tabular" or statistics.dataset != plan.dataset:
        raise ValueError(
            f"the statistics are of {statistics.task_type} dataset {statistics.dataset!r}; "
            f"the plan trains on tabular dataset {plan.dataset!r}"
        )
    options = normaliser_options(statistics)
    chosen = plan.options.get("normalisation", "global")
    clashing = sorted(set(plan.options) & {"mean", "std", FOLD_NORMALISERS_OPTION})
    if chosen != "global" or clashing:
        raise ValueError(
            "the plan's options already set "
            + (f"normalisation {chosen!r}" if chosen != "global" else ", ".join(clashing))
            + "; remove them to use the collected normaliser"
        )
    if plan.cross_validation is not None and statistics.folds:
        if len(statistics.folds) != plan.cross_validation.folds:
            raise ValueError(
                f"the statistics hold normalisers for {len(statistics.folds)} folds; the plan "
                f"cross-validates over {plan.cross_validation.folds} (collect with --cv-folds "
                f"{plan.cross_validation.folds})"
            )
        options.update(fold_normaliser_options(statistics))
    document = json.loads(plan.to_json())
    document["options"] = {**plan.options, **options}
    return parse_plan(document)
