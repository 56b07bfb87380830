"""Candidate plans: the hops (site, hyperparameters) one trial runs, and their run-plan document."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from protocols.hyperparameters import HopHyperparameters

__all__ = [
    "FEDERATED_MODES",
    "STRATEGIES",
    "CandidatePlan",
    "Federation",
    "Hop",
    "HopHyperparameters",
]

# The modes and aggregation strategies a plan may have beside sequential (the coordinator's
# RunPlan names them; it cannot be imported from here).
FEDERATED_MODES = ("federated", "hybrid")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")

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


@dataclass(frozen=True)
class Federation:
    """How a federated or hybrid candidate trains: rounds from one shared checkpoint, each
    member's contribution aggregated by a Flower strategy.

    Attributes:
        mode: "federated" (every site trains in parallel) or "hybrid" (each group trains its
            sites as a chain, the groups in parallel).
        strategy: "fedavg", "fedprox", "fedadam" or "fedyogi".
        rounds: How many rounds.
        local_steps: Optimiser steps of each site's hop in a round.
        groups: Hybrid: the chains, each site in exactly one; federated: empty.
        proximal_mu: FedProx's proximal term (0 for the other strategies).
    """

    mode: str
    strategy: str
    rounds: int
    local_steps: int
    groups: tuple[tuple[str, ...], ...] = ()
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(tuple(g) for g in self.groups))
        if self.mode not in FEDERATED_MODES:
            raise ValueError(f"mode must be one of {', '.join(FEDERATED_MODES)}, got {self.mode!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.strategy!r}")  # fmt: skip
        if self.rounds < 1 or self.local_steps < 1:
            raise ValueError("rounds and local steps must be at least 1")
        if (self.mode == "hybrid") != bool(self.groups):
            raise ValueError("a hybrid plan has groups; a federated plan has none")
        sites = [site for group in self.groups for site in group]
        if any(not group for group in self.groups) or len(set(sites)) != len(sites):
            raise ValueError(f"groups must be non-empty and name each site once: {self.groups}")
        if self.proximal_mu < 0 or (self.proximal_mu and self.strategy != "fedprox"):
            raise ValueError("a proximal term needs the fedprox strategy and must be >= 0")

    def describe(self) -> str:
        """E.g. ``"hybrid fedavg [a > b | c] 3 rounds x 10 steps"``."""
        chains = (
            " [" + " | ".join(" > ".join(group) for group in self.groups) + "]"
            if self.groups
            else ""
        )
        mu = f" mu={self.proximal_mu:g}" if self.strategy == "fedprox" else ""
        return (f"{self.mode} {self.strategy}{mu}{chains} {self.rounds} round"
                f"{'s' if self.rounds != 1 else ''} x {self.local_steps} steps")  # fmt: skip

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "strategy": self.strategy,
            "rounds": self.rounds,
            "local_steps": self.local_steps,
            "groups": [list(group) for group in self.groups],
            "proximal_mu": self.proximal_mu,
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> Federation:
        return cls(
            mode=str(data["mode"]),
            strategy=str(data["strategy"]),
            rounds=int(data["rounds"]),
            local_steps=int(data["local_steps"]),
            groups=tuple(tuple(str(s) for s in group) for group in data.get("groups", ())),
            proximal_mu=float(data.get("proximal_mu", 0.0)),
        )


class Hop(NamedTuple):
    """One visit: the site and what it trains with."""

    site: str
    hyperparameters: HopHyperparameters


@dataclass(frozen=True)
class CandidatePlan:
    """One run the search proposes: `cycles` passes over the sites (sequential), or the rounds
    of a federated or hybrid run (`federation` set).

    Attributes:
        hops: Every visit in execution order.
        cycles: How many passes over the sites.
        order: The order of the first cycle (of every cycle unless the plan reshuffles).
        encoding: The name of the permutation encoding that proposed the order ("fixed" when the
            plan was built by hand or by a baseline).
        cycle_orders: The order of each cycle.
        learning_rate_decay: The factor applied to the learning rate at every hop
            (hop k trains with ``hops[0].learning_rate * learning_rate_decay**k``).
        federation: Set for a federated or hybrid plan (see `federated`); its hops are then
            every round's hops (each site once per round, in chain order), `cycles` its rounds.
    """

    hops: tuple[Hop, ...]
    cycles: int
    order: tuple[str, ...]
    encoding: str = "fixed"
    cycle_orders: tuple[tuple[str, ...], ...] = field(default=())
    learning_rate_decay: float = 1.0
    federation: Federation | None = None

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

    @classmethod
    def federated(
        cls,
        federation: Federation,
        sites: Sequence[str],
        hyperparameters: HopHyperparameters,
        *,
        encoding: str = "fixed",
    ) -> CandidatePlan:
        """A federated or hybrid plan: every round each site trains one hop of
        `federation.local_steps` steps with `hyperparameters` (hybrid: in its group's chain).

        Args:
            federation: Mode, strategy, rounds, local steps and (hybrid) groups.
            sites: The run's sites (federated: in plan order; hybrid: the groups' sites).
            hyperparameters: What every hop trains with (its steps replaced by the local steps).
            encoding: Recorded with the plan.
        """
        order = (
            tuple(site for group in federation.groups for site in group)
            if federation.groups
            else tuple(sites)
        )
        if sorted(order) != sorted(sites) or len(set(order)) != len(order):
            raise ValueError(f"the groups {federation.groups} do not partition {list(sites)}")
        hp = replace(
            hyperparameters, steps=federation.local_steps, proximal_mu=federation.proximal_mu
        )
        return cls(
            hops=tuple(Hop(site, hp) for _ in range(federation.rounds) for site in order),
            cycles=federation.rounds,
            order=order,
            encoding=encoding,
            federation=federation,
        )

    @property
    def mode(self) -> str:
        """The run mode: "sequential", "federated" or "hybrid"."""
        return "sequential" if self.federation is None else self.federation.mode

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
        if self.federation is not None:
            return self.federation.describe()
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
        }
        if self.federation is None:
            document["hops"] = [
                {"site": hop.site, "hyperparameters": _document(hop.hyperparameters)}
                for hop in self.hops
            ]
        else:
            document.update(self._federated_document())
        if lora is not None:
            document["lora"] = dict(lora)
        if base_model_sha256 is not None:
            document["base_model_sha256"] = base_model_sha256
        return document

    def _federated_document(self) -> dict[str, Any]:
        """The mode, members, defaults and `[federated]` table of a federated or hybrid plan."""
        federation = self.federation
        assert federation is not None
        spec: dict[str, Any] = {
            "strategy": federation.strategy,
            "rounds": federation.rounds,
            "local_steps": federation.local_steps,
        }
        if federation.strategy == "fedprox":
            spec["proximal_mu"] = federation.proximal_mu
        defaults = _document(replace(self.hops[0].hyperparameters, proximal_mu=0.0))
        document: dict[str, Any] = {"mode": federation.mode, "defaults": defaults}
        if federation.groups:
            document["groups"] = [
                {"name": f"group{index + 1}", "sites": list(group)}
                for index, group in enumerate(federation.groups)
            ]
        else:
            document["sites"] = list(self.order)
        document["federated"] = spec
        return document

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able form (stored in trial user attributes); `from_json_dict` reads it back."""
        document: dict[str, Any] = {
            "encoding": self.encoding,
            "cycle_orders": [list(order) for order in self.cycle_orders],
            "learning_rate_decay": self.learning_rate_decay,
            "hops": [[hop.site, _document(hop.hyperparameters)] for hop in self.hops],
        }
        if self.federation is not None:
            document["federation"] = self.federation.to_json_dict()
        return document

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
            federation=(
                Federation.from_json_dict(data["federation"]) if "federation" in data else None
            ),
        )
