"""Candidate plans: the hops (site, hyperparameters) one trial runs, and their run-plan document."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from protocols.hyperparameters import HopHyperparameters

__all__ = ["CandidatePlan", "Hop", "HopHyperparameters"]

# Written for every hop; the model's other fields only when they differ from their defaults, so a
# plan document reads as it did before those fields existed.
_ALWAYS_WRITTEN = frozenset(
    {
        "learning_rate",
        "steps",
        "batch_size",
        "weight_decay",
        "warmup_steps",
        "max_grad_norm",
        "seed",
    }
)
_DEFAULTS = HopHyperparameters().model_dump()


def _document(hyperparameters: HopHyperparameters) -> dict[str, Any]:
    """A hop's hyperparameters as a plan document holds them (`model_validate` reads them)."""
    return {
        name: value
        for name, value in hyperparameters.model_dump().items()
        if name in _ALWAYS_WRITTEN or value != _DEFAULTS[name]
    }


class Hop(NamedTuple):
    """One visit: the site and what it trains with."""

    site: str
    hyperparameters: HopHyperparameters


@dataclass(frozen=True)
class CandidatePlan:
    """One sequential run the search proposes: `cycles` passes over the sites.

    Attributes:
        hops: Every visit in execution order.
        cycles: How many passes over the sites.
        order: The order of the first cycle (of every cycle unless the plan reshuffles).
        encoding: The name of the permutation encoding that proposed the order ("fixed" when the
            plan was built by hand or by a baseline).
        cycle_orders: The order of each cycle.
        learning_rate_decay: The factor applied to the learning rate at every hop
            (hop k trains with ``hops[0].learning_rate * learning_rate_decay**k``).
    """

    hops: tuple[Hop, ...]
    cycles: int
    order: tuple[str, ...]
    encoding: str = "fixed"
    cycle_orders: tuple[tuple[str, ...], ...] = field(default=())
    learning_rate_decay: float = 1.0

    def __post_init__(self) -> None:
        if not self.cycle_orders:
            object.__setattr__(self, "cycle_orders", (self.order,) * self.cycles)
        if len(self.cycle_orders) != self.cycles or self.cycle_orders[0] != self.order:
            raise ValueError("cycle_orders must hold one order per cycle, starting with `order`")
        expected = tuple(site for cycle in self.cycle_orders for site in cycle)
        if tuple(hop.site for hop in self.hops) != expected:
            raise ValueError("hops do not visit the sites in the order of cycle_orders")

    @classmethod
    def build(
        cls,
        cycle_orders: Sequence[Sequence[str]],
        hyperparameters: HopHyperparameters,
        *,
        learning_rate_decay: float = 1.0,
        steps_by_site: Mapping[str, int] | None = None,
        encoding: str = "fixed",
    ) -> CandidatePlan:
        """Builds the hops of a run from one order per cycle and a base set of hyperparameters.

        Hop k (counting across cycles) trains with learning rate
        ``hyperparameters.learning_rate * learning_rate_decay**k`` and seed
        ``hyperparameters.seed + k``, so repeated visits to a site draw different batches.

        Args:
            cycle_orders: The site order of each cycle; all must order the same sites.
            hyperparameters: What hop 0 trains with.
            learning_rate_decay: Per-hop learning-rate factor.
            steps_by_site: Visit length per site, overriding `hyperparameters.steps`.
            encoding: Recorded with the plan.
        """
        orders = tuple(tuple(order) for order in cycle_orders)
        if not orders or not orders[0]:
            raise ValueError("a plan needs at least one cycle over at least one site")
        if any(sorted(order) != sorted(orders[0]) for order in orders):
            raise ValueError("every cycle must visit the same sites")
        if not (math.isfinite(learning_rate_decay) and learning_rate_decay > 0):
            raise ValueError(f"learning_rate_decay must be positive, got {learning_rate_decay}")
        steps = dict(steps_by_site or {})
        hops: list[Hop] = []
        for k, site in enumerate(site for order in orders for site in order):
            hops.append(
                Hop(
                    site,
                    replace(
                        hyperparameters,
                        learning_rate=hyperparameters.learning_rate * learning_rate_decay**k,
                        steps=steps.get(site, hyperparameters.steps),
                        seed=hyperparameters.seed + k,
                    ),
                )
            )
        return cls(
            hops=tuple(hops),
            cycles=len(orders),
            order=orders[0],
            encoding=encoding,
            cycle_orders=orders,
            learning_rate_decay=learning_rate_decay,
        )

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites the plan visits, in the order of the first cycle."""
        return self.order

    @property
    def reshuffles(self) -> bool:
        """Whether some cycle visits the sites in a different order than the first."""
        return any(order != self.order for order in self.cycle_orders)

    def cycle_hops(self) -> tuple[tuple[Hop, ...], ...]:
        """The hops grouped by cycle (a consolidation cycle is the last group): what a
        per-cycle report or pruning decision follows."""
        groups: list[tuple[Hop, ...]] = []
        start = 0
        for order in self.cycle_orders:
            groups.append(self.hops[start : start + len(order)])
            start += len(order)
        return tuple(groups)

    def describe(self) -> str:
        """A short human-readable form, e.g. ``"a > b > c x2"``."""
        if self.reshuffles:
            return " | ".join(" > ".join(order) for order in self.cycle_orders)
        return " > ".join(self.order) + (f" x{self.cycles}" if self.cycles > 1 else "")

    def to_plan_document(
        self,
        dataset: str,
        labels: Sequence[str],
        task: str = "seq-classification",
        *,
        name: str = "run",
        lora: Mapping[str, Any] | None = None,
        base_model_sha256: str | None = None,
    ) -> dict[str, Any]:
        """The JSON-able run plan the coordinator accepts, with one explicit entry per hop.

        Args:
            dataset: The dataset name every site resolves locally.
            labels: The label set.
            task: The coordinator's task name.
            name: The run name.
            lora: LoRA settings (r, alpha, dropout, target_modules); the coordinator's defaults
                when omitted.
            base_model_sha256: Pins the base model, when given.
        """
        document: dict[str, Any] = {
            "name": name,
            "task": task,
            "dataset": dataset,
            "labels": list(labels),
            "hops": [
                {"site": hop.site, "hyperparameters": _document(hop.hyperparameters)}
                for hop in self.hops
            ],
        }
        if lora is not None:
            document["lora"] = dict(lora)
        if base_model_sha256 is not None:
            document["base_model_sha256"] = base_model_sha256
        return document

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able form (stored in trial user attributes); `from_json_dict` reads it back."""
        return {
            "encoding": self.encoding,
            "cycle_orders": [list(order) for order in self.cycle_orders],
            "learning_rate_decay": self.learning_rate_decay,
            "hops": [[hop.site, _document(hop.hyperparameters)] for hop in self.hops],
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> CandidatePlan:
        """The inverse of `to_json_dict`."""
        orders = tuple(tuple(order) for order in data["cycle_orders"])
        return cls(
            hops=tuple(
                Hop(site, HopHyperparameters.model_validate(hp)) for site, hp in data["hops"]
            ),
            cycles=len(orders),
            order=orders[0],
            encoding=str(data["encoding"]),
            cycle_orders=orders,
            learning_rate_decay=float(data["learning_rate_decay"]),
        )
