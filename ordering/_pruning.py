"""Pruning that only ever compares a trial with trials of the same stage (budget and cycles)."""

from __future__ import annotations

import logging
from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import optuna
from optuna.pruners import BasePruner, PercentilePruner
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from optuna.study import StudyDirection

    from ordering._plan import CandidatePlan

__all__ = ["STAGE_ATTR", "PruningSettings", "StagePruner", "cycle_end_steps", "stage_key"]

logger = logging.getLogger(__name__)

STAGE_ATTR = "stage"


def stage_key(budget: float, cycles: int) -> str:
    """The comparability class of a trial: intermediate values at step s mean the same thing
    only between trials with the same budget fraction and the same number of cycles (the
    learning-rate schedule and remaining work depend on both).

    Steps are hop indices (`cycle_end_steps`); the ``/step=hop`` suffix keeps trials stored
    before that (whose steps were cycle indices) out of any comparison with newer ones.
    """
    return f"budget={budget:g}/cycles={cycles}/step=hop"


def cycle_end_steps(plan: CandidatePlan) -> list[int]:
    """The Optuna step of each cycle's value: the index in ``plan.hops`` of the cycle's last
    hop. A value reported after hop h is stored at step h, so after the same number of hops
    trained every trial of a stage has its value at the same step, whether its executor
    reports per hop or per cycle."""
    ends: list[int] = []
    for cycle in plan.cycle_hops():
        ends.append((ends[-1] if ends else -1) + len(cycle))
    return ends


@dataclass(frozen=True)
class PruningSettings:
    """When to stop a trial early, from the values it reports after each full cycle (or
    after each hop, when its executor reports per hop; steps are hop indices either way).

    Attributes:
        percentile: Prune a trial whose best value so far is below this percentile of the
            comparable completed trials at the same cycle (50 = median pruning).
        n_startup_trials: Comparable completed trials needed before any pruning. 2 by
            default: trials spread over the cycle counts, so with 5 the pruner stopped 0.1
            trials in a 10-trial study (1% of the hops); with 2, pruning on Fed-Heart-Disease
            at equal hops found a better CV objective in 7 of 10 splits and a worse one in
            none (benchmarks/results/samplers7-heart_disease.md).
        n_warmup_cycles: Never prune within a cycle whose index is below this (the study
            applies it: steps are hops, and hops per cycle vary between plans).
    """

    percentile: float = 50.0
    n_startup_trials: int = 2
    n_warmup_cycles: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be within [0, 100], got {self.percentile}")
        if self.n_startup_trials < 1 or self.n_warmup_cycles < 0:
            raise ValueError("n_startup_trials must be >= 1 and n_warmup_cycles >= 0")

    def pruner(self) -> StagePruner:
        """The stage-keyed pruner these settings describe."""
        return StagePruner(
            PercentilePruner(
                self.percentile,
                n_startup_trials=self.n_startup_trials,
            )
        )


class _StageView:
    """The part of a study a wrapped pruner may see: only the trials of one stage.

    It deliberately offers nothing else, so a pruner that needs more of the study fails loudly
    instead of reading trials from other stages.
    """

    def __init__(self, study: optuna.Study, key: str) -> None:
        self._study = study
        self._key = key

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return [
            trial
            for trial in self._study.get_trials(deepcopy=deepcopy, states=states)
            if trial.user_attrs.get(STAGE_ATTR) == self._key
        ]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    @property
    def direction(self) -> StudyDirection:
        return self._study.direction

    @property
    def directions(self) -> list[StudyDirection]:
        return self._study.directions


class StagePruner(BasePruner):
    """Wraps a pruner so that it sees only trials of the pruned trial's own stage.

    The stage is the trial's ``"stage"`` user attribute (see `stage_key`); a trial without one is
    never pruned. The wrapped pruner must read the study only through ``get_trials``, ``trials``
    and ``direction`` (true of the median, percentile and threshold pruners).
    """

    def __init__(self, inner: BasePruner) -> None:
        self.inner = inner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        key = trial.user_attrs.get(STAGE_ATTR)
        if key is None:
            logger.warning("trial %d has no stage; not pruning it", trial.number)
            return False
        # The view quacks like the Study for what the wrapped pruners use.
        return self.inner.prune(cast(optuna.Study, _StageView(study, str(key))), trial)
