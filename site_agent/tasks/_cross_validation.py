"""Cross-validation runs: one model per fold travels, each scored on its own fold at every site.

A search trial scored on one small validation split is noise (a 30-row site keeps 6 rows); k-fold
cross-validation inside each site's training split is not. Running the whole sequential schedule
once per fold would cost k runs, so a cross-validation run carries the k fold models together:
at every hop, fold i's model trains on the site's training rows outside fold i and is scored on
fold i. The site's score is the example-weighted mean over folds (for accuracy: the out-of-fold
accuracy over all training rows). Test splits are never read. A tabular run with per-fold
normalisers (option ``fold_normalisers``, from a per-fold statistics request) gives fold i's
model fold i's mean and std, pooled over the training rows outside fold i only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from protocols.statistics import FOLD_NORMALISERS_OPTION
from site_agent.registry import RegisteredDataset
from site_agent.tasks._metrics import pool_metrics
from site_agent.tasks._spec import (
    CancelCheck,
    HopHyperparameters,
    HopOutcome,
    ProgressCallback,
    Split,
    TaskSpec,
    TensorSpec,
    Trainer,
)

__all__ = ["CrossValidatedTrainer", "fold_prefix", "fold_spec"]


def fold_prefix(fold: int) -> str:
    """The tensor-name prefix of fold ``fold``'s model in a cross-validation checkpoint."""
    return f"fold{fold}."


def fold_spec(spec: TaskSpec, fold: int, folds: int) -> TaskSpec:
    """The task fold ``fold``'s model trains and is scored with.

    With option ``fold_normalisers`` (one ``{"mean": [...], "std": [...]}`` per fold, pooled
    over every site's training rows outside that fold), that fold's mean and std replace the
    run's global ones; the option itself is removed, so the inner trainer sees a plain
    ``global`` task. Without it, ``spec`` itself.

    Raises:
        ValueError: If the option is not one normaliser per fold of numbers, or the task's
            normalisation is not ``global``.
    """
    if FOLD_NORMALISERS_OPTION not in spec.options:
        return spec
    options = dict(spec.options)
    normalisers = options.pop(FOLD_NORMALISERS_OPTION)
    if options.get("normalisation", "per-site") != "global":
        raise ValueError(f"option {FOLD_NORMALISERS_OPTION!r} needs normalisation 'global'")
    if (
        not isinstance(normalisers, list)
        or len(normalisers) != folds
        or not all(_is_normaliser(entry) for entry in normalisers)
    ):
        raise ValueError(
            f"option {FOLD_NORMALISERS_OPTION!r} must list {folds} normalisers (one per fold), "
            'each {"mean": [numbers], "std": [numbers]}'
        )
    options["mean"] = list(normalisers[fold]["mean"])
    options["std"] = list(normalisers[fold]["std"])
    return dataclasses.replace(spec, options=options)


def _is_normaliser(entry: object) -> bool:
    if not isinstance(entry, dict) or set(entry) != {"mean", "std"}:
        return False
    return all(
        isinstance(values, list)
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
        for values in entry.values()
    )


def _without_fold_normalisers(spec: TaskSpec) -> TaskSpec:
    """The run's task with its global normaliser only (what describes the model's shape)."""
    if FOLD_NORMALISERS_OPTION not in spec.options:
        return spec
    options = {k: v for k, v in spec.options.items() if k != FOLD_NORMALISERS_OPTION}
    return dataclasses.replace(spec, options=options)


class CrossValidatedTrainer:
    """A `Trainer` whose trainable state is one copy of the inner trainer's state per fold."""

    def __init__(self, inner: Trainer, folds: int, min_validation_rows: int = 0) -> None:
        """Wraps a trainer.

        Args:
            inner: The task's trainer.
            folds: How many folds (>= 2).
            min_validation_rows: A dataset whose validation split holds at least this many rows
                (0: never) scores every fold model on that split instead of on its folds; each
                fold model then trains on the whole training split.
        """
        if folds < 2:
            raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
        if min_validation_rows < 0:
            raise ValueError(f"min_validation_rows must be >= 0, got {min_validation_rows}")
        self.inner = inner
        self.folds = folds
        self.min_validation_rows = min_validation_rows

    @property
    def base_model_sha256(self) -> str:
        return self.inner.base_model_sha256

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        fold_spec(spec, 0, self.folds)  # refuses malformed per-fold normalisers before the pin
        return self.inner.model_sha256(_without_fold_normalisers(spec), dataset)

    def uses_validation_split(self, dataset: RegisteredDataset) -> bool:
        """Whether this dataset scores on its validation split rather than on folds."""
        return 0 < self.min_validation_rows <= len(dataset.validation)

    def views(self, dataset: RegisteredDataset) -> list[RegisteredDataset]:
        """What fold i's model trains on (``train``) and is scored on (``validation``)."""
        if self.uses_validation_split(dataset):
            return [dataset.without_test()] * self.folds
        return [dataset.fold_view(fold, self.folds) for fold in range(self.folds)]

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        inner = self.inner.trainable_state(_without_fold_normalisers(spec), dataset)
        specs = [
            TensorSpec(name=fold_prefix(fold) + t.name, dtype=t.dtype, shape=t.shape)
            for fold in range(self.folds)
            for t in inner
        ]
        return tuple(sorted(specs, key=lambda t: t.name))

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> HopOutcome:
        """Trains every fold model for one hop; the metrics are the cross-validated scores.

        Raises:
            ValueError: As the inner trainer, or if the incoming tensors are not one model per
                fold, or the dataset has fewer training rows than folds.
            HopCancelled: If ``should_cancel`` returned True.
        """
        views = self.views(dataset)
        per_fold = split_folds(incoming, self.folds) if incoming is not None else None
        totals = [hyperparameters.total_steps(len(view.train)) for view in views]
        done = 0

        def fold_progress(step: int, _total: int, loss: float) -> None:
            if progress is not None:
                progress(done + step, sum(totals), loss)

        tensors: dict[str, torch.Tensor] = {}
        fold_metrics: list[dict[str, float]] = []
        started = finished = 0
        adapter_config: dict[str, object] = {}
        for fold, view in enumerate(views):
            outcome = self.inner.run_hop(
                fold_spec(spec, fold, self.folds),
                view,
                hyperparameters,
                None if per_fold is None else per_fold[fold],
                progress=fold_progress,
                should_cancel=should_cancel,
            )
            done += totals[fold]
            tensors.update({fold_prefix(fold) + k: v for k, v in outcome.tensors.items()})
            fold_metrics.append(outcome.metrics)
            started = started or outcome.train_started_at_ns
            finished = outcome.train_finished_at_ns
            adapter_config = outcome.adapter_config
        if "options" in adapter_config:  # the run's options, not the last fold's normaliser
            adapter_config = {**adapter_config, "options": dict(spec.options)}
        metrics = self._combined(dataset, fold_metrics)
        metrics["train_examples"] = float(len(dataset.train))
        return HopOutcome(
            tensors=dict(sorted(tensors.items())),
            adapter_config={**adapter_config, "cross_validation_folds": self.folds},
            metrics=metrics,
            train_started_at_ns=started,
            train_finished_at_ns=finished,
        )

    def evaluate(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        split: Split,
        tensors: Mapping[str, torch.Tensor],
    ) -> dict[str, float]:
        """The cross-validated score: fold i's model on fold i (or on the validation split).

        Returns:
            The inner trainer's metrics combined over folds (example-weighted means; counts
            summed), ``folds`` (1 when the validation split was used) and, per fold,
            ``fold<i>.<metric>``.

        Raises:
            ValueError: For any split but "validation": a cross-validation checkpoint holds fold
                models, which are never scored on test data.
        """
        if split != "validation":
            raise ValueError(
                f"a cross-validation checkpoint is scored on validation only, not on {split!r}: "
                "test splits are for a final run's report"
            )
        views = self.views(dataset)
        per_fold = split_folds(tensors, self.folds)
        fold_metrics = [
            self.inner.evaluate(
                fold_spec(spec, fold, self.folds), view, "validation", per_fold[fold]
            )
            for fold, view in enumerate(views)
        ]
        metrics = self._combined(dataset, fold_metrics)
        for fold, values in enumerate(fold_metrics):
            for key, value in values.items():
                metrics[f"{fold_prefix(fold)}{key}"] = value
        return metrics

    def _combined(
        self, dataset: RegisteredDataset, fold_metrics: Sequence[Mapping[str, float]]
    ) -> dict[str, float]:
        metrics = pool_metrics(fold_metrics)
        if self.uses_validation_split(dataset):
            # Every fold model scored the same rows: a mean over models, not over more rows.
            metrics["folds"] = 1.0
            if "examples" in metrics:
                metrics["examples"] = float(len(dataset.validation))
        else:
            metrics["folds"] = float(self.folds)
        return metrics


def split_folds(tensors: Mapping[str, torch.Tensor], folds: int) -> list[dict[str, torch.Tensor]]:
    """Per-fold state dicts of a cross-validation checkpoint (prefixes removed).

    Raises:
        ValueError: If a tensor belongs to no fold, or the folds do not hold the same names.
    """
    per_fold: list[dict[str, torch.Tensor]] = [{} for _ in range(folds)]
    for name, tensor in tensors.items():
        for fold in range(folds):
            prefix = fold_prefix(fold)
            if name.startswith(prefix):
                per_fold[fold][name[len(prefix) :]] = tensor
                break
        else:
            raise ValueError(f"tensor {name!r} belongs to none of the {folds} folds")
    names = [sorted(state) for state in per_fold]
    if any(n != names[0] for n in names) or not names[0]:
        raise ValueError(f"the checkpoint does not hold the same tensors for each of {folds} folds")
    return per_fold
