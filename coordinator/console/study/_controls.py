"""The forgetting controls of `baton study start`, from its options to search-space fields."""

from __future__ import annotations

from typing import Any

from ordering import FloatRange, IntRange


def forgetting_controls(
    *,
    split_steps_over_cycles: bool,
    lr_decay: tuple[float, float],
    proximal_mu_max: float,
    consolidation_steps: int,
    consolidation_lr_factor: tuple[float, float],
) -> dict[str, Any]:
    """`SearchSpace` keyword arguments for the options: a pair (min, max) is searched when the
    two differ (the learning-rate factors log-uniformly), fixed when equal; a zero proximal
    maximum or zero consolidation steps leave that control out."""

    def searched(pair: tuple[float, float], log: bool) -> float | FloatRange:
        low, high = pair
        return low if low == high else FloatRange(low, high, log=log)

    controls: dict[str, Any] = {
        "steps_split_over_cycles": split_steps_over_cycles,
        "learning_rate_decay": searched(lr_decay, log=False),
    }
    if proximal_mu_max > 0:
        controls["proximal_mu"] = FloatRange(0.0, proximal_mu_max)
    if consolidation_steps > 0:
        controls["consolidation_steps"] = (
            1 if consolidation_steps == 1 else IntRange(1, consolidation_steps)
        )
        controls["consolidation_learning_rate_factor"] = searched(consolidation_lr_factor, True)
    return controls
