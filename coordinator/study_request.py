"""What starting an ordering study asks for (the `baton study start` options), checked once.

`baton study start` and the dashboard's "New study" form both describe a study as a
`StudyRequest` and check it with `prepare_search`, so both refuse the same input with the same
message. The dashboard's study worker is `baton study start` itself, launched with
`StudyRequest.to_argv`. Optuna is imported only inside `prepare_search` (never at import time:
the coordinator's serve path imports this module).
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

if TYPE_CHECKING:
    from coordinator.console.study import RunTemplate
    from coordinator.plan import RunPlan
    from coordinator.preflight import SiteApprovals
    from ordering import CandidatePlan, ModeSearchSpace, SearchSpace
    from protocols.approval import ApprovalBundle

__all__ = [
    "FinishTrialThenStop",
    "PreparedSearch",
    "StopMode",
    "StudyRequest",
    "StudyRequestError",
    "json_object",
    "parse_study_document",
    "prepare_search",
    "validation_message",
]

_LOWER_IS_BETTER = ("loss", "perplexity")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")


def _study_name(value: str) -> str:
    # A study's name is part of its page's URL.
    if not _NAME.match(value):
        raise ValueError(
            "a study name is 1-100 letters, digits, '.', '_', '-' or spaces, starting with a "
            "letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(_study_name)]
Short = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]
Mode = Literal["sequential", "federated", "hybrid"]
Strategy = Literal["fedavg", "fedprox", "fedadam", "fedyogi"]


class StudyRequestError(ValueError):
    """A study that would be refused: the message says which option and why."""


class StopMode(StrEnum):
    """How a study worker stops: after its current trial, or at once (the trial's run aborted)."""

    FINISH_TRIAL = "finish-trial"
    ABORT_TRIAL = "abort-trial"

    @property
    def signal(self) -> signal.Signals:
        # SIGTERM: `FinishTrialThenStop` lets the trial finish; SIGINT: the KeyboardInterrupt
        # makes the run executor abort the trial's run through the admin API, as Ctrl-C does.
        return signal.SIGTERM if self is StopMode.FINISH_TRIAL else signal.SIGINT


class StudyRequest(BaseModel):
    """The options of `baton study start` (same names, same defaults, same bounds)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    dataset: Short
    sites: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=64
    )
    labels: list[Annotated[str, StringConstraints(max_length=200)]] = Field(
        default_factory=list, max_length=1000
    )
    task: Short = "seq-classification"
    cycles: int = Field(default=1, ge=1, le=1000)
    lr_min: float = Field(default=1e-4, gt=0, le=10)
    lr_max: float = Field(default=1e-2, gt=0, le=10)
    steps_min: int = Field(default=10, ge=1, le=10**7)
    steps_max: int = Field(default=40, ge=1, le=10**7)
    # The forgetting controls (ordering/_forgetting.py), as `baton study start` takes them.
    split_steps_over_cycles: bool = False
    lr_decay_min: float = Field(default=1.0, ge=0, le=10)
    lr_decay_max: float = Field(default=1.0, ge=0, le=10)
    proximal_mu_max: float = Field(default=0.0, ge=0, le=10**4)
    consolidation_steps: int = Field(default=0, ge=0, le=10**7)
    consolidation_lr_factor_min: float = Field(default=0.05, gt=0, le=10)
    consolidation_lr_factor_max: float = Field(default=0.5, gt=0, le=10)
    batch_size: int = Field(default=16, ge=1, le=10**6)
    trials: int = Field(default=10, ge=1, le=10_000)
    encoding: str = Field(default="auto", pattern="^(auto|lehmer|random-keys|all-orders)$")
    aggregation: str = Field(default="mean", pattern="^(mean|weighted|worst)$")
    metric: Short = "accuracy"
    direction: str | None = Field(default=None, pattern="^(maximize|minimize)$")
    lora: dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    base_model_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    seed_orders: str = Field(default="none", pattern="^(none|sizes|probe)$")
    cv_folds: int = Field(default=0, ge=0, le=20)
    min_validation_rows: int = Field(default=0, ge=0, le=10**9)
    warm_start: bool = False
    run_timeout: float = Field(default=3600.0, gt=0, le=30 * 86400)
    site_timeout: float = Field(default=60.0, gt=0, le=86400)
    # The run modes a trial may choose among, and for federated and hybrid trials the
    # strategies, rounds and (hybrid) the most groups (ordering.ModeSearchSpace).
    modes: list[Mode] = Field(
        default_factory=lambda: list[Mode](["sequential"]), min_length=1, max_length=3
    )
    strategies: list[Strategy] = Field(
        default_factory=lambda: list[Strategy](["fedavg"]), min_length=1, max_length=4
    )
    rounds_min: int = Field(default=1, ge=1, le=10_000)
    rounds_max: int = Field(default=4, ge=1, le=10_000)
    max_groups: int = Field(default=2, ge=2, le=63)
    fedprox_mu_min: float = Field(default=0.001, gt=0, le=10**4)
    fedprox_mu_max: float = Field(default=1.0, gt=0, le=10**4)

    @property
    def searches_modes(self) -> bool:
        """Whether trials may be federated or hybrid runs (else: the plain sequential search)."""
        return self.modes != ["sequential"]

    @property
    def minimize(self) -> bool:
        if self.direction is not None:
            return self.direction == "minimize"
        return self.metric in _LOWER_IS_BETTER

    def to_argv(self) -> list[str]:
        """The `baton study start` arguments asking for exactly this study."""
        argv = ["--name", self.name, "--dataset", self.dataset]
        for site in self.sites:
            argv += ["--sites", site]
        for label in self.labels:
            argv += ["--labels", label]
        argv += [
            "--task", self.task, "--cycles", str(self.cycles),
            "--lr-min", repr(self.lr_min), "--lr-max", repr(self.lr_max),
            "--steps-min", str(self.steps_min), "--steps-max", str(self.steps_max),
            "--batch-size", str(self.batch_size), "--trials", str(self.trials),
            "--encoding", self.encoding, "--aggregation", self.aggregation,
            "--metric", self.metric, "--seed-orders", self.seed_orders,
            "--cv-folds", str(self.cv_folds),
            "--min-validation-rows", str(self.min_validation_rows),
            "--run-timeout", repr(self.run_timeout), "--site-timeout", repr(self.site_timeout),
            "--warm-start" if self.warm_start else "--no-warm-start",
            "--lr-decay-min", repr(self.lr_decay_min), "--lr-decay-max", repr(self.lr_decay_max),
            "--proximal-mu-max", repr(self.proximal_mu_max),
            "--consolidation-steps", str(self.consolidation_steps),
            "--consolidation-lr-factor-min", repr(self.consolidation_lr_factor_min),
            "--consolidation-lr-factor-max", repr(self.consolidation_lr_factor_max),
        ]  # fmt: skip
        if self.split_steps_over_cycles:
            argv.append("--split-steps-over-cycles")
        if self.direction is not None:
            argv += ["--direction", self.direction]
        if self.lora is not None:
            argv += ["--lora", json.dumps(self.lora)]
        if self.options is not None:
            argv += ["--options", json.dumps(self.options)]
        if self.base_model_sha256 is not None:
            argv += ["--base-model-sha256", self.base_model_sha256]
        if self.seed is not None:
            argv += ["--seed", str(self.seed)]
        if self.searches_modes:
            argv += [
                "--modes", ",".join(self.modes), "--strategies", ",".join(self.strategies),
                "--rounds-min", str(self.rounds_min), "--rounds-max", str(self.rounds_max),
                "--max-groups", str(self.max_groups),
                "--fedprox-mu-min", repr(self.fedprox_mu_min),
                "--fedprox-mu-max", repr(self.fedprox_mu_max),
            ]  # fmt: skip
        return argv


def parse_study_document(text: str) -> StudyRequest:
    """A study file: the `baton study start` options as TOML or JSON (`lr-min` or `lr_min`).

    Raises:
        StudyRequestError: Not TOML/JSON, or an option missing, unknown or out of bounds (one
            line per problem, naming the option).
    """
    import tomllib

    from pydantic import ValidationError

    stripped = text.strip()
    if not stripped:
        raise StudyRequestError("the study is empty: give at least name, dataset and sites")
    try:
        data: Any = json.loads(stripped) if stripped.startswith("{") else tomllib.loads(stripped)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StudyRequestError(f"the study is neither valid JSON nor TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise StudyRequestError("the study must be a table of options")
    normalized = {str(key).replace("-", "_"): value for key, value in data.items()}
    try:
        return StudyRequest.model_validate(normalized)
    except ValidationError as exc:
        raise StudyRequestError(validation_message(exc)) from exc


def validation_message(exc: Any) -> str:
    """A pydantic ValidationError as one line per problem, with the options' CLI names."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]).replace("_", "-")
        lines.append(f"{where}: {error['msg']}")
    return "\n".join(lines)


def json_object(raw: str | None, option: str) -> dict[str, Any] | None:
    """A JSON object given as text (`--lora`, `--options`), or None for no text.

    Raises:
        StudyRequestError: Not JSON, or not an object.
    """
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StudyRequestError(f"{option} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise StudyRequestError(f"{option} must be a JSON object")
    return value


@dataclass(frozen=True)
class PreparedSearch:
    """A checked study request: its search space, run template and approval bundle.

    `bundle` is the first plan's. A study over modes also has `mode_bundles`: for each mode and
    strategy a trial may run, one trial's bundle (every trial of that mode and strategy differs
    from it only in rounds and groups, which approval rules do not look at).
    """

    request: StudyRequest
    space: SearchSpace
    template: RunTemplate
    first_plan: RunPlan  # the sites in the order given: what preflight checks
    bundle: ApprovalBundle
    mode_bundles: dict[str, ApprovalBundle] = field(default_factory=dict)

    def approval_refusals(self, approvals: Mapping[str, SiteApprovals | None]) -> list[str]:
        """Every mode or strategy the study offers that a site's reported approvals refuse,
        one line each, naming the site; [] when none (or when only the site can tell).

        Args:
            approvals: What each site of the study reported (None: nothing reported yet).
        """
        problems: list[str] = []
        for site in self.request.sites:
            reported = approvals.get(site)
            if reported is None:
                continue
            for what, bundle in self.mode_bundles.items():
                if reported.approves(bundle) is False:
                    mode = what.split(" ")[0]
                    problems.append(
                        f"{site}: its approvals do not allow {what} runs of dataset "
                        f"{bundle.dataset!r} ({bundle.task_type}) within the study's bounds: "
                        f"leave {mode} out of --modes"
                        + (" (or that strategy out of --strategies)" if mode != "sequential"
                           else "")
                        + f", or have the site allow them (an approval policy rule with "
                        f"modes = [\"{mode}\"]"
                        + (f", strategies = [\"{bundle.federation.get('strategy')}\"]"
                           if mode != "sequential" else "")
                        + ")"
                    )  # fmt: skip
        return problems


def prepare_search(request: StudyRequest) -> PreparedSearch:
    """Checks a study request as the coordinator would check its runs, before any run starts.

    Raises:
        StudyRequestError: The search space or the runs' plan would be refused.
    """
    from coordinator.console.study import RunTemplate, approval_bounds, forgetting_controls
    from coordinator.plan import PlanError
    from ordering import FloatRange, IntRange, ModeSearchSpace, SearchSpace, SearchSpaceError

    if request.searches_modes:
        problems = []
        if request.cv_folds:
            problems.append(
                "cv-folds: cross-validation runs are sequential; federated and "
                "hybrid trials are scored on validation splits (use --cv-folds 0)"
            )
        if "sequential" not in request.modes and request.seed_orders != "none":
            problems.append("seed-orders: seeds are sequential orders; add sequential to --modes")
        if "sequential" not in request.modes and request.warm_start:
            problems.append(
                "warm-start: earlier runs join as sequential trials; add sequential to --modes"
            )
        if request.rounds_min > request.rounds_max:
            problems.append(
                f"rounds-min: {request.rounds_min} is above rounds-max {request.rounds_max}"
            )
        if problems:
            raise StudyRequestError("\n".join(problems))
    try:
        space_type = ModeSearchSpace if request.searches_modes else SearchSpace
        space = space_type(
            sites=tuple(request.sites),
            cycles=request.cycles,
            learning_rate=request.lr_min
            if request.lr_min == request.lr_max
            else FloatRange(request.lr_min, request.lr_max, log=True),
            steps=request.steps_min
            if request.steps_min == request.steps_max
            else IntRange(request.steps_min, request.steps_max),
            batch_size=request.batch_size,
            **forgetting_controls(
                split_steps_over_cycles=request.split_steps_over_cycles,
                lr_decay=(request.lr_decay_min, request.lr_decay_max),
                proximal_mu_max=request.proximal_mu_max,
                consolidation_steps=request.consolidation_steps,
                consolidation_lr_factor=(
                    request.consolidation_lr_factor_min,
                    request.consolidation_lr_factor_max,
                ),
            ),
            **(_mode_fields(request) if request.searches_modes else {}),
        )
        template = RunTemplate(
            dataset=request.dataset,
            labels=tuple(request.labels),
            task=request.task,
            metric=request.metric,
            lora=request.lora,
            options=request.options or {},
            base_model_sha256=request.base_model_sha256,
            bounds=approval_bounds(space),  # one approval covers every trial
            cross_validation=(
                {"folds": request.cv_folds, "min_validation_rows": request.min_validation_rows}
                if request.cv_folds
                else None
            ),
        )
        mode_plans = (
            {
                what: template.run_plan(plan, name=request.name)
                for what, plan in _mode_examples(space, request).items()
            }
            if isinstance(space, ModeSearchSpace)
            else {}
        )
        first_plan = (
            template.run_plan(space.plan(tuple(request.sites)), name=request.name)
            if "sequential" in request.modes
            else next(iter(mode_plans.values()))
        )
    except (SearchSpaceError, PlanError, ValueError) as exc:
        raise StudyRequestError(str(exc)) from exc
    return PreparedSearch(
        request,
        space,
        template,
        first_plan,
        first_plan.approval_bundle(),
        {what: plan.approval_bundle() for what, plan in mode_plans.items()},
    )


def _mode_fields(request: StudyRequest) -> dict[str, Any]:
    """The `ModeSearchSpace` fields a request asks for."""
    from ordering import FloatRange, IntRange

    return {
        "modes": tuple(request.modes),
        "strategies": tuple(request.strategies),
        "rounds": request.rounds_min
        if request.rounds_min == request.rounds_max
        else IntRange(request.rounds_min, request.rounds_max),
        "max_groups": request.max_groups,
        "fedprox_mu": request.fedprox_mu_min
        if request.fedprox_mu_min == request.fedprox_mu_max
        else FloatRange(request.fedprox_mu_min, request.fedprox_mu_max, log=True),
    }


def _mode_examples(space: ModeSearchSpace, request: StudyRequest) -> dict[str, CandidatePlan]:
    """One plan per mode and strategy the study offers ("sequential", "federated (fedavg)",
    ...): what the sites' approvals are checked against before any trial."""
    from ordering import CandidatePlan, Federation, balanced_groups

    sequential = space.plan(tuple(request.sites))
    examples: dict[str, CandidatePlan] = {}
    if "sequential" in space.modes:
        examples["sequential"] = sequential
    for mode in (m for m in space.modes if m != "sequential"):
        for strategy in space.strategies:
            federation = Federation(
                mode=mode,
                strategy=strategy,
                rounds=request.rounds_min,
                local_steps=request.steps_min,
                groups=balanced_groups(request.sites, 2) if mode == "hybrid" else (),
                proximal_mu=request.fedprox_mu_min if strategy == "fedprox" else 0.0,
            )
            base = sequential.hops[0].hyperparameters
            examples[f"{mode} ({strategy})"] = CandidatePlan.federated(
                federation, request.sites, base
            )
    return examples


class FinishTrialThenStop:
    """SIGTERM to a study worker: finish the current trial, record it, then stop.

    `install` replaces SIGTERM's default (an immediate death that would leave the trial's run
    running and the trial unfinished); `check`, called after each recorded trial, raises
    `Stopped` once SIGTERM has arrived.
    """

    class Stopped(Exception):
        """The worker was asked to stop and its last trial is recorded."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> FinishTrialThenStop:
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise FinishTrialThenStop.Stopped()
