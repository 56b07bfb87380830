"""A run's approval bundle: what a site reviews before it lets a run touch its data.

The bundle names everything about a run that a hospital's review cares about (task type, base
model, LoRA configuration, the bounds every hop's hyperparameters stay within, dataset, Baton
version, and for a federated or hybrid run its mode, aggregation strategy, rounds and groups).
Its identity is the sha256 of its canonical JSON form; both ends compute it the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from protocols.hyperparameters import BOUNDED_HYPERPARAMETERS
from protocols.version import BATON_VERSION

__all__ = [
    "BATON_VERSION",
    "HYPERPARAMETERS",
    "STATISTICS_OPTION",
    "ApprovalBundle",
    "ApprovalRule",
    "BundleViolation",
]

# Hyperparameters every hop carries that bounds may cover (the model's numeric fields but `seed`).
HYPERPARAMETERS = BOUNDED_HYPERPARAMETERS


# The option that marks a bundle as an aggregate-statistics request rather than a training run.
STATISTICS_OPTION = "aggregate_statistics"


class BundleViolation(ValueError):
    """A hop's actual settings fall outside the bundle that was approved."""


@dataclass(frozen=True)
class ApprovalBundle:
    task_type: str
    dataset: str
    base_model_sha256: str  # "" when the run does not pin one (a site's policy may refuse that)
    labels: tuple[str, ...] = ()
    lora: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    baton_version: str = BATON_VERSION
    # Cross-validation runs: {"folds": k, "min_validation_rows": m}; empty for ordinary runs.
    # Left out of the canonical form when empty, so ordinary runs keep their hashes.
    cross_validation: Mapping[str, int] = field(default_factory=dict)
    # Federated and hybrid runs: {"mode", "strategy", "rounds", "fraction_train", "min_sites",
    # the strategy's options, hybrid "groups": [[name, [sites...]], ...]}; empty for sequential
    # runs and left out of the canonical form then, so their hashes stay what they were.
    federation: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def for_statistics(
        cls, task_type: str, dataset: str, *, min_count: int, noise_std: float, cv_folds: int = 0
    ) -> ApprovalBundle:
        """The bundle of an aggregate-statistics request: what a site approves before any
        aggregate of its training rows is computed.

        ``cv_folds`` > 1 (per-fold aggregates too) is part of the bundle; without it the bundle
        is the one requests have always had.
        """
        request: dict[str, Any] = {"min_count": min_count, "noise_std": float(noise_std)}
        if cv_folds:
            request["cv_folds"] = cv_folds
        return cls(
            task_type=task_type,
            dataset=dataset,
            base_model_sha256="",
            options={STATISTICS_OPTION: request},
        )

    @property
    def is_statistics(self) -> bool:
        """True for an aggregate-statistics request's bundle."""
        return STATISTICS_OPTION in self.options

    def canonical_json(self) -> str:
        document = asdict(self)
        document["labels"] = list(self.labels)
        document["bounds"] = {k: [float(lo), float(hi)] for k, (lo, hi) in self.bounds.items()}
        if not self.cross_validation:
            del document["cross_validation"]
        if not self.federation:
            del document["federation"]
        return json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> ApprovalBundle:
        try:
            raw = json.loads(text)
            return cls(
                task_type=str(raw["task_type"]),
                dataset=str(raw["dataset"]),
                base_model_sha256=str(raw["base_model_sha256"]),
                labels=tuple(str(label) for label in raw.get("labels", [])),
                lora=dict(raw.get("lora", {})),
                options=dict(raw.get("options", {})),
                bounds={
                    str(k): (float(v[0]), float(v[1])) for k, v in raw.get("bounds", {}).items()
                },
                baton_version=str(raw.get("baton_version", "")),
                cross_validation={
                    str(k): int(v) for k, v in raw.get("cross_validation", {}).items()
                },
                federation=dict(raw.get("federation", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleViolation(f"approval bundle is malformed: {exc}") from exc

    @property
    def mode(self) -> str:
        """The run's mode: "sequential", "federated" or "hybrid"."""
        return str(self.federation.get("mode", "sequential"))

    def check_round(self, round_number: int) -> None:
        """Raises BundleViolation when a task's round (0: a sequential hop) is not one the
        bundle approved."""
        if self.mode == "sequential":
            if round_number:
                raise BundleViolation(
                    f"a round {round_number} task under a bundle approved for sequential runs"
                )
            return
        rounds = int(self.federation.get("rounds", 0))
        if not 1 <= round_number <= rounds:
            raise BundleViolation(
                f"round {round_number} is outside the {rounds} rounds approved for this "
                f"{self.mode} run"
            )

    def check_hyperparameters(self, values: Mapping[str, object]) -> None:
        """Raises BundleViolation when a hop's hyperparameter leaves the approved bounds.

        Args:
            values: A hop's hyperparameters by name (`HopHyperparameters.model_dump()`).
        """
        for name, (low, high) in self.bounds.items():
            value = values.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BundleViolation(f"{name}={value!r} is not a number the bounds can cover")
            if not low <= float(value) <= high:
                raise BundleViolation(f"{name}={value} is outside the approved [{low}, {high}]")


def _matches(allowed: frozenset[str], value: str) -> bool:
    return "*" in allowed or value in allowed


@dataclass(frozen=True)
class ApprovalRule:
    """One rule of a site's approval policy: the bundles it approves without a per-run review.

    The site applies it to every task; it reports it at hello so that the coordinator and a
    search can tell in advance which runs the site would approve. "*" in a set matches anything.

    Attributes:
        task_types: Task types approved.
        datasets: Datasets approved.
        base_models: Base model sha256 approved.
        max_values: Hyperparameter -> the largest upper bound a bundle may declare for it (a
            bundle without a bound for it needs a human).
        modes: Run modes approved (sequential only unless the rule lists others).
        strategies: Aggregation strategies of approved federated and hybrid runs (any by
            default).
    """

    task_types: frozenset[str]
    datasets: frozenset[str]
    base_models: frozenset[str]
    max_values: Mapping[str, float] = field(default_factory=dict)
    modes: frozenset[str] = frozenset({"sequential"})
    strategies: frozenset[str] = frozenset({"*"})

    def allows(self, bundle: ApprovalBundle) -> bool:
        """Whether this rule approves `bundle`."""
        if not (
            _matches(self.task_types, bundle.task_type)
            and _matches(self.datasets, bundle.dataset)
            and _matches(self.base_models, bundle.base_model_sha256)
            and _matches(self.modes, bundle.mode)
        ):
            return False
        if bundle.mode != "sequential" and not _matches(
            self.strategies, str(bundle.federation.get("strategy", ""))
        ):
            return False
        for name, limit in self.max_values.items():
            bound = bundle.bounds.get(name)
            if bound is None or bound[1] > limit:
                return False  # an unbounded or too-wide hyperparameter needs a human
        return True
