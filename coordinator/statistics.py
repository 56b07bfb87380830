"""Combines sites' aggregate statistics into pooled ones and a global normaliser (pure functions).

Sites release counts, per-feature sums and sums of squares, label counts and text-length
histograms (see ``site_agent.statistics``); pooled they give the mean and sample standard
deviation of the union of the sites' training rows, without any row leaving a site.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from coordinator.plan import RunPlan, parse_plan
from protocols.statistics import SiteAggregates, StatisticsMismatch

__all__ = [
    "CombinedStatistics",
    "SiteAggregates",
    "StatisticsMismatch",
    "combine",
    "normaliser_options",
    "plan_with_normaliser",
]


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

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["label_counts"] = dict(self.label_counts)
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
        )


def combine(aggregates: Sequence[SiteAggregates]) -> CombinedStatistics:
    """Pools per-site aggregates.

    count = sum of counts; mean = sum of sums / count; sample variance =
    (sum of sums of squares - count * mean^2) / (count - 1), clipped at 0 (noise or rounding
    can push it below), all in float64 with exactly rounded sums; label counts are summed
    (a site that suppressed a label adds nothing to it and its share to ``<suppressed>``, so a
    pooled label count is a lower bound where a site suppressed it). Sites merge small length
    bins, so their bins may differ: the pooled histogram has the bins every site's bins fit in
    (the lower edges all sites released) and sums each site's bins into them.

    Raises:
        StatisticsMismatch: If there are no aggregates, sites report different feature names,
            units or histograms of different first edges, or the pooled count is too small for
            a sample variance.
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


class _StatisticsView(_Normaliser, Protocol):
    @property
    def status(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def task_type(self) -> str: ...


def plan_with_normaliser(plan: RunPlan, statistics: _StatisticsView) -> RunPlan:
    """The tabular plan with global normalisation by a done statistics request of its dataset.

    The mean and std become plan options, so they are part of the run's approval bundle.

    Raises:
        ValueError: If the plan is not tabular, the statistics are not done, are of another
            dataset or task, or the plan already chose another normalisation.
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
    clashing = sorted(set(plan.options) & {"mean", "std"})
    if chosen != "global" or clashing:
        raise ValueError(
            "the plan's options already set "
            + (f"normalisation {chosen!r}" if chosen != "global" else ", ".join(clashing))
            + "; remove them to use the collected normaliser"
        )
    document = json.loads(plan.to_json())
    document["options"] = {**plan.options, **options}
    return parse_plan(document)
