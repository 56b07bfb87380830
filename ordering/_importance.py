"""Where the order matters: Optuna's parameter importances of a study, grouped into the order
and each hyperparameter."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.trial import TrialState

from ordering._samplers import is_order_param
from ordering._study import OrderingStudy

__all__ = ["OrderImportance", "order_importance"]

ORDER = "order"
# PED-ANOVA contrasts the top trials with all of them: it needs a few of each.
MIN_TRIALS = 8
# The top quarter (Optuna's default tenth leaves one or two trials in a small study).
TARGET_QUANTILE = 0.25


@dataclass(frozen=True)
class OrderImportance:
    """How much of the objective's variance over a study's trials each part of a plan explains.

    Attributes:
        importances: "order" (every order parameter summed) and each hyperparameter -> its
            share, summing to 1, largest first; empty when there was too little to measure.
        trials: Completed full-budget trials the measure used.
        note: Why nothing was measured, or a caveat.
    """

    importances: MappingProxyType[str, float] | dict[str, float] = field(default_factory=dict)
    trials: int = 0
    note: str | None = None

    @property
    def order_share(self) -> float | None:
        """The order's share (None when not measured)."""
        return self.importances.get(ORDER) if self.importances else None

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able form."""
        return {"importances": dict(self.importances), "trials": self.trials, "note": self.note}


def order_importance(study: OrderingStudy) -> OrderImportance:
    """PED-ANOVA importances (``optuna.importance``; no scikit-learn, unlike fANOVA) of a
    study's full-budget trials: how differently each parameter is distributed in the top
    quarter of trials than in all of them, with the
    order's parameters (Lehmer digits, random keys) summed into one "order" entry.

    A large order share says searching the order is worth its trials; a small one says the
    hyperparameters decide and a fixed or random order would do as well.

    Args:
        study: The study; only completed full-budget trials count (failed, collapsed and pruned
            ones are left out). Multi-objective studies are measured on the first objective.
    """
    optuna_study = study.optuna_study
    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS:
        return OrderImportance(
            trials=len(complete),
            note=f"needs at least {MIN_TRIALS} completed trials, has {len(complete)}",
        )
    varied = {
        name
        for trial in complete
        for name in trial.params
        if len({t.params.get(name) for t in complete}) > 1
    }
    if not varied:
        return OrderImportance(trials=len(complete), note="no parameter varied across trials")
    raw = get_param_importances(
        optuna_study,
        evaluator=PedAnovaImportanceEvaluator(target_quantile=TARGET_QUANTILE),
        target=(lambda t: t.values[0]) if study.multi_objective else None,
        normalize=True,
    )
    grouped: dict[str, float] = {}
    for name, share in raw.items():
        key = ORDER if is_order_param(name) else name
        grouped[key] = grouped.get(key, 0.0) + share
    ordered = dict(sorted(grouped.items(), key=lambda kv: (-kv[1], kv[0])))
    note = None
    if study.space.is_dynamic:
        note = "per-cycle orders vary in number; only parameters every trial has are measured"
    return OrderImportance(MappingProxyType(ordered), len(complete), note)
