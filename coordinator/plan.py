"""Run plans: the ordered hops (site, hyperparameters) of one sequential run, or the rounds of a
federated or hybrid run, validated."""

from __future__ import annotations

import dataclasses
import json
import random
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocols.approval import HYPERPARAMETERS, ApprovalBundle, BundleViolation
from protocols.hyperparameters import HopHyperparameters
from protocols.statistics import FOLD_NORMALISERS_OPTION
from protocols.task_types import CLASSIFICATION_TASK_TYPES, TaskType

__all__ = [
    "AGGREGATION_STRATEGIES",
    "RUN_MODES",
    "CrossValidationSpec",
    "FailurePolicy",
    "FederatedSpec",
    "GroupSpec",
    "HopSpec",
    "HyperparameterSpec",
    "LoraSpec",
    "PlanError",
    "RunPlan",
    "TaskType",
    "load_plan",
    "parse_plan",
]

SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
RunMode = Literal["sequential", "federated", "hybrid"]
StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi"]
RUN_MODES: tuple[RunMode, ...] = ("sequential", "federated", "hybrid")
AGGREGATION_STRATEGIES: tuple[StrategyName, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi")
# Flower's defaults for the server-side optimisers (flwr.serverapp.strategy.FedAdam / FedYogi).
_SERVER_OPTIMISER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
}


class PlanError(ValueError):
    """A run plan is malformed; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A hop's hyperparameters in a plan: the one model both ends share (types, defaults, bounds).
HyperparameterSpec = HopHyperparameters


class LoraSpec(_Strict):
    r: int = Field(default=8, ge=1, le=1024)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(default=("query", "value"), min_length=1)


class FailurePolicy(_Strict):
    """What the engine does when a hop fails, its lease expires or its site stays away."""

    on_failure: Literal["retry", "skip", "pause", "abort"] = "retry"
    max_retries: int = Field(default=2, ge=0, le=100)  # for "retry"
    retry_backoff_seconds: float = Field(default=5.0, ge=0)  # doubled per attempt
    then: Literal["skip", "pause", "abort"] = "abort"  # once retries are exhausted
    lease_timeout_seconds: float = Field(default=300.0, gt=0)  # extended by every heartbeat
    site_wait_seconds: float = Field(default=3600.0, ge=0)  # offline site, then the policy


class CrossValidationSpec(_Strict):
    """A cross-validation run (search trials): every hop trains one model per fold.

    Fold i's model trains on each site's training rows outside fold i and is scored on fold i,
    so the run's score is the sites' k-fold cross-validated metric; sites whose validation split
    holds at least `min_validation_rows` rows (0: never) score on it instead. Such a run yields
    fold models, not a deployable model: test splits are never evaluated for it.
    """

    folds: int = Field(default=5, ge=2, le=20)
    min_validation_rows: int = Field(default=0, ge=0)


class FederatedSpec(_Strict):
    """How a federated or hybrid run trains and aggregates, round by round (`[federated]`).

    Every round starts from one checkpoint (the previous round's aggregate; the base model for
    round 1). Federated: each selected site trains from it in parallel. Hybrid: each selected
    group trains a chain of hops from it (its sites in order). The contributions are then
    aggregated by Flower's strategy, weighted by the examples each one trained on.
    """

    strategy: StrategyName = "fedavg"
    rounds: int = Field(default=3, ge=1, le=10_000)
    # Flower's sampling: max(int(fraction_train * available), min_sites) of the sites (hybrid:
    # of the groups) train each round; a round needs `min_sites` contributions to aggregate.
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    min_sites: int = Field(default=1, ge=1)
    local_steps: int | None = Field(default=None, ge=1, le=1_000_000)  # None: defaults.steps
    seed: int = Field(default=0, ge=0, lt=2**63)  # which sites a round samples
    # FedProx: the sites' proximal term (mu/2)||w - w_round||^2.
    proximal_mu: float = Field(default=0.0, ge=0)
    # FedAdam / FedYogi (server-side optimiser; None: Flower's default for the strategy).
    eta: float | None = Field(default=None, gt=0)
    beta_1: float | None = Field(default=None, ge=0, lt=1)
    beta_2: float | None = Field(default=None, ge=0, lt=1)
    tau: float | None = Field(default=None, gt=0)
    # A site (hybrid: a group) not done `round_deadline_seconds` after its round started:
    # "wait" for it (only its lease and the failure policy end it), "drop" it from the round,
    # or "abort" the run.
    stragglers: Literal["wait", "drop", "abort"] = "wait"
    round_deadline_seconds: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _check_options(self) -> FederatedSpec:
        if self.proximal_mu and self.strategy != "fedprox":
            raise ValueError(f"'proximal_mu' applies to fedprox, not {self.strategy}")
        if self.strategy not in _SERVER_OPTIMISER_DEFAULTS:
            options = ("eta", "beta_1", "beta_2", "tau")
            given = [name for name in options if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to fedadam and "
                    f"fedyogi, not {self.strategy}"
                )
        return self

    def server_optimiser(self) -> dict[str, float]:
        """FedAdam / FedYogi: eta, beta_1, beta_2, tau (Flower's defaults filled in); else {}."""
        defaults = _SERVER_OPTIMISER_DEFAULTS.get(self.strategy)
        if defaults is None:
            return {}
        values = {name: getattr(self, name) for name in defaults}
        return {name: float(defaults[name] if v is None else v) for name, v in values.items()}

    def sample_size(self, available: int) -> int:
        """How many of `available` sites (hybrid: groups) a round trains, as Flower samples."""
        return min(available, max(int(available * self.fraction_train), self.min_sites))


class GroupSpec(_Strict):
    """A hybrid run's group: its sites train one after another within each round."""

    name: SiteName
    sites: tuple[SiteName, ...] = Field(min_length=1)


class HopSpec(_Strict):
    site: SiteName
    hyperparameters: HyperparameterSpec | None = None  # None: the plan's defaults


class RunPlan(_Strict):
    """One run. Sequential: either `hops` (explicit) or `sites` x `cycles` (shorthand).

    Federated (`mode = "federated"`): `sites` and a `[federated]` table. Hybrid
    (`mode = "hybrid"`): `[[groups]]` and a `[federated]` table. Both train every round with the
    plan's `defaults` (their steps replaced by `federated.local_steps` when set).
    """

    mode: RunMode = "sequential"
    name: str = Field(default="run", min_length=1, max_length=200)
    task: TaskType = "seq-classification"
    dataset: str = Field(min_length=1, max_length=200)
    labels: tuple[str, ...] = ()  # classification tasks: the label set, identical at every site
    options: dict[str, Any] = Field(default_factory=dict)  # task options, e.g. tabular model
    base_model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    lora: LoraSpec = LoraSpec()
    defaults: HyperparameterSpec = HyperparameterSpec()
    sites: tuple[SiteName, ...] = ()
    cycles: int = Field(default=1, ge=1, le=1000)
    hops: tuple[HopSpec, ...] = ()
    failure: FailurePolicy = FailurePolicy()
    # Bounds every hop's hyperparameters stay within; sites approve them. Default: the hops' own
    # values (so the approved bundle is exactly this plan).
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    cross_validation: CrossValidationSpec | None = None  # set: a cross-validation run
    federated: FederatedSpec | None = None  # federated and hybrid runs: rounds, strategy
    groups: tuple[GroupSpec, ...] = ()  # hybrid runs: the groups, each a chain of sites

    @model_validator(mode="after")
    def _check_mode(self) -> RunPlan:
        if self.mode == "sequential":
            if self.federated is not None or self.groups:
                raise ValueError("'federated' and 'groups' need mode 'federated' or 'hybrid'")
            return self
        if self.federated is None:
            raise ValueError(f"a {self.mode} run needs a 'federated' table (strategy, rounds)")
        if self.hops or self.cycles != 1:
            raise ValueError(f"a {self.mode} run takes no 'hops' or 'cycles'")
        if self.cross_validation is not None:
            raise ValueError(f"'cross_validation' applies to sequential runs, not {self.mode}")
        if self.mode == "federated":
            if self.groups:
                raise ValueError("'groups' applies to hybrid runs; a federated run lists 'sites'")
            members, what = list(self.sites), "sites"
            if len(set(members)) != len(members):
                raise ValueError("'sites' has duplicates")
        else:
            if self.sites:
                raise ValueError("a hybrid run lists its sites in 'groups', not 'sites'")
            if not self.groups:
                raise ValueError("a hybrid run needs 'groups' (each a name and its sites)")
            members, what = [g.name for g in self.groups], "groups"
            if len(set(members)) != len(members):
                raise ValueError("'groups' has duplicate names")
            sites = [site for group in self.groups for site in group.sites]
            if len(set(sites)) != len(sites):
                raise ValueError("a site appears more than once in 'groups'")
        if self.federated.min_sites > len(members):
            raise ValueError(
                f"federated.min_sites is {self.federated.min_sites} but the run has "
                f"{len(members)} {what}"
            )
        return self

    @model_validator(mode="after")
    def _check_fold_normalisers(self) -> RunPlan:
        normalisers = self.options.get(FOLD_NORMALISERS_OPTION)
        if normalisers is None:
            return self
        if self.cross_validation is None:
            raise ValueError(
                f"option {FOLD_NORMALISERS_OPTION!r} applies to cross-validation runs; a run "
                "without 'cross_validation' uses the global 'mean' and 'std'"
            )
        if self.options.get("normalisation", "per-site") != "global":  # the task's default
            raise ValueError(f"option {FOLD_NORMALISERS_OPTION!r} needs normalisation 'global'")
        if not isinstance(normalisers, list) or len(normalisers) != self.cross_validation.folds:
            raise ValueError(
                f"option {FOLD_NORMALISERS_OPTION!r} must list one normaliser per fold "
                f"({self.cross_validation.folds})"
            )
        return self

    @model_validator(mode="after")
    def _check_shape(self) -> RunPlan:
        if self.mode == "sequential" and bool(self.sites) == bool(self.hops):
            raise ValueError("give either 'hops' or 'sites' (with optional 'cycles'), not both")
        if self.hops and self.cycles != 1:
            raise ValueError("'cycles' only applies to the 'sites' shorthand")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("'labels' has duplicates")
        if self.task in CLASSIFICATION_TASK_TYPES and len(self.labels) < 2:
            raise ValueError(f"a {self.task} run needs 'labels' with at least two labels")
        try:
            json.dumps(self.options, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'options' must be plain JSON: {exc}") from exc
        unknown = sorted(set(self.bounds) - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"'bounds' names unknown hyperparameters: {', '.join(unknown)}")
        for name, (low, high) in self.bounds.items():
            if not low <= high:
                raise ValueError(f"bounds.{name}: lower bound {low} is above {high}")
        bundle = self.approval_bundle()
        for index, (_, hp) in enumerate(self.expanded_hops()):
            try:
                bundle.check_hyperparameters(hp.model_dump())
            except BundleViolation as exc:
                raise ValueError(f"hop {index}: {exc}") from exc
        return self

    def effective_bounds(self) -> dict[str, tuple[float, float]]:
        """The declared bounds, or else the range the hops actually use."""
        if self.bounds:
            return dict(self.bounds)
        values = [hp.model_dump() for _, hp in self.expanded_hops()]
        return {
            name: (float(min(v[name] for v in values)), float(max(v[name] for v in values)))
            for name in HYPERPARAMETERS
        }

    def approval_bundle(self) -> ApprovalBundle:
        """What each site reviews and approves before this run may touch its data."""
        return ApprovalBundle(
            task_type=self.task,
            dataset=self.dataset,
            base_model_sha256=self.base_model_sha256 or "",
            labels=self.labels,
            lora=self.lora.model_dump(mode="json") if self.task != "tabular" else {},
            options=self.options,
            bounds=self.effective_bounds(),
            cross_validation=(
                self.cross_validation.model_dump() if self.cross_validation is not None else {}
            ),
            federation=self.federation(),
        )

    def federation(self) -> dict[str, Any]:
        """A federated or hybrid run's rounds as its sites approve them ({} when sequential)."""
        if self.federated is None:
            return {}
        spec = self.federated
        document: dict[str, Any] = {
            "mode": self.mode,
            "strategy": spec.strategy,
            "rounds": spec.rounds,
            "fraction_train": spec.fraction_train,
            "min_sites": spec.min_sites,
            **spec.server_optimiser(),
        }
        if spec.strategy == "fedprox":
            document["proximal_mu"] = spec.proximal_mu
        if self.groups:
            document["groups"] = [[g.name, list(g.sites)] for g in self.groups]
        return document

    def round_hyperparameters(self) -> HyperparameterSpec:
        """What every site trains with in each round of a federated or hybrid run."""
        spec = self.federated
        if spec is None:
            raise ValueError("a sequential run has no rounds")
        update: dict[str, Any] = {"proximal_mu": spec.proximal_mu}
        if spec.local_steps is not None:
            update["steps"] = spec.local_steps
        return dataclasses.replace(self.defaults, **update)

    def round_members(self) -> list[tuple[str, tuple[str, ...]]]:
        """Federated: each site as its own one-site chain; hybrid: each group and its chain."""
        if self.mode == "hybrid":
            return [(group.name, group.sites) for group in self.groups]
        if self.mode == "federated":
            return [(site, (site,)) for site in self.sites]
        raise ValueError("a sequential run has no rounds")

    def round_selection(self) -> list[list[tuple[str, tuple[str, ...]]]]:
        """The members each round trains, round by round: Flower's sample size
        (`FederatedSpec.sample_size`) drawn by a generator seeded with `federated.seed` and the
        round number, in plan order. The engine and the simulator both select with this."""
        spec = self.federated
        if spec is None:
            raise ValueError("a sequential run has no rounds")
        members = self.round_members()
        size = spec.sample_size(len(members))
        return [
            [
                members[i]
                for i in sorted(random.Random(f"{spec.seed}:{n}").sample(range(len(members)), size))
            ]
            for n in range(1, spec.rounds + 1)
        ]

    def expanded_hops(self) -> list[tuple[str, HyperparameterSpec]]:
        """The hops in execution order, each with its effective hyperparameters.

        Federated and hybrid runs: the hops of one round (every site once, with the round's
        hyperparameters), in group order.
        """
        if self.mode != "sequential":
            hp = self.round_hyperparameters()
            return [(site, hp) for _, chain in self.round_members() for site in chain]
        if self.sites:
            return [(site, self.defaults) for _ in range(self.cycles) for site in self.sites]
        return [(hop.site, hop.hyperparameters or self.defaults) for hop in self.hops]

    def to_json(self) -> str:
        return self.model_dump_json()


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "plan"
        lines.append(f"  {where}: {error['msg']}")
    return "invalid run plan:\n" + "\n".join(lines)


def parse_plan(document: dict[str, Any] | str) -> RunPlan:
    """Validates a plan given as a mapping or a JSON string.

    Raises:
        PlanError: With one line per problem, naming the field.
    """
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as exc:
            raise PlanError(f"run plan is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise PlanError("run plan must be a JSON object / TOML table")
    try:
        return RunPlan.model_validate(document)
    except ValidationError as exc:
        raise PlanError(_format_validation_error(exc)) from exc


def load_plan(path: Path) -> RunPlan:
    """Reads a plan from a .json or .toml file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"cannot read run plan {path}: {exc.strerror}") from exc
    if path.suffix.lower() == ".toml":
        try:
            return parse_plan(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise PlanError(f"run plan {path} is not valid TOML: {exc}") from exc
    return parse_plan(text)
