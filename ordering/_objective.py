"""The seam between the search and whatever runs a plan: executor protocol, outcomes, scores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol

from ordering._plan import CandidatePlan

__all__ = [
    "FAILURE_REASON_ATTR",
    "Aggregation",
    "Direction",
    "PlanExecutor",
    "PlanFailed",
    "PlanPruned",
    "Reporter",
    "SiteScore",
    "TrialOutcome",
    "aggregate",
    "site_forgetting",
]

# The user attribute of a trial the executor declared a failure (collapse, divergence).
FAILURE_REASON_ATTR = "failure_reason"

Aggregation = Literal["mean", "weighted", "worst"]
Direction = Literal["maximize", "minimize"]
AGGREGATIONS: tuple[Aggregation, ...] = ("mean", "weighted", "worst")


@dataclass(frozen=True)
class SiteScore:
    """One site's evaluation of a trial's final model (e.g. k-fold CV accuracy on its train split).

    Attributes:
        site: The evaluating site.
        value: The score.
        examples: How many examples it was computed on (the weight for "weighted").
        folds: How many cross-validation folds it averages.
    """

    site: str
    value: float
    examples: int
    folds: int = 1

    def __post_init__(self) -> None:
        if self.examples < 0 or self.folds < 1:
            raise ValueError(f"site score of {self.site!r}: examples must be >= 0, folds >= 1")

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able form for trial user attributes."""
        return {"site": self.site, "value": self.value, "examples": self.examples,
                "folds": self.folds}  # fmt: skip


@dataclass(frozen=True)
class TrialOutcome:
    """What running one plan produced.

    Attributes:
        site_scores: One score per evaluating site.
        cost_seconds_by_site: Compute seconds each site spent (training and evaluation).
        intermediate: (cycle index, value) after each full cycle, as reported.
        visit_scores: (site, score) right after each visit, in hop order: the visited site's
            score of the model its visit produced (on the same held-out data as
            `site_scores`). Gives each site's forgetting (`site_forgetting`).
        failure_reason: Set when the run finished but its model must not count: it predicts
            one class for every row (collapsed) or its loss diverged. The study marks such a
            trial failed with this reason; it is never selected, reused or inherited.
    """

    site_scores: tuple[SiteScore, ...]
    cost_seconds_by_site: Mapping[str, float]
    intermediate: tuple[tuple[int, float], ...] = ()
    visit_scores: tuple[tuple[str, float], ...] = ()
    failure_reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "site_scores", tuple(self.site_scores))
        object.__setattr__(
            self, "cost_seconds_by_site", MappingProxyType(dict(self.cost_seconds_by_site))
        )
        sites = [score.site for score in self.site_scores]
        if not sites:
            raise ValueError("a trial outcome needs at least one site score")
        if len(set(sites)) != len(sites):
            raise ValueError(f"a trial outcome scores each site once, got {sites}")
        if any(seconds < 0 for seconds in self.cost_seconds_by_site.values()):
            raise ValueError("compute seconds cannot be negative")
        object.__setattr__(
            self, "visit_scores", tuple((str(s), float(v)) for s, v in self.visit_scores)
        )
        if self.failure_reason is not None and not self.failure_reason.strip():
            raise ValueError("a failure reason must say why")

    @property
    def compute_seconds(self) -> float:
        """Total compute seconds across sites."""
        return float(sum(self.cost_seconds_by_site.values()))

    def forgetting(self, direction: Direction = "maximize") -> dict[str, float]:
        """Each visited site's drop from its best post-visit score to its final score
        (`site_forgetting`); empty without visit scores."""
        return site_forgetting(self.visit_scores, self.site_scores, direction)


def site_forgetting(
    visit_scores: Sequence[tuple[str, float]],
    final_scores: Sequence[SiteScore],
    direction: Direction = "maximize",
) -> dict[str, float]:
    """How much of what each site's visits reached the final model lost.

    Args:
        visit_scores: (site, score) after each visit, in hop order.
        final_scores: Every site's score of the final model.
        direction: "maximize" when larger scores are better (accuracy), else "minimize".

    Returns:
        Site -> best post-visit score minus final score (final minus best when minimizing),
        for each site with both; 0 or less means nothing was forgotten. The worst site is
        ``max(result.values())``.
    """
    final = {score.site: score.value for score in final_scores}
    best: dict[str, float] = {}
    pick = max if direction == "maximize" else min
    for site, value in visit_scores:
        best[site] = pick(best[site], value) if site in best else value
    sign = 1.0 if direction == "maximize" else -1.0
    return {site: sign * (best[site] - final[site]) for site in best if site in final}


class PlanPruned(Exception):
    """Raised by the `report` callback when the search stops a trial early.

    Executors let it propagate (after stopping their run). To have the partial run's cost
    counted by site, catch it and re-raise it with `cost_seconds_by_site`; otherwise the
    wall-clock time of the call is recorded under "(unattributed)".
    """

    def __init__(
        self, message: str = "", cost_seconds_by_site: Mapping[str, float] | None = None
    ) -> None:
        super().__init__(message)
        self.cost_seconds_by_site = cost_seconds_by_site


class PlanFailed(Exception):
    """Raised by an executor when a plan's run produced no usable model, e.g. its training
    loss diverged. The study records the trial as failed with the message as its
    ``failure_reason`` and goes on with the next trial.

    Attributes:
        reason: Why, in one line.
        cost_seconds_by_site: Compute the failed run cost, when known.
    """

    def __init__(self, reason: str, cost_seconds_by_site: Mapping[str, float] | None = None):
        if not reason.strip():
            raise ValueError("a failure reason must say why")
        super().__init__(reason)
        self.reason = reason
        self.cost_seconds_by_site = cost_seconds_by_site


class Reporter(Protocol):
    """What an executor calls with a partial schedule's value so a pruner can stop the trial.

    ``report(cycle, value)`` after a full cycle (counted from 0); ``report(cycle, value,
    hop=h)`` after hop ``h`` (its index in ``plan.hops``, counted from 0, within ``cycle``).
    Every value is the same kind of summary (e.g. the mean CV score over all sites of the
    model trained so far), so a value after the last hop of a cycle is that cycle's value.
    It raises `PlanPruned` when the trial should stop.
    """

    def __call__(self, cycle: int, value: float, *, hop: int | None = None) -> None: ...


class PlanExecutor(Protocol):
    """Runs one candidate plan and scores it; a real coordinator run or a simulator."""

    def execute(self, plan: CandidatePlan, *, budget: float, report: Reporter) -> TrialOutcome:
        """Runs `plan` and returns its per-site scores and costs.

        Args:
            plan: The hops to run.
            budget: Fraction of the full training budget (1.0 = as planned; a probe trial gets
                less). Values from different budgets are never compared.
            report: Call ``report(cycle, value)`` at the end of each full cycle, or
                ``report(cycle, value, hop=h)`` after each hop (see `Reporter`), with the same
                kind of summary value every trial reports; it raises `PlanPruned` when the
                trial should stop. An executor whose per-hop values would not be comparable
                between orders (e.g. only the visited site's own score) reports per cycle.
        """
        ...


def aggregate(
    scores: tuple[SiteScore, ...], aggregation: Aggregation, direction: Direction = "maximize"
) -> float:
    """Combines per-site scores into one objective value.

    Args:
        scores: One score per site.
        aggregation: "mean" (unweighted over sites), "weighted" (by examples) or "worst" (the
            lowest score when maximizing, the highest when minimizing).
        direction: Whether larger scores are better.
    """
    if not scores:
        raise ValueError("no site scores to aggregate")
    values = [score.value for score in scores]
    if aggregation == "mean":
        return math.fsum(values) / len(values)
    if aggregation == "weighted":
        total = sum(score.examples for score in scores)
        if total <= 0:
            raise ValueError("weighted aggregation needs site scores with examples > 0")
        return math.fsum(score.value * score.examples for score in scores) / total
    if aggregation == "worst":
        return min(values) if direction == "maximize" else max(values)
    raise ValueError(f"unknown aggregation {aggregation!r}; known: {', '.join(AGGREGATIONS)}")


def objective_values(
    outcome: TrialOutcome,
    aggregation: Aggregation,
    direction: Direction,
    multi_objective: bool,
) -> tuple[float, ...]:
    """The study's objective value(s) for one outcome: (aggregation,) or (aggregation, worst)."""
    first = aggregate(outcome.site_scores, aggregation, direction)
    if not multi_objective:
        return (first,)
    return (first, aggregate(outcome.site_scores, "worst", direction))
