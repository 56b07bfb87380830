"""Heuristic seed orders from cheap cross-site probes."""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["probe_order", "site_typicality"]


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
