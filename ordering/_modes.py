"""A plan space over run modes: sequential schedules, federated rounds and hybrid groupings.

`ModeSearchSpace` extends `SearchSpace`: each trial first chooses a mode among those the study
allows. Sequential trials are the plain space's schedules. Federated and hybrid trials choose an
aggregation strategy and a number of rounds; hybrid trials also choose the grouping.

Equal compute: every site trains the same number of optimiser steps in every mode, at the same
batch size. A sequential schedule gives each site ``steps x cycles`` steps (``steps`` when the
space splits its steps over cycles); a federated or hybrid trial spreads those same total steps
over its rounds, ``ceil(total / rounds)`` local steps per round (`steps_per_visit`). The total
comes from the same ``steps`` parameter in every mode, and the learning rate from the same
``learning_rate`` parameter, so the sampler learns them across modes.

The grouping is encoded with the study's permutation encoding (parameters prefixed
``hybrid_``) and a group count ``groups``: the sites in the encoded order are cut into that many
consecutive chains of near-equal size (sizes differ by at most one), and each chain trains in
that order. Every site is in exactly one group; every balanced partition, with every chain
order, can be proposed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from optuna.trial import BaseTrial

from ordering._encodings import ParamValue, PermutationEncoding
from ordering._forgetting import steps_per_visit
from ordering._plan import FEDERATED_MODES, STRATEGIES, CandidatePlan, Federation
from ordering._space import FloatRange, IntRange, SearchSpace, SearchSpaceError, _span

__all__ = ["MODES", "ModeSearchSpace", "balanced_groups"]

MODES: tuple[str, ...] = ("sequential", *FEDERATED_MODES)
_PREFIX = "hybrid_"


def balanced_groups(order: Sequence[str], count: int) -> tuple[tuple[str, ...], ...]:
    """`order` cut into `count` consecutive chains whose sizes differ by at most one (the
    larger chains first).

    Raises:
        ValueError: If `count` is not within 1..len(order).
    """
    if not 1 <= count <= len(order):
        raise ValueError(f"cannot cut {len(order)} sites into {count} groups")
    size, extra = divmod(len(order), count)
    groups: list[tuple[str, ...]] = []
    start = 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        groups.append(tuple(order[start:end]))
        start = end
    return tuple(groups)


@dataclass(frozen=True)
class ModeSearchSpace(SearchSpace):
    """A `SearchSpace` whose trials may also be federated or hybrid runs.

    Attributes:
        modes: The modes a trial may choose among ("sequential", "federated", "hybrid").
        strategies: The aggregation strategies federated and hybrid trials choose among.
        rounds: Rounds of a federated or hybrid trial: fixed, or an `IntRange` to search.
        max_groups: The most groups a hybrid trial may cut the sites into (at least 2, at most
            one fewer than the sites: one group is a sequential chain, one site per group is a
            federated run).
        fedprox_mu: FedProx's proximal term: fixed or a range (used by "fedprox" trials only).
    """

    modes: tuple[str, ...] = MODES
    strategies: tuple[str, ...] = ("fedavg",)
    rounds: int | IntRange = 3
    max_groups: int = 2
    fedprox_mu: float | FloatRange = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        object.__setattr__(self, "strategies", tuple(self.strategies))
        problems = self._mode_problems()
        if problems:
            raise SearchSpaceError("invalid search space:\n" + "\n".join(problems))
        super().__post_init__()

    def _mode_problems(self) -> list[str]:
        problems: list[str] = []
        if not self.modes:
            problems.append("  modes: at least one mode is needed")
        unknown = [mode for mode in self.modes if mode not in MODES]
        if unknown:
            problems.append(f"  modes: unknown {unknown} (known: {', '.join(MODES)})")
        if len(set(self.modes)) != len(self.modes):
            problems.append(f"  modes: duplicates in {list(self.modes)}")
        if not self.federates:
            return problems
        if not self.strategies:
            problems.append("  strategies: at least one strategy is needed")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            problems.append(f"  strategies: unknown {bad} (known: {', '.join(STRATEGIES)})")
        if len(set(self.strategies)) != len(self.strategies):
            problems.append(f"  strategies: duplicates in {list(self.strategies)}")
        if _span(self.rounds)[0] < 1:
            problems.append("  rounds: must be at least 1")
        if "hybrid" in self.modes:
            if len(self.sites) < 3:
                problems.append(
                    f"  modes: hybrid needs at least 3 sites (2 or more groups, one with 2 or "
                    f"more sites); there are {len(self.sites)}"
                )
            elif not 2 <= self.max_groups <= len(self.sites) - 1:
                problems.append(
                    f"  max_groups: must be within 2..{len(self.sites) - 1} for "
                    f"{len(self.sites)} sites, got {self.max_groups}"
                )
        mu_low, mu_high = _span(self.fedprox_mu)
        if "fedprox" in self.strategies and not 0 < mu_low <= mu_high:
            problems.append("  fedprox_mu: must be > 0 (fedprox with no proximal term is fedavg)")
        if isinstance(self.cycles, IntRange) and not self.steps_split_over_cycles:
            problems.append(
                "  cycles: a mode search needs a fixed cycle count, or steps split over cycles, "
                "so that every mode trains each site for the same total steps"
            )
        if self.consolidation_steps is not None:
            problems.append(
                "  consolidation_steps: a consolidation cycle adds sequential steps; a mode "
                "search compares modes at equal steps per site, without one"
            )
        return problems

    @property
    def federates(self) -> bool:
        """Whether some trial may be a federated or hybrid run."""
        return any(mode in FEDERATED_MODES for mode in self.modes)

    # -- compute ---------------------------------------------------------------------------

    def site_steps(self, steps: int, cycles: int) -> int:
        """Each site's total optimiser steps in a sequential schedule with `steps` and
        `cycles`: the budget every mode trains each site for."""
        return steps if self.steps_split_over_cycles else steps * cycles

    def _total_steps_span(self) -> tuple[int, int]:
        low, high = (int(v) for v in _span(self.steps))
        cycles_low, cycles_high = (int(v) for v in _span(self.cycles))
        if self.steps_split_over_cycles:
            return low, high
        return low * cycles_low, high * cycles_high

    def _local_steps_span(self) -> tuple[int, int]:
        total_low, total_high = self._total_steps_span()
        rounds_low, rounds_high = (int(v) for v in _span(self.rounds))
        return steps_per_visit(total_low, rounds_high), steps_per_visit(total_high, rounds_low)

    def hyperparameter_spans(self) -> dict[str, float | FloatRange | IntRange]:
        """As `SearchSpace.hyperparameter_spans`, widened by what federated and hybrid trials
        train with (their local steps, FedProx's proximal term)."""
        spans = super().hyperparameter_spans()
        if not self.federates:
            return spans
        low, high = _span(spans["steps"])
        local_low, local_high = self._local_steps_span()
        low, high = min(low, local_low), max(high, local_high)
        spans["steps"] = low if low == high else IntRange(int(low), int(high))
        if "fedprox" in self.strategies:
            mu_low, mu_high = _span(spans["proximal_mu"])
            fed_low, fed_high = _span(self.fedprox_mu)
            mu_low, mu_high = min(mu_low, fed_low), max(mu_high, fed_high)
            spans["proximal_mu"] = mu_low if mu_low == mu_high else FloatRange(mu_low, mu_high)
        return spans

    # -- proposing plans -------------------------------------------------------------------

    def suggest_plan(self, trial: BaseTrial, encoding: PermutationEncoding) -> CandidatePlan:
        """The plan of one trial: its mode first, then that mode's parameters."""
        mode = str(trial.suggest_categorical("mode", list(self.modes)))
        if mode == "sequential":
            return super().suggest_plan(trial, encoding)
        learning_rate = self._suggest_float(trial, "learning_rate", self.learning_rate)
        steps = (
            trial.suggest_int("steps", self.steps.low, self.steps.high)
            if isinstance(self.steps, IntRange)
            else self.steps
        )
        cycles = (
            trial.suggest_int("cycles", self.cycles.low, self.cycles.high)
            if isinstance(self.cycles, IntRange)
            else self.cycles
        )
        strategy = str(trial.suggest_categorical("strategy", list(self.strategies)))
        rounds = (
            trial.suggest_int("rounds", self.rounds.low, self.rounds.high)
            if isinstance(self.rounds, IntRange)
            else self.rounds
        )
        mu = (
            self._suggest_float(trial, "fedprox_mu", self.fedprox_mu)
            if strategy == "fedprox"
            else 0.0
        )
        groups: tuple[tuple[str, ...], ...] = ()
        if mode == "hybrid":
            order = encoding.suggest(trial, self.sites, _PREFIX)
            count = trial.suggest_int("groups", 2, self.max_groups)
            groups = balanced_groups(order, count)
        federation = Federation(
            mode=mode,
            strategy=strategy,
            rounds=rounds,
            local_steps=steps_per_visit(self.site_steps(steps, cycles), rounds),
            groups=groups,
            proximal_mu=mu,
        )
        return CandidatePlan.federated(
            federation,
            self.sites,
            self._hyperparameters(learning_rate, federation.local_steps),
            encoding=encoding.name,
        )

    def params_for(
        self, plan: CandidatePlan, encoding: PermutationEncoding | None
    ) -> dict[str, ParamValue]:
        """As `SearchSpace.params_for`, with the plan's mode; federated and hybrid plans are
        proposed by the sampler only (they are not enqueued or warm-started).

        Raises:
            SearchSpaceError: If the plan is not a sequential plan this space can propose, or
                sequential trials are not among the space's modes.
        """
        if plan.federation is not None:
            raise SearchSpaceError(
                f"a {plan.mode} plan cannot be enqueued: the sampler proposes federated and "
                "hybrid trials"
            )
        if "sequential" not in self.modes:
            raise SearchSpaceError("the space has no sequential mode to enqueue a plan in")
        return {"mode": "sequential", **super().params_for(plan, encoding)}

    def plan(self, order: Sequence[str] | Sequence[Sequence[str]], **kwargs: Any) -> CandidatePlan:
        """A sequential plan of this space built by hand (see `SearchSpace.plan`)."""
        return SearchSpace(**self._plain_fields()).plan(order, **kwargs)

    def _plain_fields(self) -> dict[str, Any]:
        plain = {f.name for f in fields(SearchSpace)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in plain}

    # -- storing ---------------------------------------------------------------------------

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> ModeSearchSpace:
        """The inverse of `to_json_dict`."""
        mode_fields = {"modes", "strategies", "rounds", "max_groups", "fedprox_mu"}
        base = SearchSpace.from_json_dict({k: v for k, v in data.items() if k not in mode_fields})
        rounds = data["rounds"]
        mu = data["fedprox_mu"]
        return cls(
            **{f.name: getattr(base, f.name) for f in fields(SearchSpace)},
            modes=tuple(data["modes"]),
            strategies=tuple(data["strategies"]),
            rounds=IntRange(**rounds) if isinstance(rounds, Mapping) else int(rounds),
            max_groups=int(data["max_groups"]),
            fedprox_mu=FloatRange(**mu) if isinstance(mu, Mapping) else float(mu),
        )
