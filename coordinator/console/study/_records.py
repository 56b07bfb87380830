"""What a study keeps beside Optuna's trials: the run template every trial shares, the run
each trial ran, and where studies are stored next to a coordinator's ledger."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

from coordinator.plan import RunPlan, parse_plan
from ordering import (
    CandidatePlan,
    FloatRange,
    IntRange,
    OrderingStudy,
    SearchSpace,
    StudyMismatch,
)
from protocols.approval import ApprovalBundle
from protocols.statistics import FOLD_NORMALISERS_OPTION

__all__ = [
    "STUDY_SCHEMA",
    "RunTemplate",
    "approval_bounds",
    "attach_run_template",
    "plan_from_study",
    "run_template_of",
    "scale_hyperparameters",
    "study_storage_url",
    "trial_run_ids",
]

STUDY_SCHEMA = "baton_studies"
"""The PostgreSQL schema holding Optuna's tables beside the ledger's (see `study_storage_url`)."""

_TEMPLATE_ATTR = "baton.run_template"  # study user attribute: the RunTemplate as JSON
_RUN_LINK_PREFIX = "baton.run_id:"  # study user attributes: "<prefix><stage study>#<trial>"
# What a run must share with a study's template to count as one of its trials (RunPlan fields).
_TEMPLATE_FIELDS = (
    "task", "dataset", "labels", "options", "lora", "base_model_sha256", "cross_validation",
)  # fmt: skip


# ---- what every run of a study shares -----------------------------------------------------------


def _plain_json(value: Any) -> Any:
    """`value` as plain JSON types (tuples become lists), so stored and fresh copies compare."""
    return json.loads(json.dumps(value, allow_nan=False))


@dataclass(frozen=True)
class RunTemplate:
    """What every run of a study shares: the data, the task, and the metric the sites report.

    Attributes:
        dataset: The dataset name every site resolves locally.
        labels: The label set (classification tasks).
        task: The coordinator's task type ("seq-classification", "tabular", "causal-lm").
        metric: The validation metric that scores a run ("accuracy", "macro_f1", "loss", ...);
            the study's direction must match it (larger accuracy is better, smaller loss is).
        lora: LoRA settings (r, alpha, dropout, target_modules); the coordinator's defaults
            when None.
        options: Task options (e.g. the tabular model).
        base_model_sha256: Pins the base model of every run, when given.
        failure: The failure policy of every run (the coordinator's default when None).
        bounds: The hyperparameter bounds every run declares (see `approval_bounds`). Sites
            approve a run by its approval bundle, which holds these bounds instead of the hops'
            own values, so one approval covers every trial of the study. None: each run's
            bundle holds its own values, and every trial needs its own approval.
        cross_validation: ``{"folds": k, "min_validation_rows": m}``: every trial is a
            cross-validation run (see `coordinator.plan.CrossValidationSpec`), scored by the
            sites' k-fold cross-validated metric over their training splits. The final run of
            the chosen plan (``final=True``) is an ordinary run: one model on all training rows,
            under its own approval bundle. None: trials are scored on validation splits.
    """

    dataset: str
    labels: tuple[str, ...] = ()
    task: str = "seq-classification"
    metric: str = "accuracy"
    lora: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    base_model_sha256: str | None = None
    failure: Mapping[str, Any] | None = None
    bounds: Mapping[str, tuple[float, float]] | None = None
    cross_validation: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.bounds is not None:
            bounds = {str(k): (float(lo), float(hi)) for k, (lo, hi) in self.bounds.items()}
            object.__setattr__(self, "bounds", bounds)
        if not self.metric:
            raise ValueError("a run template needs the metric that scores a run")
        if self.cross_validation is not None:
            object.__setattr__(
                self, "cross_validation", {k: int(v) for k, v in self.cross_validation.items()}
            )

    def plan_document(
        self, plan: CandidatePlan, *, name: str = "run", budget: float = 1.0, final: bool = False
    ) -> dict[str, Any]:
        """The run-plan document of `plan` (explicit hops), scaled down when `budget` < 1.

        Args:
            plan: The hops to run.
            name: The run name.
            budget: Fraction of the full training budget; see `scale_hyperparameters`.
            final: The run that trains the chosen plan's model: never a cross-validation run.
        """
        document = plan.to_plan_document(
            self.dataset,
            self.labels,
            self.task,
            name=name,
            lora=self.lora,
            base_model_sha256=self.base_model_sha256,
        )
        if self.options:
            document["options"] = _plain_json(dict(self.options))
            if final:  # the final model keeps the global normaliser, not the folds'
                document["options"].pop(FOLD_NORMALISERS_OPTION, None)
        if self.failure is not None:
            document["failure"] = _plain_json(dict(self.failure))
        if self.bounds is not None:
            document["bounds"] = {k: [lo, hi] for k, (lo, hi) in self.bounds.items()}
        if self.cross_validation is not None and not final:
            document["cross_validation"] = dict(self.cross_validation)
        if budget != 1.0:
            for hop in document.get("hops", ()):
                hop["hyperparameters"] = scale_hyperparameters(hop["hyperparameters"], budget)
            if plan.federation is not None:  # a federated or hybrid plan: its rounds' hops
                document["defaults"] = scale_hyperparameters(document["defaults"], budget)
                document["federated"]["local_steps"] = scale_hyperparameters(
                    {"steps": document["federated"]["local_steps"]}, budget
                )["steps"]
        return document

    def run_plan(
        self, plan: CandidatePlan, *, name: str = "run", budget: float = 1.0, final: bool = False
    ) -> RunPlan:
        """The validated `RunPlan` of `plan` (see `plan_document`).

        Raises:
            PlanError: If the coordinator would refuse it (the message names the field).
        """
        return parse_plan(self.plan_document(plan, name=name, budget=budget, final=final))

    def approval_bundle(self, plan: CandidatePlan) -> ApprovalBundle:
        """The approval bundle of `plan`'s run: what each site reviews and approves.

        With `bounds` set it is the same for every plan of the study's space, so the sites
        approve the study once (``baton-site approve <sha256>``).

        Raises:
            PlanError: If the coordinator would refuse the plan.
        """
        return self.run_plan(plan).approval_bundle()

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able form, stored with the study; `from_json_dict` reads it back."""
        return {
            "dataset": self.dataset,
            "labels": list(self.labels),
            "task": self.task,
            "metric": self.metric,
            "lora": None if self.lora is None else _plain_json(dict(self.lora)),
            "options": _plain_json(dict(self.options)),
            "base_model_sha256": self.base_model_sha256,
            "failure": None if self.failure is None else _plain_json(dict(self.failure)),
            "bounds": None
            if self.bounds is None
            else {k: [lo, hi] for k, (lo, hi) in self.bounds.items()},
            "cross_validation": None
            if self.cross_validation is None
            else dict(self.cross_validation),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> RunTemplate:
        """The inverse of `to_json_dict`."""
        return cls(
            dataset=str(data["dataset"]),
            labels=tuple(data.get("labels", ())),
            task=str(data.get("task", "seq-classification")),
            metric=str(data.get("metric", "accuracy")),
            lora=data.get("lora"),
            options=dict(data.get("options") or {}),
            base_model_sha256=data.get("base_model_sha256"),
            failure=data.get("failure"),
            bounds=data.get("bounds"),
            cross_validation=data.get("cross_validation"),
        )


def scale_hyperparameters(hyperparameters: Mapping[str, Any], budget: float) -> dict[str, Any]:
    """One hop's hyperparameters at a fraction of the full training budget.

    A probe trial (budget b < 1) trains every hop for ``max(1, round(steps * b))`` steps (and
    ``round(warmup_steps * b)`` warm-up steps), or for ``epochs * b`` passes over the train split
    when the plan gives epochs (the wire contract takes fractional epochs). The site order, the
    number of cycles, the learning rate and the seeds are unchanged, so a probe runs the same
    schedule, only shorter at every visit.

    Raises:
        ValueError: If `budget` is not within (0, 1].
    """
    if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"a budget fraction must be within (0, 1], got {budget}")
    scaled = dict(hyperparameters)
    if budget == 1.0:
        return scaled
    if "steps" in scaled:
        scaled["steps"] = max(1, round(int(scaled["steps"]) * budget))
    if scaled.get("warmup_steps"):
        scaled["warmup_steps"] = round(int(scaled["warmup_steps"]) * budget)
    if scaled.get("epochs"):
        scaled["epochs"] = float(scaled["epochs"]) * budget
    return scaled


def approval_bounds(space: SearchSpace) -> dict[str, tuple[float, float]]:
    """Bounds covering every hop any plan of `space` can run, at any budget fraction.

    The learning rate spans every hop's decayed value; the lower bounds of steps, warm-up steps
    and epochs are 1, 0 and 0, because probe trials (budget < 1) run shorter visits (see
    `scale_hyperparameters`). Fixed values are bounded by themselves. A site that approves a
    bundle with these bounds approves every trial of the study.
    """

    def span(value: float | FloatRange | IntRange) -> tuple[float, float]:
        if isinstance(value, FloatRange | IntRange):
            return float(value.low), float(value.high)
        return float(value), float(value)

    bounds = {name: span(value) for name, value in space.hyperparameter_spans().items()}
    # Probe trials shorten every visit (scale_hyperparameters).
    shortened = {"steps": 1.0, "epochs": 0.0, "warmup_steps": 0.0}
    for name, low in shortened.items():
        bounds[name] = (min(low, bounds[name][0]), bounds[name][1])
    return bounds


def attach_run_template(study: OrderingStudy, template: RunTemplate) -> None:
    """Stores `template` with the study, or checks that it is the one already stored.

    Raises:
        StudyMismatch: If the study was created for other runs (another dataset, metric...).
    """
    optuna_study = study.optuna_study
    wanted = template.to_json_dict()
    stored = optuna_study.user_attrs.get(_TEMPLATE_ATTR)
    if stored is None:
        optuna_study.set_user_attr(_TEMPLATE_ATTR, wanted)
    elif stored != wanted:
        differing = sorted(k for k in wanted if stored.get(k) != wanted[k])
        raise StudyMismatch(
            f"study {study.study_name!r} runs plans with a different {', '.join(differing)}; "
            "use another study name"
        )


def run_template_of(study: OrderingStudy) -> RunTemplate:
    """The run template stored with the study.

    Raises:
        StudyMismatch: If the study has none (it was not created by `baton study start`).
    """
    stored = study.optuna_study.user_attrs.get(_TEMPLATE_ATTR)
    if not isinstance(stored, dict):
        raise StudyMismatch(f"study {study.study_name!r} has no run template (dataset, labels...)")
    return RunTemplate.from_json_dict(stored)


def plan_from_study(storage: str, name: str, *, run_name: str | None = None) -> RunPlan:
    """The run plan of a study's best full-budget trial, ready for `AdminClient.start_run`.

    Args:
        storage: The study's Optuna storage URL.
        name: The study name.
        run_name: The run's name (default ``"<name>-best"``).

    Raises:
        KeyError: If there is no study of that name.
        StudyMismatch: If the study was not created by `baton study start`.
        ValueError: If no full-budget trial has completed yet.
    """
    study = OrderingStudy.load(storage, name)
    template = run_template_of(study)
    return template.run_plan(study.best_plan(), name=run_name or f"{name}-best", final=True)


# ---- storage --------------------------------------------------------------------------------


def study_storage_url(database_url: str, *, create_schema: bool = True) -> str:
    """The Optuna storage URL that keeps a coordinator's studies beside its ledger.

    Optuna's tables (studies, trials, trial_params, ...) do not share names with the ledger's
    (sites, runs, hops, checkpoints, events, evaluations), but both sides version their schema
    with Alembic in a table named ``alembic_version``, and each refuses the other's revision.
    So the two are kept apart:

    * SQLite: a sibling file, ``ledger.sqlite3`` -> ``ledger-studies.sqlite3``.
    * PostgreSQL: the same database, schema `STUDY_SCHEMA` (``search_path`` set through the
      connection's ``options``), created here when `create_schema`.

    Raises:
        ValueError: For an in-memory SQLite ledger or another database.
    """
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database
        if not database or database == ":memory:":
            raise ValueError("an in-memory SQLite ledger has no file to keep studies beside")
        path = Path(database)
        sibling = path.with_name(f"{path.stem}-studies{path.suffix or '.sqlite3'}")
        return url.set(database=str(sibling)).render_as_string(hide_password=False)
    if backend == "postgresql":
        if create_schema:
            engine = create_engine(url)
            try:
                with engine.begin() as connection:
                    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{STUDY_SCHEMA}"'))
            finally:
                engine.dispose()
        existing = url.query.get("options")
        if isinstance(existing, tuple):
            existing = " ".join(existing)
        search_path = f"-csearch_path={STUDY_SCHEMA}"
        options = f"{existing} {search_path}" if existing else search_path
        return url.update_query_dict({"options": options}).render_as_string(hide_password=False)
    raise ValueError(f"studies are kept beside SQLite or PostgreSQL ledgers, not {backend}")


def _link_key(study_name: str, number: int) -> str:
    return f"{_RUN_LINK_PREFIX}{study_name}#{number}"


def trial_run_ids(study: OrderingStudy) -> dict[tuple[str, int], str]:
    """The run each trial ran, by (stage study name, trial number), as `run_search` recorded."""
    links: dict[tuple[str, int], str] = {}
    for key, run_id in study.optuna_study.user_attrs.items():
        if key.startswith(_RUN_LINK_PREFIX):
            stage, _, number = key[len(_RUN_LINK_PREFIX) :].rpartition("#")
            links[(stage, int(number))] = str(run_id)
    return links
