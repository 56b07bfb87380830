"""The plan space: which orders, cycle counts and hyperparameters a search may propose."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from optuna.trial import BaseTrial
from pydantic import ValidationError

from ordering._encodings import ParamValue, PermutationEncoding
from ordering._forgetting import steps_per_visit, with_consolidation
from ordering._plan import CandidatePlan, Hop, HopHyperparameters
from protocols.hyperparameters import BOUNDED_HYPERPARAMETERS, describe_problems

__all__ = ["FloatRange", "IntRange", "SearchSpace", "SearchSpaceError"]

# The coordinator's site-name rule (it cannot be imported from here).
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Keys a site-approved bounds mapping may hold.
BOUND_KEYS = frozenset({*BOUNDED_HYPERPARAMETERS, "cycles"})
# Hyperparameters a space may search; every other one is fixed at the space's base value.
_SEARCHED = ("learning_rate", "steps", "epochs", "proximal_mu")
_MODEL_FIELDS = tuple(f.name for f in fields(HopHyperparameters))


class SearchSpaceError(ValueError):
    """A search space is malformed or leaves what the sites approved; the message lists why."""


@dataclass(frozen=True)
class FloatRange:
    """A closed float interval, searched log-uniformly when `log`."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= self.high):
            raise SearchSpaceError(f"invalid range [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise SearchSpaceError(f"a log range needs low > 0, got [{self.low}, {self.high}]")


@dataclass(frozen=True)
class IntRange:
    """A closed integer interval."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise SearchSpaceError(f"invalid range [{self.low}, {self.high}]")


def _span(value: float | FloatRange | IntRange) -> tuple[float, float]:
    if isinstance(value, FloatRange | IntRange):
        return float(value.low), float(value.high)
    return float(value), float(value)


def _typed(name: str, value: float) -> float:
    """An end of a span as the model's field type (an int field's ends are whole)."""
    return int(value) if isinstance(getattr(HopHyperparameters(), name), int) else value


def _json(value: object) -> object:
    if isinstance(value, FloatRange):
        return {"low": value.low, "high": value.high, "log": value.log}
    if isinstance(value, IntRange):
        return {"low": value.low, "high": value.high}
    if isinstance(value, tuple):
        return list(value)
    return value


def _same_hops(built: Sequence[Hop], given: Sequence[Hop]) -> bool:
    """Equal hops, learning rates up to rounding (a factor read back from a plan is exact
    only to the last bit)."""
    return len(built) == len(given) and all(
        a.site == b.site
        and math.isclose(a.hyperparameters.learning_rate, b.hyperparameters.learning_rate,
                         rel_tol=1e-9)
        and replace(a.hyperparameters, learning_rate=b.hyperparameters.learning_rate)
        == b.hyperparameters
        for a, b in zip(built, given, strict=True)
    )  # fmt: skip


@dataclass(frozen=True)
class SearchSpace:
    """What a search may vary: site order, cycles and per-hop hyperparameters.

    A field given as a plain value is fixed; given as a range it is searched. Hop k of a plan
    trains with ``learning_rate * learning_rate_decay**k``.

    Attributes:
        sites: The sites every plan visits once per cycle.
        cycles: Passes over the sites: fixed, or an `IntRange` to search.
        reshuffle_each_cycle: Search a separate order for every cycle (otherwise one order is
            repeated).
        learning_rate: Fixed, or a `FloatRange` with ``log=True`` (searched log-uniformly).
        learning_rate_decay: Per-hop learning-rate factor: fixed, or a range.
        steps: Optimiser steps per visit: fixed, or a range.
        steps_per_site: Search a visit length for each site instead of one for all.
        epochs: Optional epochs per visit: fixed, a range of whole epochs, or None (the model's
            default: visits last `steps`).
        proximal_mu: Optional proximal term weight: fixed, a range, or None (the model's
            default: no proximal term).
        batch_size: Fixed batch size.
        weight_decay: Fixed weight decay.
        warmup_steps: Fixed warm-up steps per visit.
        max_grad_norm: Fixed gradient clipping norm.
        seed: Seed of hop 0 (hop k uses seed + k).
        steps_split_over_cycles: `steps` is each site's visit budget for the whole run, split
            over its cycles (``ceil(steps / cycles)`` per visit), so more cycles means shorter
            visits at equal compute.
        consolidation_steps: Steps per visit of a final consolidation cycle (every site once
            more, in the last cycle's order): fixed, a range, or None (no such cycle).
        consolidation_learning_rate_factor: The consolidation visits' learning rate as a
            fraction of the last regular hop's: fixed or a range within (0, 1].
    """

    sites: tuple[str, ...]
    cycles: int | IntRange = 1
    reshuffle_each_cycle: bool = False
    learning_rate: float | FloatRange = 5e-4
    learning_rate_decay: float | FloatRange = 1.0
    steps: int | IntRange = 20
    steps_per_site: bool = False
    epochs: float | IntRange | None = None
    proximal_mu: float | FloatRange | None = None
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    steps_split_over_cycles: bool = False
    consolidation_steps: int | IntRange | None = None
    consolidation_learning_rate_factor: float | FloatRange = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        problems = self._shape_problems()
        if problems:
            raise SearchSpaceError("invalid search space:\n" + "\n".join(problems))

    def _shape_problems(self) -> list[str]:
        problems: list[str] = []
        if not self.sites:
            problems.append("  sites: at least one site is needed")
        if len(set(self.sites)) != len(self.sites):
            problems.append(f"  sites: duplicates in {list(self.sites)}")
        problems += [
            f"  sites: {site!r} is not a valid site name"
            for site in self.sites
            if not _SITE_NAME.match(site)
        ]
        if _span(self.cycles)[0] < 1:
            problems.append("  cycles: must be at least 1")
        if isinstance(self.learning_rate, FloatRange) and not self.learning_rate.log:
            problems.append("  learning_rate: a searched learning rate must be a log range")
        if _span(self.learning_rate_decay)[0] <= 0:
            problems.append("  learning_rate_decay: must be > 0")
        if self.epochs is not None and _span(self.epochs)[0] < 1:
            problems.append("  epochs: must be at least 1")
        if self.steps_per_site and not isinstance(self.steps, IntRange):
            problems.append("  steps_per_site: needs a steps range to search")
        if self.consolidation_steps is not None and _span(self.consolidation_steps)[0] < 1:
            problems.append("  consolidation_steps: must be at least 1")
        factor_low, factor_high = _span(self.consolidation_learning_rate_factor)
        if not 0 < factor_low <= factor_high <= 1:
            problems.append("  consolidation_learning_rate_factor: must be within (0, 1]")
        if not problems:
            problems += self._model_problems()
        return problems

    def _model_problems(self) -> list[str]:
        """Every value the space can give a hop, checked against the hyperparameter model's
        bounds (the learning rate at every hop, after decay)."""
        problems: list[str] = []
        try:
            HopHyperparameters.model_validate(self._fixed())
        except ValidationError as exc:
            problems.append(f"  {describe_problems(exc)}")
        for name, value in self._searched().items():
            low, high = _span(value)
            try:
                for end in (low, high):
                    HopHyperparameters.model_validate({name: _typed(name, end)})
            except ValidationError as exc:
                what = "per-hop values reach" if name == "learning_rate" else "the space allows"
                problems.append(f"  {describe_problems(exc)} ({what} [{low:g}, {high:g}])")
        return problems

    def _fixed(self) -> dict[str, Any]:
        """The hyperparameters the space fixes: its fields named as the model's."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in _MODEL_FIELDS and f.name not in _SEARCHED
        }

    def _searched(self) -> dict[str, float | FloatRange | IntRange]:
        """The hyperparameters the space may vary (the learning rate over every hop, after
        decay), fixed or as ranges; those left unset (None) take the model's default."""
        values = {
            "learning_rate": self._hop_learning_rates(),
            "steps": self._visit_steps(),
            "epochs": self.epochs,
            "proximal_mu": self.proximal_mu,
        }
        return {name: value for name, value in values.items() if value is not None}

    def hyperparameter_spans(self) -> dict[str, float | FloatRange | IntRange]:
        """Every hyperparameter an approval bundle bounds, as any hop of this space may train
        with it: a range where searched (the learning rate over every hop, after decay), else the
        fixed value (the model's default where the space does not set it)."""
        values: dict[str, Any] = asdict(HopHyperparameters()) | self._fixed() | self._searched()
        return {name: values[name] for name in BOUNDED_HYPERPARAMETERS}

    @property
    def consolidates(self) -> bool:
        """Whether every plan ends with a consolidation cycle (not counted in `cycles`)."""
        return self.consolidation_steps is not None

    def _visit_steps(self) -> float | IntRange:
        """The span of steps any visit (regular or consolidation) may train for."""
        low, high = _span(self.steps)
        if self.steps_split_over_cycles:
            low = steps_per_visit(int(low), self.max_cycles)
            high = steps_per_visit(int(high), int(_span(self.cycles)[0]))
        if self.consolidation_steps is not None:
            c_low, c_high = _span(self.consolidation_steps)
            low, high = min(low, c_low), max(high, c_high)
        return low if low == high else IntRange(int(low), int(high))

    @property
    def max_cycles(self) -> int:
        """The largest cycle count a plan may have."""
        return int(_span(self.cycles)[1])

    @property
    def is_dynamic(self) -> bool:
        """Whether the set of parameters differs between trials (cycles searched + reshuffle)."""
        return self.reshuffle_each_cycle and isinstance(self.cycles, IntRange)

    def check_within(self, bounds: Mapping[str, tuple[float, float]]) -> None:
        """Refuses a space that could propose a value outside what the sites approved.

        Every hyperparameter the space searches needs an approved bound; fixed values are checked
        against a bound when there is one. The learning rate is checked at every hop, after decay.

        Args:
            bounds: Approved closed intervals by name (keys as in `HopHyperparameters`, plus
                "cycles").

        Raises:
            SearchSpaceError: Listing every violation.
        """
        problems = [
            f"  {key}: not a known hyperparameter (known: {', '.join(sorted(BOUND_KEYS))})"
            for key in bounds
            if key not in BOUND_KEYS
        ]
        for key, (low, high) in bounds.items():
            if not low <= high:
                problems.append(f"  {key}: approved bound [{low}, {high}] is empty")
        values = {"cycles": self.cycles, **self.hyperparameter_spans()}
        for key, value in values.items():
            low, high = _span(value)
            if key not in bounds:
                if low != high:
                    problems.append(f"  {key}: searched over [{low:g}, {high:g}] but no site "
                                    "approved a bound for it")  # fmt: skip
                continue
            approved_low, approved_high = bounds[key]
            if low < approved_low or high > approved_high:
                what = (
                    f"{low:g} is"
                    if low == high
                    else ("per-hop values reach" if key == "learning_rate" else "space allows")
                    + f" [{low:g}, {high:g}],"
                )
                problems.append(f"  {key}: {what} outside the approved "
                                f"[{approved_low:g}, {approved_high:g}]")  # fmt: skip
        if problems:
            raise SearchSpaceError(
                "search space is not within the approved bounds:\n" + "\n".join(problems)
            )

    def _hop_learning_rates(self) -> float | FloatRange:
        """The span of learning rates any hop of any plan may train with."""
        lr_low, lr_high = _span(self.learning_rate)
        decay_low, decay_high = _span(self.learning_rate_decay)
        last_hop = self.max_cycles * len(self.sites) - 1
        low = lr_low * min(1.0, decay_low) ** last_hop
        high = lr_high * max(1.0, decay_high) ** last_hop
        if self.consolidates:
            low *= _span(self.consolidation_learning_rate_factor)[0]
        return low if low == high else FloatRange(low, high)

    def suggest_plan(self, trial: BaseTrial, encoding: PermutationEncoding) -> CandidatePlan:
        """Asks `trial` for every searched value and builds the plan it describes."""
        cycles = (
            trial.suggest_int("cycles", self.cycles.low, self.cycles.high)
            if isinstance(self.cycles, IntRange)
            else self.cycles
        )
        if self.reshuffle_each_cycle:
            orders = [encoding.suggest(trial, self.sites, f"cycle{c}_") for c in range(cycles)]
        else:
            orders = [encoding.suggest(trial, self.sites, "")] * cycles
        learning_rate = (
            trial.suggest_float(
                "learning_rate", self.learning_rate.low, self.learning_rate.high, log=True
            )
            if isinstance(self.learning_rate, FloatRange)
            else self.learning_rate
        )
        decay = self._suggest_float(trial, "learning_rate_decay", self.learning_rate_decay)
        steps_by_site: dict[str, int] = {}
        if isinstance(self.steps, IntRange):
            if self.steps_per_site:
                steps_by_site = {
                    site: trial.suggest_int(f"steps_{site}", self.steps.low, self.steps.high)
                    for site in self.sites
                }
                steps = steps_by_site[self.sites[0]]
            else:
                steps = trial.suggest_int("steps", self.steps.low, self.steps.high)
        else:
            steps = self.steps
        epochs = (
            trial.suggest_int("epochs", self.epochs.low, self.epochs.high)
            if isinstance(self.epochs, IntRange)
            else self.epochs
        )
        proximal_mu = (
            None
            if self.proximal_mu is None
            else self._suggest_float(trial, "proximal_mu", self.proximal_mu)
        )
        if self.steps_split_over_cycles:
            steps = steps_per_visit(steps, cycles)
            steps_by_site = {s: steps_per_visit(n, cycles) for s, n in steps_by_site.items()}
        plan = CandidatePlan.build(
            orders,
            self._hyperparameters(learning_rate, steps, epochs, proximal_mu),
            learning_rate_decay=decay,
            steps_by_site=steps_by_site,
            encoding=encoding.name,
        )
        if self.consolidation_steps is None:
            return plan
        consolidation_steps = (
            trial.suggest_int(
                "consolidation_steps", self.consolidation_steps.low, self.consolidation_steps.high
            )
            if isinstance(self.consolidation_steps, IntRange)
            else self.consolidation_steps
        )
        factor = self._suggest_float(
            trial, "consolidation_learning_rate_factor", self.consolidation_learning_rate_factor
        )
        return with_consolidation(plan, consolidation_steps, factor)

    @staticmethod
    def _suggest_float(trial: BaseTrial, name: str, value: float | FloatRange) -> float:
        if isinstance(value, FloatRange):
            return trial.suggest_float(name, value.low, value.high, log=value.log)
        return value

    def _hyperparameters(
        self,
        learning_rate: float,
        steps: int,
        epochs: float | None = None,
        proximal_mu: float | None = None,
    ) -> HopHyperparameters:
        """Hop 0's hyperparameters; what the space leaves unset takes the model's default."""
        optional = {"epochs": epochs, "proximal_mu": proximal_mu}
        return HopHyperparameters.model_validate(
            self._fixed()
            | {"learning_rate": learning_rate, "steps": steps}
            | {name: value for name, value in optional.items() if value is not None}
        )

    def plan(
        self,
        order: Sequence[str] | Sequence[Sequence[str]],
        *,
        cycles: int | None = None,
        learning_rate: float | None = None,
        learning_rate_decay: float | None = None,
        steps: int | Mapping[str, int] | None = None,
        epochs: float | None = None,
        proximal_mu: float | None = None,
        encoding: str = "fixed",
        consolidation_steps: int | None = None,
        consolidation_learning_rate_factor: float | None = None,
    ) -> CandidatePlan:
        """A plan of this space built by hand (a heuristic seed or a warm start).

        Args:
            order: One order (repeated every cycle), or one order per cycle.
            cycles: Required when the space searches cycles and `order` is a single order.
            learning_rate: Defaults to the fixed value, or the geometric middle of the range.
            learning_rate_decay: Defaults to the fixed value, or 1 when inside the range.
            steps: One value, or one per site; defaults to the fixed value or the range middle.
            epochs: Defaults to the fixed value or the range middle.
            proximal_mu: Defaults to the fixed value or the range low end.
            encoding: Recorded with the plan.
            consolidation_steps: When the space consolidates; defaults to the fixed value or
                the range low end.
            consolidation_learning_rate_factor: Defaults to the fixed value or the range low
                end.

        Raises:
            SearchSpaceError: If the plan would not be one this space can propose.
        """
        if order and not isinstance(order[0], str):
            orders = [tuple(o) for o in order]
        else:
            n = cycles if cycles is not None else int(_span(self.cycles)[0])
            orders = [tuple(str(site) for site in order)] * n
        if learning_rate is None:
            low, high = _span(self.learning_rate)
            learning_rate = math.sqrt(low * high)
        if learning_rate_decay is None:
            low, high = _span(self.learning_rate_decay)
            learning_rate_decay = 1.0 if low <= 1.0 <= high else low
        mid = _span(self.steps)
        steps_by_site = dict(steps) if isinstance(steps, Mapping) else {}
        base_steps = (
            steps
            if isinstance(steps, int)
            else (steps_by_site[orders[0][0]] if steps_by_site else int(sum(mid) // 2))
        )
        if self.steps_per_site and not steps_by_site:
            steps_by_site = {site: base_steps for site in self.sites}
        if epochs is None and self.epochs is not None:
            epochs = (
                float(sum(_span(self.epochs)) // 2)
                if isinstance(self.epochs, IntRange)
                else self.epochs
            )
        if proximal_mu is None and self.proximal_mu is not None:
            proximal_mu = _span(self.proximal_mu)[0]
        if self.steps_split_over_cycles:
            base_steps = steps_per_visit(base_steps, len(orders))
            steps_by_site = {s: steps_per_visit(n, len(orders)) for s, n in steps_by_site.items()}
        plan = CandidatePlan.build(
            orders,
            self._hyperparameters(learning_rate, base_steps, epochs, proximal_mu),
            learning_rate_decay=learning_rate_decay,
            steps_by_site=steps_by_site,
            encoding=encoding,
        )
        if self.consolidation_steps is not None:
            plan = with_consolidation(
                plan,
                consolidation_steps
                if consolidation_steps is not None
                else int(_span(self.consolidation_steps)[0]),
                consolidation_learning_rate_factor
                if consolidation_learning_rate_factor is not None
                else _span(self.consolidation_learning_rate_factor)[0],
            )
        self.params_for(plan, None)  # refuses plans outside the space
        return plan

    def params_for(
        self, plan: CandidatePlan, encoding: PermutationEncoding | None
    ) -> dict[str, ParamValue]:
        """The trial parameters that make `suggest_plan` rebuild `plan`.

        Args:
            plan: A plan this space could propose.
            encoding: The study's permutation encoding (None: only check the plan fits).

        Raises:
            SearchSpaceError: If the plan is not one this space can propose (another site set, a
                value outside a range, or a fixed value that differs).
        """
        problems: list[str] = []
        params: dict[str, ParamValue] = {}
        full = plan
        if self.consolidates:
            plan = self._without_consolidation(plan)
        first = plan.hops[0].hyperparameters
        if sorted(plan.order) != sorted(self.sites):
            raise SearchSpaceError(
                f"plan visits {sorted(plan.order)}, but the space's sites are {sorted(self.sites)}"
            )
        if plan.reshuffles and not self.reshuffle_each_cycle:
            problems.append("  order: the plan reshuffles but the space repeats one order")

        def check(name: str, value: float, allowed: float | FloatRange | IntRange | None) -> None:
            if allowed is None:
                problems.append(f"  {name}: the space does not set it, the plan has {value}")
                return
            low, high = _span(allowed)
            if not low <= value <= high:
                problems.append(f"  {name}: {value} is outside the space's [{low:g}, {high:g}]")
            elif isinstance(allowed, FloatRange | IntRange):
                params[name] = int(value) if isinstance(allowed, IntRange) else value

        check("cycles", plan.cycles, self.cycles)
        if encoding is not None:
            if self.reshuffle_each_cycle:
                for c, order in enumerate(plan.cycle_orders):
                    params.update(encoding.encode(order, self.sites, prefix=f"cycle{c}_"))
            else:
                params.update(encoding.encode(plan.order, self.sites))
        check("learning_rate", first.learning_rate, self.learning_rate)
        check("learning_rate_decay", plan.learning_rate_decay, self.learning_rate_decay)
        first_visit = {hop.site: hop.hyperparameters.steps for hop in reversed(plan.hops)}
        if self.steps_per_site:
            for site in self.sites:
                check(f"steps_{site}", self._searched_steps(first_visit[site], plan), self.steps)
        elif len(set(first_visit.values())) != 1:
            problems.append("  steps: the plan varies visit length by site; the space does not")
        else:
            check("steps", self._searched_steps(first.steps, plan), self.steps)
        default = HopHyperparameters()
        for name in ("epochs", "proximal_mu"):
            value = getattr(first, name)
            allowed = getattr(self, name)
            if allowed is not None:
                check(name, value, allowed)
            elif value != getattr(default, name):
                problems.append(f"  {name}: the space does not set it, the plan has {value}")
        fixed = self._hyperparameters(first.learning_rate, first.steps)
        for name in (f.name for f in fields(HopHyperparameters) if f.name not in _SEARCHED):
            if getattr(first, name) != getattr(fixed, name):
                problems.append(f"  {name}: plan has {getattr(first, name)}, the space fixes "
                                f"{getattr(fixed, name)}")  # fmt: skip
        rebuilt = CandidatePlan.build(
            plan.cycle_orders,
            first,
            learning_rate_decay=plan.learning_rate_decay,
            steps_by_site=first_visit,
            encoding=plan.encoding,
        )
        if self.consolidates and plan is full:
            problems.append("  cycles: the space ends every plan with a consolidation cycle; "
                            "the plan has none")  # fmt: skip
        elif self.consolidates:
            tail = full.hops[len(plan.hops)].hyperparameters
            factor = tail.learning_rate / plan.hops[-1].hyperparameters.learning_rate
            allowed = self.consolidation_learning_rate_factor
            if isinstance(allowed, float) and math.isclose(factor, allowed, rel_tol=1e-9):
                factor = allowed
            for end in _span(allowed):  # a factor at a range's end, read back with a rounding
                if math.isclose(factor, end, rel_tol=1e-9):
                    factor = end
            check("consolidation_steps", tail.steps, self.consolidation_steps)
            check("consolidation_learning_rate_factor", factor, allowed)
            if not problems:
                rebuilt = with_consolidation(rebuilt, tail.steps, factor)
            plan = full
        if not problems and not _same_hops(rebuilt.hops, plan.hops):
            problems.append("  hops: not the schedule this space builds (per-hop values differ)")
        if problems:
            raise SearchSpaceError(
                "plan does not fit the search space:\n" + "\n".join(dict.fromkeys(problems))
            )
        return params

    def _without_consolidation(self, plan: CandidatePlan) -> CandidatePlan:
        """`plan` without its consolidation cycle (the last one), or `plan` itself when it
        has no regular cycle before it (the caller then reports the mismatch)."""
        n = len(self.sites)
        if plan.cycles < 2 or len(plan.hops) != plan.cycles * n:
            return plan
        return CandidatePlan(
            hops=plan.hops[:-n],
            cycles=plan.cycles - 1,
            order=plan.order,
            encoding=plan.encoding,
            cycle_orders=plan.cycle_orders[:-1],
            learning_rate_decay=plan.learning_rate_decay,
        )

    def _searched_steps(self, visit_steps: int, plan: CandidatePlan) -> int:
        """The `steps` parameter that gives visits of `visit_steps` in `plan`."""
        if not self.steps_split_over_cycles:
            return visit_steps
        total = visit_steps * plan.cycles
        high = int(_span(self.steps)[1])
        if total > high and steps_per_visit(high, plan.cycles) == visit_steps:
            total = high
        return total

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able description, stored with a study so a reopened study can be checked."""
        return {f.name: _json(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """The inverse of `to_json_dict`."""

        def value(name: str, kind: type[FloatRange] | type[IntRange]) -> Any:
            raw = data[name]
            return kind(**raw) if isinstance(raw, Mapping) else raw

        if cls is SearchSpace and "modes" in data:
            from ordering._modes import ModeSearchSpace  # a space over run modes

            return ModeSearchSpace.from_json_dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SearchSpaceError(f"unknown search space fields: {sorted(unknown)}")
        return cls(
            sites=tuple(data["sites"]),
            cycles=value("cycles", IntRange),
            reshuffle_each_cycle=bool(data["reshuffle_each_cycle"]),
            learning_rate=value("learning_rate", FloatRange),
            learning_rate_decay=value("learning_rate_decay", FloatRange),
            steps=value("steps", IntRange),
            steps_per_site=bool(data["steps_per_site"]),
            epochs=value("epochs", IntRange),
            proximal_mu=value("proximal_mu", FloatRange),
            batch_size=int(data["batch_size"]),
            weight_decay=float(data["weight_decay"]),
            warmup_steps=int(data["warmup_steps"]),
            max_grad_norm=float(data["max_grad_norm"]),
            seed=int(data["seed"]),
            # Absent from studies stored before these fields existed.
            steps_split_over_cycles=bool(data.get("steps_split_over_cycles", False)),
            consolidation_steps=(
                value("consolidation_steps", IntRange) if "consolidation_steps" in data else None
            ),
            consolidation_learning_rate_factor=(
                value("consolidation_learning_rate_factor", FloatRange)
                if "consolidation_learning_rate_factor" in data
                else 0.1
            ),
        )
