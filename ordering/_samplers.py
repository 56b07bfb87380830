"""Samplers of the search and its baselines beyond Optuna's own: tuned hyperparameters with a
random order per trial (the "random order, tuned" comparator)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.samplers import (
    BaseSampler,
    CmaEsSampler,
    GPSampler,
    QMCSampler,
    RandomSampler,
    TPESampler,
)
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

__all__ = ["RandomOrderSampler", "alternative_sampler", "is_order_param"]

# Parameters a SearchSpace suggests for hyperparameters; every other parameter encodes an order.
_HYPERPARAMETER_PARAMS = frozenset(
    {
        "cycles",
        "learning_rate",
        "learning_rate_decay",
        "steps",
        "epochs",
        "proximal_mu",
        "consolidation_steps",
        "consolidation_learning_rate_factor",
    }
)


def is_order_param(name: str) -> bool:
    """Whether a trial parameter encodes the site order rather than a hyperparameter."""
    return name not in _HYPERPARAMETER_PARAMS and not name.startswith("steps_")


def alternative_sampler(name: str, seed: int | None, n_startup_trials: int) -> BaseSampler:
    """Optuna's Gaussian-process ("gp"), CMA-ES ("cmaes") or scrambled Sobol ("qmc") sampler,
    with the study's seed and start-up trials; parameters they cannot model jointly (a
    per-cycle order whose cycle count varies) are drawn at random, without a warning per trial.

    "gp" imports torch when it first samples and "cmaes" needs the ``cmaes`` package: they are
    for benchmarks and sites with the simulation extra, not the torch-free coordinator.
    """
    if name == "gp":
        return GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "cmaes":
        return CmaEsSampler(
            seed=seed,
            n_startup_trials=n_startup_trials,
            warn_independent_sampling=False,
            independent_sampler=RandomSampler(seed=None if seed is None else seed + 1),
        )
    if name == "qmc":
        return QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r}; known here: gp, cmaes, qmc")


class RandomOrderSampler(BaseSampler):
    """TPE over the hyperparameters; every order parameter drawn uniformly at random.

    The order is never learnt from earlier trials (a uniform Lehmer code is a uniform
    permutation), so the best trial's settings are tuned for a random order: the comparator
    that tells what searching the order adds on top of tuning.
    """

    def __init__(
        self,
        *,
        seed: int | None,
        n_startup_trials: int,
        is_order: Callable[[str], bool] = is_order_param,
    ) -> None:
        self._tpe = TPESampler(seed=seed, n_startup_trials=n_startup_trials)
        self._random = RandomSampler(seed=None if seed is None else seed + 1)
        self._is_order = is_order

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()
        self._random.reseed_rng()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        space = self._tpe.infer_relative_search_space(study, trial)
        return {name: d for name, d in space.items() if not self._is_order(name)}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        sampler = self._random if self._is_order(param_name) else self._tpe
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._tpe.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._tpe.after_trial(study, trial, state, values)
