"""The checks every task passes before it touches this site's data: approval, spec, dataset."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from protocols.approval import ApprovalBundle, BundleViolation
from protocols.v1 import baton_pb2 as pb
from site_agent.approvals import ApprovalStore
from site_agent.examples import DatasetError
from site_agent.registry import RegisteredDataset, load_registered
from site_agent.settings import SiteSettings

if TYPE_CHECKING:
    from site_agent.tasks import TaskSpec, Trainer


class HopFailure(Exception):
    """A task this site refuses or cannot complete; reported to the coordinator with its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _task_spec(task_type: str, labels: Any, lora: pb.LoraConfig, options_json: str) -> TaskSpec:
    """The run's task as a task message describes it (`TaskSpec` validates it)."""
    settings = (lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules))
    return _spec_of(task_type, tuple(labels), settings, options_json)


@functools.lru_cache(maxsize=8)
def _spec_of(
    task_type: str,
    labels: tuple[str, ...],
    lora: tuple[int, int, float, tuple[str, ...]],
    options_json: str,
) -> TaskSpec:
    """`_task_spec`, built and validated once per exact description (a run's hops and their
    preparations all carry the same one); a refusal raises, so it is never cached. Shared by
    the tasks carrying it: read only (`TaskSpec` is frozen; its options are copied where
    changed)."""
    from site_agent.tasks import LoraSettings, TaskSpec

    r, alpha, dropout, target_modules = lora
    try:
        options = json.loads(options_json) if options_json else {}
    except ValueError as exc:
        raise HopFailure("bad-task", f"task options are not JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise HopFailure("bad-task", "task options must be a JSON object")
    return TaskSpec(
        task_type=task_type,
        labels=labels,
        lora=LoraSettings(
            r=r or 8,
            alpha=alpha or 16,
            dropout=dropout,
            target_modules=target_modules or ("query", "value"),
        ),
        options=options,
    )


@functools.lru_cache(maxsize=8)
def _approval_bundle(text: str) -> ApprovalBundle:
    """A task's approval bundle, parsed once per exact JSON text: a run's hops all carry the
    same one. Only the parse is kept: every check of a task against it, and whether it is
    approved here now, runs on every task. A malformed bundle raises, so it is never cached.
    Shared by the tasks carrying it: read only."""
    return ApprovalBundle.from_json(text)


class TaskChecks:
    """Approval, trainer, dataset and base-model checks of the site agent's tasks."""

    settings: SiteSettings
    approvals: ApprovalStore
    _trainers: dict[str, Trainer]
    _trainers_lock: dict[str, threading.Lock]

    if TYPE_CHECKING:

        def trainer(self, task_type: str) -> Trainer: ...

    def _check_approval(
        self,
        task: pb.HopTask | pb.EvaluationTask,
        hyperparameters: Mapping[str, object] | None,
    ) -> None:
        """Refuses a task unless it matches its run's bundle and that bundle is approved here.

        Runs before anything is loaded: an unapproved run never touches this site's data.
        """
        if not task.approval_bundle_json:
            raise HopFailure("not-approved", "the task carries no approval bundle")
        try:
            bundle = _approval_bundle(task.approval_bundle_json)
            if hyperparameters is not None:
                bundle.check_hyperparameters(hyperparameters)
            if isinstance(task, pb.HopTask):
                bundle.check_round(task.round)
        except BundleViolation as exc:
            raise HopFailure("not-approved", f"task leaves its run's bundle: {exc}") from exc
        lora = {
            "r": task.lora.r,
            "alpha": task.lora.alpha,
            "dropout": task.lora.dropout,
            "target_modules": list(task.lora.target_modules),
        }
        expected: dict[str, tuple[object, object]] = {
            "task type": (bundle.task_type, task.task_type),
            "dataset": (bundle.dataset, task.dataset),
            "labels": (tuple(bundle.labels), tuple(task.labels)),
            "options": (dict(bundle.options), json.loads(task.task_options_json or "{}")),
        }
        if bundle.is_statistics:
            raise HopFailure("not-approved", "a statistics bundle does not cover training")
        expected["cross-validation"] = (
            dict(bundle.cross_validation),
            {
                "folds": task.cross_validation.folds,
                "min_validation_rows": task.cross_validation.min_validation_rows,
            }
            if task.HasField("cross_validation")
            else {},
        )
        if bundle.base_model_sha256:
            expected["base model"] = (bundle.base_model_sha256, task.base_model_sha256)
        if bundle.task_type != "tabular":
            expected["LoRA configuration"] = (dict(bundle.lora), lora)
        for what, (approved, actual) in expected.items():
            if approved != actual:
                raise HopFailure("not-approved", f"task {what} differs from its run's bundle")
        if self.settings.require_approval and not self.approvals.is_approved(bundle):
            raise HopFailure(
                "not-approved",
                f"run bundle {bundle.sha256} is not approved at this site; review it with "
                f"`baton-site approvals` and approve it with `baton-site approve {bundle.sha256}`",
            )

    def _task_trainer(self, task_type: str, cross_validation: pb.CrossValidation | None) -> Trainer:
        """The task type's trainer; for a cross-validation run, wrapped to train every fold."""
        trainer = self.trainer(task_type)
        if cross_validation is None:
            return trainer
        from site_agent.tasks import CrossValidatedTrainer

        try:
            return CrossValidatedTrainer(
                trainer, cross_validation.folds, cross_validation.min_validation_rows
            )
        except ValueError as exc:
            raise HopFailure("bad-task", str(exc)) from exc

    def _dataset(self, name: str, task_type: str, *, rehash: bool = False) -> RegisteredDataset:
        """The registered dataset a task names, of its task type (`load_registered`: its source
        refused if it changed since registration; ``rehash``: hashed again in any case)."""
        try:
            dataset = load_registered(self.settings.data_dir, name, rehash=rehash)
        except DatasetError as exc:
            raise HopFailure("dataset-invalid", str(exc)) from exc
        if dataset.task_type != task_type:
            raise HopFailure(
                "dataset-invalid",
                f"dataset {name!r} is registered for {dataset.task_type}, not {task_type}",
            )
        return dataset

    @staticmethod
    def _model_sha256(trainer: Trainer, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        """What a run pins: the base model's hash (LoRA tasks) or the architecture's (tabular)."""
        try:
            return trainer.model_sha256(spec, dataset)
        except ValueError as exc:
            raise HopFailure("bad-task", str(exc)) from exc

    def _check_base_model(self, held: str, pinned: str) -> None:
        if pinned and pinned != held:
            raise HopFailure(
                "base-model-mismatch",
                f"run is pinned to base model {pinned}; this site holds {held}",
            )
