"""A simulated executor with a known best order, for tests and what-if studies."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np

from ordering._objective import PlanPruned, SiteScore, TrialOutcome
from ordering._plan import CandidatePlan
from ordering._space import SearchSpace

__all__ = ["SyntheticObjective"]


class SyntheticObjective:
    """A deterministic stand-in for real runs: every plan gets a score with a known optimum.

    A hidden order `best_order` decides, for every pair of sites, which should come first; each
    pair carries a random weight. A site's score for one cycle is the weighted share of its pairs
    the cycle orders as the hidden order does, so `best_order` (and only it) scores 1 at every
    site. Across cycles, later cycles count more (weight 2**c, as training forgets). The
    hyperparameters scale the score by a factor that is 1 at `optimal_learning_rate` and
    `optimal_steps` (averaged over hops, so learning-rate decay matters) and shrinks with the
    proximal weight. A reduced budget b scales scores by ``0.6 + 0.4 b`` and adds deterministic
    noise of size ``probe_noise * (1 - b)``, so probe values are lower, roughly rank-preserving,
    and not comparable with full-budget values.

    Per-site compute seconds are ``steps * seconds_per_step[site] * budget`` per visit.

    Attributes:
        sites: ``site-0`` .. ``site-<n-1>``.
        best_order: The hidden best order.
        examples: Examples per site (weights of the "weighted" aggregation).
        seconds_per_step: Simulated compute cost per step at each site.
        calls: Plans executed so far.
    """

    def __init__(
        self,
        n_sites: int,
        seed: int,
        *,
        optimal_learning_rate: float = 1e-3,
        optimal_steps: int = 20,
        probe_noise: float = 0.02,
    ) -> None:
        if n_sites < 2:
            raise ValueError("a synthetic objective needs at least two sites")
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.sites = tuple(f"site-{i}" for i in range(n_sites))
        self.best_order = tuple(self.sites[int(i)] for i in rng.permutation(n_sites))
        self._rank = {site: position for position, site in enumerate(self.best_order)}
        upper = np.triu(rng.uniform(0.2, 1.0, size=(n_sites, n_sites)), 1)
        self._weight = upper + upper.T
        self.examples = {site: int(rng.integers(30, 300)) for site in self.sites}
        self.seconds_per_step = {site: float(rng.uniform(0.05, 0.2)) for site in self.sites}
        self.optimal_learning_rate = optimal_learning_rate
        self.optimal_steps = optimal_steps
        self.probe_noise = probe_noise
        self.calls = 0

    best_value = 1.0
    """The full-budget score of `best_order` at the optimal hyperparameters, for every
    aggregation."""

    def default_space(self, cycles: int = 1) -> SearchSpace:
        """An order-only space: the hyperparameters fixed at their optimum."""
        return SearchSpace(
            sites=self.sites,
            cycles=cycles,
            learning_rate=self.optimal_learning_rate,
            steps=self.optimal_steps,
        )

    def _agreement(self, order: tuple[str, ...], site: str) -> float:
        position = {s: p for p, s in enumerate(order)}
        i = self.sites.index(site)
        agreed = total = 0.0
        for j, other in enumerate(self.sites):
            if other == site:
                continue
            weight = float(self._weight[i, j])
            total += weight
            same_side = (position[site] < position[other]) == (self._rank[site] < self._rank[other])
            agreed += weight if same_side else 0.0
        return agreed / total

    def _site_score(self, plan: CandidatePlan, site: str, cycles_done: int) -> float:
        weights = [2.0**c for c in range(cycles_done)]
        agreement = sum(
            w * self._agreement(order, site)
            for w, order in zip(weights, plan.cycle_orders, strict=False)
        )
        return agreement / sum(weights)

    def hyperparameter_factor(self, plan: CandidatePlan) -> float:
        """1 at the optimal hyperparameters, less elsewhere."""
        factors = []
        for hop in plan.hops:
            hp = hop.hyperparameters
            lr_term = math.log10(hp.learning_rate / self.optimal_learning_rate) / 0.5
            steps_term = (hp.steps - self.optimal_steps) / self.optimal_steps
            factors.append(math.exp(-0.5 * (lr_term**2 + steps_term**2)))
        mu = plan.hops[0].hyperparameters.proximal_mu or 0.0
        return math.fsum(factors) / len(factors) * math.exp(-0.5 * mu)

    def _noise(self, plan: CandidatePlan, site: str, budget: float) -> float:
        if budget >= 1.0 or self.probe_noise == 0.0:
            return 0.0
        key = f"{self.seed}|{plan.describe()}|{site}|{budget:g}".encode()
        unit = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64
        return (2.0 * unit - 1.0) * self.probe_noise * (1.0 - budget)

    def score(self, order: tuple[str, ...] | list[str], cycles: int = 1) -> float:
        """The full-budget mean score of a fixed order at the optimal hyperparameters."""
        plan = self.default_space(cycles).plan(tuple(order))
        return math.fsum(self._site_score(plan, s, cycles) for s in self.sites) / len(self.sites)

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        """Scores `plan`, reporting the mean site score after each cycle."""
        self.calls += 1
        scale = self.hyperparameter_factor(plan) * (0.6 + 0.4 * budget)
        cost: dict[str, float] = dict.fromkeys(plan.sites, 0.0)
        hops_per_cycle = len(plan.order)
        for cycle in range(plan.cycles):
            for hop in plan.hops[cycle * hops_per_cycle : (cycle + 1) * hops_per_cycle]:
                steps = hop.hyperparameters.steps
                cost[hop.site] += steps * self.seconds_per_step[hop.site] * budget
            progress = (cycle + 1) / plan.cycles
            summary = progress * scale * math.fsum(
                self._site_score(plan, s, cycle + 1) for s in self.sites
            ) / len(self.sites)  # fmt: skip
            try:
                report(cycle, summary)
            except PlanPruned as exc:
                raise PlanPruned(str(exc), cost_seconds_by_site=cost) from exc
        scores = tuple(
            SiteScore(
                site,
                scale * self._site_score(plan, site, plan.cycles) + self._noise(plan, site, budget),
                self.examples[site],
                folds=5,
            )
            for site in plan.sites
        )
        return TrialOutcome(scores, cost)

    def cross_scores(self, noise: float = 0.0) -> dict[tuple[str, str], float]:
        """Simulated cross-site probe scores in which typicality grows along `best_order`, so
        `probe_order` recovers it when `noise` is small."""
        rng = np.random.default_rng(self.seed + 1)
        n = len(self.sites)
        return {
            (a, b): 0.5 + 0.3 * self._rank[a] / (n - 1) + float(rng.normal(0.0, noise))
            for a in self.sites
            for b in self.sites
            if a != b
        }
