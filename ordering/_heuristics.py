"""Heuristic seed orders from cheap cross-site probes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ordering._plan import CandidatePlan
    from ordering._space import SearchSpace

__all__ = [
    "SHORT_CYCLES_FINAL_FRACTION",
    "SHORT_CYCLES_LEARNING_RATE_POSITION",
    "probe_order",
    "short_cycles_seed",
    "site_typicality",
]


def site_typicality(
    cross_scores: Mapping[tuple[str, str], float], *, higher_is_better: bool = True
) -> dict[str, float]:
    """How typical each site's data is: the mean score its probe model gets at the other sites.

    Args:
        cross_scores: ``cross_scores[(trained_at, evaluated_at)]``: the score of a model briefly
            trained at one site and evaluated at another. Same-site entries are ignored; every
            other pair of the sites named must be present.
        higher_is_better: False for losses (typicality is then the negated mean loss).

    Raises:
        ValueError: If a pair is missing or a score is not finite.
    """
    sites = sorted({site for pair in cross_scores for site in pair})
    if len(sites) < 2:
        raise ValueError("cross-site scores need at least two sites")
    missing = [
        (a, b) for a in sites for b in sites if a != b and (a, b) not in cross_scores
    ]  # fmt: skip
    if missing:
        raise ValueError(f"cross-site scores lack {len(missing)} pairs, e.g. {missing[:3]}")
    sign = 1.0 if higher_is_better else -1.0
    typicality: dict[str, float] = {}
    for a in sites:
        scores = [float(cross_scores[(a, b)]) for b in sites if b != a]
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"cross-site scores of the model trained at {a!r} are not finite")
        typicality[a] = sign * math.fsum(scores) / len(scores)
    return typicality


def probe_order(
    cross_scores: Mapping[tuple[str, str], float], *, higher_is_better: bool = True
) -> tuple[str, ...]:
    """A seed order: least typical site first, most typical last.

    Sequential training forgets early sites most, so the sites whose data best represents the
    others go last and the outliers go first, where later visits can still pull the model back
    toward the consortium. Ties are broken by site name.

    Args:
        cross_scores: As for `site_typicality`.
        higher_is_better: False for losses.
    """
    typicality = site_typicality(cross_scores, higher_is_better=higher_is_better)
    return tuple(sorted(typicality, key=lambda site: (typicality[site], site)))


# Baton's default starting schedule (`short_cycles_seed`): where in the learning-rate range it
# starts (0 = low end, 1 = high end, on the log scale) and the fraction of that rate its last
# regular hop trains at. Chosen on development splits of MedQuAD (splits 100-102, never the
# reported ones; benchmarks/results/mq7-default-dev.md).
SHORT_CYCLES_LEARNING_RATE_POSITION = 1.0
SHORT_CYCLES_FINAL_FRACTION = 0.3


def short_cycles_seed(
    space: SearchSpace,
    order: Sequence[str],
    *,
    learning_rate_position: float = SHORT_CYCLES_LEARNING_RATE_POSITION,
    final_fraction: float = SHORT_CYCLES_FINAL_FRACTION,
    consolidation_steps: int | None = None,
    consolidation_learning_rate_factor: float | None = None,
) -> CandidatePlan:
    """A data-independent first trial for a search: many short cycles, a decaying learning rate.

    Sequential training forgets what early sites taught when visits are long; many short
    visits at a high learning rate, decayed over the run, reach pooled training's accuracy
    where one or two long cycles do not (benchmarks/medquad_gap.py). A search of a few trials
    rarely samples that corner (the most cycles and a learning rate near the top at once), so
    this plan is queued first and the sampler goes on from it.

    The plan depends on the space alone: its most cycles; each site's largest step budget
    (``steps``' high end, split over the cycles when the space splits it); the learning rate at
    `learning_rate_position` of the range on the log scale; a per-hop decay that brings the
    last regular hop to `final_fraction` of that rate (clipped into the space's decay range);
    the shortest consolidation cycle at its lowest factor, when the space has one; the proximal
    term at its low end. Fixed values stay as the space fixes them. A consolidation cycle other
    than the shortest (longer, or at a higher factor) can be asked for instead.

    Args:
        space: The study's space.
        order: The order every cycle repeats (e.g. a size or probe heuristic's).
        learning_rate_position: In [0, 1].
        final_fraction: In (0, 1].
        consolidation_steps: The consolidation cycle's steps per site, when the space has one;
            by default its shortest.
        consolidation_learning_rate_factor: Its learning-rate factor; by default the lowest.

    Raises:
        ValueError: If a fraction is outside its interval.
        SearchSpaceError: If the space cannot build the plan (e.g. it reshuffles every cycle).
    """
    from ordering._space import _span

    if not 0.0 <= learning_rate_position <= 1.0:
        raise ValueError(f"learning_rate_position must be in [0, 1], got {learning_rate_position}")
    if not 0.0 < final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction}")
    cycles = space.max_cycles
    lr_low, lr_high = _span(space.learning_rate)
    learning_rate = min(
        max(
            lr_low,
            math.exp(
                math.log(lr_low) + learning_rate_position * (math.log(lr_high) - math.log(lr_low))
            ),
        ),
        lr_high,
    )  # exp(log(x)) may leave the range by a rounding
    hops = cycles * len(space.sites)
    decay_low, decay_high = _span(space.learning_rate_decay)
    wanted = final_fraction ** (1.0 / (hops - 1)) if hops > 1 else 1.0
    decay = min(max(wanted, decay_low), decay_high)
    return space.plan(
        tuple(order),
        cycles=cycles,
        learning_rate=learning_rate,
        learning_rate_decay=decay,
        steps=int(_span(space.steps)[1]),
        consolidation_steps=consolidation_steps,
        consolidation_learning_rate_factor=consolidation_learning_rate_factor,
        encoding="short-cycles",
    )
