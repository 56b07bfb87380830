"""Run plans: the ordered hops (site, hyperparameters) of one sequential run, validated."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocols.approval import HYPERPARAMETERS, ApprovalBundle, BundleViolation
from protocols.hyperparameters import HopHyperparameters
from protocols.task_types import CLASSIFICATION_TASK_TYPES, TaskType

__all__ = [
    "CrossValidationSpec",
    "FailurePolicy",
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


class HopSpec(_Strict):
    site: SiteName
    hyperparameters: HyperparameterSpec | None = None  # None: the plan's defaults


class RunPlan(_Strict):
    """One sequential run. Either `hops` (explicit) or `sites` x `cycles` (shorthand)."""

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

    @model_validator(mode="after")
    def _check_shape(self) -> RunPlan:
        if bool(self.sites) == bool(self.hops):
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
        )

    def expanded_hops(self) -> list[tuple[str, HyperparameterSpec]]:
        """The hops in execution order, each with its effective hyperparameters."""
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
