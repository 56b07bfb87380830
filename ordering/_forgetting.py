"""Schedule shapes that limit forgetting: a visit budget split over cycles and a final, short,
low-learning-rate consolidation cycle over every site."""

from __future__ import annotations

import math
from dataclasses import replace

from ordering._plan import CandidatePlan, Hop

__all__ = ["steps_per_visit", "with_consolidation"]


def steps_per_visit(total_steps: int, cycles: int) -> int:
    """Visit length when each site's `total_steps` are spread over `cycles` visits.

    More cycles then means shorter visits at the same compute, so the search can trade one
    long visit (which overwrites what earlier sites taught) for several short ones.
    """
    if total_steps < 1 or cycles < 1:
        raise ValueError(f"total steps and cycles must be at least 1, got {total_steps}, {cycles}")
    return math.ceil(total_steps / cycles)


def with_consolidation(
    plan: CandidatePlan, steps: int, learning_rate_factor: float
) -> CandidatePlan:
    """`plan` followed by one consolidation cycle: every site once more, in the order of the
    plan's last cycle, for `steps` steps at the last hop's learning rate times
    `learning_rate_factor`.

    The extra cycle counts in the returned plan's ``cycles``; its hops continue the seeds.

    Raises:
        ValueError: If `steps` < 1 or the factor is not in (0, 1].
    """
    if steps < 1:
        raise ValueError(f"consolidation steps must be at least 1, got {steps}")
    if not (math.isfinite(learning_rate_factor) and 0 < learning_rate_factor <= 1):
        raise ValueError(
            f"consolidation learning-rate factor must be in (0, 1], got {learning_rate_factor}"
        )
    last = plan.hops[-1].hyperparameters
    order = plan.cycle_orders[-1]
    extra = tuple(
        Hop(
            site,
            replace(
                last,
                learning_rate=last.learning_rate * learning_rate_factor,
                steps=steps,
                seed=last.seed + 1 + i,
            ),
        )
        for i, site in enumerate(order)
    )
    return replace(
        plan,
        hops=plan.hops + extra,
        cycles=plan.cycles + 1,
        cycle_orders=(*plan.cycle_orders, order),
    )
