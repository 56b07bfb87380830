"""A site's released aggregate statistics: what the site computes and the coordinator pools."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FOLD_NORMALISERS_OPTION", "FoldAggregates", "SiteAggregates", "StatisticsMismatch"]

# The tabular task option a cross-validation run's fold models read their normalisers from: a
# list whose entry k is {"mean": [...], "std": [...]}, pooled over every site's training rows
# outside fold k (a per-fold statistics request's result).
FOLD_NORMALISERS_OPTION = "fold_normalisers"


class StatisticsMismatch(ValueError):
    """Sites' aggregates cannot be pooled (other features, bins or units), or are too few."""


@dataclass(frozen=True)
class FoldAggregates:
    """A site's aggregates of one cross-validation fold's training part (the rows outside it)."""

    fold: int
    count: float
    feature_sums: tuple[float, ...]
    feature_sums_of_squares: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "count": self.count,
            "feature_sums": list(self.feature_sums),
            "feature_sums_of_squares": list(self.feature_sums_of_squares),
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> FoldAggregates:
        return cls(
            fold=int(document["fold"]),
            count=float(document["count"]),
            feature_sums=tuple(float(v) for v in document["feature_sums"]),
            feature_sums_of_squares=tuple(float(v) for v in document["feature_sums_of_squares"]),
        )


@dataclass(frozen=True)
class SiteAggregates:
    """One site's released aggregates (floats: they may carry noise).

    The site computes them (``site_agent.statistics``); the coordinator stores them with `site`
    set to the site that released them, and refuses inconsistent ones (`StatisticsMismatch`).
    """

    count: float
    feature_names: tuple[str, ...] = ()
    feature_sums: tuple[float, ...] = ()
    feature_sums_of_squares: tuple[float, ...] = ()
    label_counts: Mapping[str, float] = field(default_factory=dict)
    length_bin_edges: tuple[int, ...] = ()
    length_histogram: tuple[float, ...] = ()
    length_unit: str = ""
    site: str = ""
    # Per cross-validation fold, in fold order (tabular requests with cv_folds only).
    folds: tuple[FoldAggregates, ...] = ()

    def __post_init__(self) -> None:
        numbers = [
            self.count,
            *self.feature_sums,
            *self.feature_sums_of_squares,
            *self.label_counts.values(),
            *self.length_histogram,
            *(v for f in self.folds for v in (f.count, *f.feature_sums,
                                              *f.feature_sums_of_squares)),
        ]  # fmt: skip
        if not all(math.isfinite(v) for v in numbers):
            raise StatisticsMismatch(f"site {self.site} released non-finite aggregates")
        n = len(self.feature_names)
        if len(self.feature_sums) != n or len(self.feature_sums_of_squares) != n:
            raise StatisticsMismatch(
                f"site {self.site} released {len(self.feature_sums)} sums and "
                f"{len(self.feature_sums_of_squares)} sums of squares for {n} features"
            )
        if len(self.length_histogram) != len(self.length_bin_edges):
            raise StatisticsMismatch(
                f"site {self.site} released {len(self.length_histogram)} histogram bins for "
                f"{len(self.length_bin_edges)} bin edges"
            )
        if [f.fold for f in self.folds] != list(range(len(self.folds))):
            raise StatisticsMismatch(
                f"site {self.site} released folds {[f.fold for f in self.folds]}, not 0, 1, ..."
            )
        for fold in self.folds:
            if len(fold.feature_sums) != n or len(fold.feature_sums_of_squares) != n:
                raise StatisticsMismatch(
                    f"site {self.site} released {len(fold.feature_sums)} sums and "
                    f"{len(fold.feature_sums_of_squares)} sums of squares for {n} features in "
                    f"fold {fold.fold}"
                )
        edges = self.length_bin_edges
        if any(low >= high for low, high in itertools.pairwise(edges)):
            raise StatisticsMismatch(
                f"site {self.site} released length bin edges that do not increase: {list(edges)}"
            )

    def to_json(self) -> dict[str, Any]:
        document = {"site": self.site, **asdict(self)}
        document["label_counts"] = dict(self.label_counts)
        if self.folds:
            document["folds"] = [fold.to_json() for fold in self.folds]
        else:
            del document["folds"]  # answers without folds keep the shape they always had
        for key in ("feature_names", "feature_sums", "feature_sums_of_squares",
                    "length_bin_edges", "length_histogram"):  # fmt: skip
            document[key] = list(document[key])
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> SiteAggregates:
        return cls(
            site=str(document["site"]),
            count=float(document["count"]),
            feature_names=tuple(str(v) for v in document.get("feature_names", ())),
            feature_sums=tuple(float(v) for v in document.get("feature_sums", ())),
            feature_sums_of_squares=tuple(
                float(v) for v in document.get("feature_sums_of_squares", ())
            ),
            label_counts={str(k): float(v) for k, v in document.get("label_counts", {}).items()},
            length_bin_edges=tuple(int(v) for v in document.get("length_bin_edges", ())),
            length_histogram=tuple(float(v) for v in document.get("length_histogram", ())),
            length_unit=str(document.get("length_unit", "")),
            folds=tuple(FoldAggregates.from_json(f) for f in document.get("folds", ())),
        )
