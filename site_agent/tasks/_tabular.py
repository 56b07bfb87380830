"""``tabular``: logistic regression or a small MLP in plain torch; the whole model travels.

With the defaults (``model=logistic``, per-site normalisation, BCE on one logit) this is
FLamby's Fed-Heart-Disease baseline: ``Linear(13, 1)`` + sigmoid, features z-scored with the
site's own train statistics as ``(x - mean) / (std + 1e-9)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from site_agent.examples import TabularExample
from site_agent.registry import RegisteredDataset
from site_agent.tasks import _device
from site_agent.tasks._loop import proximal_anchors, train
from site_agent.tasks._metrics import classification_metrics
from site_agent.tasks._spec import (
    CancelCheck,
    HopHyperparameters,
    HopOutcome,
    ProgressCallback,
    Split,
    TaskSpec,
    TensorSpec,
    check_task_options,
)
from site_agent.tasks._state import checked_state, outgoing, tensor_specs

logger = logging.getLogger(__name__)

TASK_TYPE = "tabular"
MODELS = ("logistic", "mlp")
NORMALISATIONS = ("per-site", "global", "none")
_OPTIONS = ("model", "hidden", "normalisation", "mean", "std")
_DEFAULT_HIDDEN = (16,)
_STD_EPSILON = 1e-9  # FLamby's: (x - mean) / (std + 1e-9)


class LogisticRegression(torch.nn.Module):
    """One linear layer; its logits go through a sigmoid (binary) or softmax."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_features, n_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.linear(features)
        return logits


class MultilayerPerceptron(torch.nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, n_features: int, hidden: Sequence[int], n_outputs: int) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
            width = size
        layers.append(torch.nn.Linear(width, n_outputs))
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers(features)
        return logits


def architecture(spec: TaskSpec, n_features: int) -> dict[str, object]:
    """The JSON description of a tabular model: what ``HopOutcome.adapter_config`` holds."""
    return {
        "task_type": TASK_TYPE,
        "n_features": n_features,
        "labels": list(spec.labels),
        "options": dict(spec.options),
    }


def architecture_sha256(spec: TaskSpec, n_features: int) -> str:
    """sha256 of the canonical JSON of ``architecture(spec, n_features)``.

    Canonical: ``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True)``,
    so that the coordinator can compute the same pin from a plan without torch.
    """
    canonical = json.dumps(
        architecture(spec, n_features),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class TabularTrainer:
    """Runs hops of a small torch model on a site's numeric features."""

    def __init__(self, *, device: str | None = None, num_threads: int | None = None) -> None:
        """Picks the device.

        Args:
            device: ``"cpu"``, ``"cuda"``...; None picks CUDA when available.
            num_threads: If given, sets torch's intra-op CPU threads (process-wide).
        """
        self._device = _device.resolve_device(device)
        _device.set_num_threads(num_threads)

    @property
    def base_model_sha256(self) -> str:
        """Tabular models have no base model; runs pin ``model_sha256`` instead."""
        return ""

    @property
    def device(self) -> torch.device:
        """The device training runs on."""
        return self._device

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        """What a run pins: the architecture hash (``architecture_sha256``)."""
        self._check_spec(spec)
        return architecture_sha256(spec, _feature_count(dataset))

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        """Every tensor of the model, sorted by name."""
        model = self._model(spec, _feature_count(dataset), seed=0)
        return tensor_specs(model.state_dict())

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> HopOutcome:
        """Trains the model for one hop on the dataset's train split.

        Args:
            spec: The run's task: labels (``spec.labels[1]`` is the positive class of a binary
                task) and options.
            dataset: This site's registered tabular dataset.
            hyperparameters: Optimisation settings; ``seed`` fixes the initial weights (when
                nothing comes in) and the batch order.
            incoming: The previous hop's model tensors, or None for the first hop.
            progress: Called as ``progress(step, total_steps, loss)`` after each optimizer step.
            should_cancel: Checked before each optimizer step.

        Returns:
            The trained tensors, the architecture and validation metrics (none but the train_*
            keys when the dataset has no validation split).

        Raises:
            HopCancelled: If ``should_cancel`` returned True.
            ValueError: If the incoming tensors do not fit or are not finite, the data is empty,
                of another task or has unknown labels, or training diverged.
        """
        n_features = _feature_count(dataset)
        model = self._model(spec, n_features, seed=hyperparameters.seed)
        if incoming is not None:
            _load(model, incoming)
        train_examples = _tabular_examples(dataset, "train", n_features)
        if not train_examples:
            raise ValueError(f"dataset {dataset.name!r} has no training examples")
        validation = _tabular_examples(dataset, "validation", n_features)
        normaliser = self._normaliser(spec, train_examples, n_features)
        features = normaliser(_matrix(train_examples)).to(self._device)
        targets = _targets(train_examples, spec.labels).to(self._device)
        _targets(validation, spec.labels)  # a bad label fails before any training
        binary = len(spec.labels) == 2
        hp = hyperparameters

        with _device.forked_rng(self._device):
            trainable = list(model.parameters())
            logger.info(
                "hop on %s: %d train / %d validation rows, %d features, %d steps, incoming "
                "model: %s",
                dataset.name,
                len(train_examples),
                len(validation),
                n_features,
                hp.total_steps(len(train_examples)),
                "yes" if incoming is not None else "no",
            )

            def batch_loss(index: torch.Tensor) -> torch.Tensor:
                index = index.to(self._device)
                return _loss(model(features[index]), targets[index], binary, "mean")

            model.train()
            run = train(
                trainable=trainable,
                batch_loss=batch_loss,
                num_examples=len(train_examples),
                hyperparameters=hp,
                device=self._device,
                fp16=False,
                anchors=proximal_anchors(trainable, hp, incoming is not None),
                progress=progress,
                should_cancel=should_cancel,
            )
            model.eval()

        tensors = outgoing(model.state_dict())
        metrics: dict[str, float] = {}
        if validation:
            metrics = self._evaluate_model(model, validation, normaliser, spec.labels)
        metrics.update(run.metrics(len(train_examples)))
        return HopOutcome(
            tensors=tensors,
            adapter_config=architecture(spec, n_features),
            metrics=metrics,
            train_started_at_ns=run.started_ns,
            train_finished_at_ns=run.finished_ns,
        )

    def evaluate(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        split: Split,
        tensors: Mapping[str, torch.Tensor],
    ) -> dict[str, float]:
        """Evaluates model tensors on the dataset's validation or test split.

        Features are normalised as in training (per-site: with the train split's statistics).

        Returns:
            ``loss`` (mean BCE or cross-entropy), ``accuracy`` (threshold 0.5 for binary
            tasks), ``macro_f1``, ``examples``, and ``auroc`` for binary tasks.

        Raises:
            ValueError: If the split is empty, has unknown labels, or the tensors do not fit.
        """
        n_features = _feature_count(dataset)
        model = self._model(spec, n_features, seed=0)
        _load(model, tensors)
        examples = _tabular_examples(dataset, split, n_features)
        if not examples:
            raise ValueError(f"dataset {dataset.name!r} has no {split} examples")
        train_examples = _tabular_examples(dataset, "train", n_features)
        normaliser = self._normaliser(spec, train_examples, n_features)
        return self._evaluate_model(model, examples, normaliser, spec.labels)

    def _check_spec(self, spec: TaskSpec) -> None:
        if spec.task_type != TASK_TYPE:
            raise ValueError(f"this trainer runs {TASK_TYPE} tasks, not {spec.task_type!r}")
        check_task_options(spec, _OPTIONS)

    def _model(self, spec: TaskSpec, n_features: int, *, seed: int) -> torch.nn.Module:
        """A freshly initialised model (torch's default init, drawn from ``seed``)."""
        self._check_spec(spec)
        kind = spec.options.get("model", "logistic")
        n_outputs = 1 if len(spec.labels) == 2 else len(spec.labels)
        model: torch.nn.Module
        with _device.forked_rng(self._device):
            torch.manual_seed(seed)
            if kind == "logistic":
                if "hidden" in spec.options:
                    raise ValueError("option 'hidden' only applies to model 'mlp'")
                model = LogisticRegression(n_features, n_outputs)
            elif kind == "mlp":
                model = MultilayerPerceptron(n_features, _hidden(spec), n_outputs)
            else:
                raise ValueError(f"tabular option 'model' must be one of {MODELS}, got {kind!r}")
        return model.to(self._device)

    def _normaliser(
        self, spec: TaskSpec, train_examples: Sequence[TabularExample], n_features: int
    ) -> _Normaliser:
        mode = spec.options.get("normalisation", "per-site")
        if mode not in NORMALISATIONS:
            raise ValueError(
                f"option 'normalisation' must be one of {NORMALISATIONS}, got {mode!r}"
            )
        given = [key for key in ("mean", "std") if key in spec.options]
        if mode != "global" and given:
            raise ValueError(f"options {given} only apply to normalisation 'global'")
        if mode == "none":
            return _Normaliser(None, None)
        if mode == "global":
            mean = _vector_option(spec, "mean", n_features)
            std = _vector_option(spec, "std", n_features)
            if bool((std < 0).any()):
                raise ValueError("option 'std' must hold non-negative values")
            return _Normaliser(mean, std)
        matrix = _matrix(train_examples)
        mean = matrix.mean(dim=0)
        # One row has no spread; FLamby's epsilon then leaves the centred value (0) as is.
        std = matrix.std(dim=0) if len(matrix) > 1 else torch.zeros(n_features)
        return _Normaliser(mean, std)

    def _evaluate_model(
        self,
        model: torch.nn.Module,
        examples: Sequence[TabularExample],
        normaliser: _Normaliser,
        labels: Sequence[str],
    ) -> dict[str, float]:
        features = normaliser(_matrix(examples)).to(self._device)
        targets = _targets(examples, labels).to(self._device)
        binary = len(labels) == 2
        model.eval()
        with torch.inference_mode():
            logits = model(features)
            total_loss = float(_loss(logits, targets, binary, "sum"))
        if binary:
            scores = logits[:, 0].cpu()
            predictions = (torch.sigmoid(scores) > 0.5).long().tolist()
            positive_scores: list[float] | None = scores.tolist()
        else:
            predictions = logits.argmax(dim=-1).cpu().tolist()
            positive_scores = None
        if not math.isfinite(total_loss):
            raise ValueError(f"loss is {total_loss}: the model's outputs are not finite")
        return classification_metrics(
            total_loss=total_loss,
            targets=targets.cpu().tolist(),
            predictions=predictions,
            positive_scores=positive_scores,
            num_labels=len(labels),
        )


class _Normaliser:
    """``(x - mean) / (std + 1e-9)``, or the identity."""

    def __init__(self, mean: torch.Tensor | None, std: torch.Tensor | None) -> None:
        self._mean = mean
        self._std = std

    def __call__(self, matrix: torch.Tensor) -> torch.Tensor:
        if self._mean is None or self._std is None:
            return matrix
        return (matrix - self._mean) / (self._std + _STD_EPSILON)


def _loss(
    logits: torch.Tensor, targets: torch.Tensor, binary: bool, reduction: str
) -> torch.Tensor:
    if binary:
        # Binary cross-entropy on the logit, written as softplus(x) - y * x (stable for any x).
        # torch's binary_cross_entropy_with_logits computes the same, but its CPU kernel costs
        # milliseconds per call on small batches when the cores are shared.
        logit = logits[:, 0]
        losses = F.softplus(logit) - targets.to(logit.dtype) * logit
        return losses.mean() if reduction == "mean" else losses.sum()
    return F.cross_entropy(logits, targets, reduction=reduction)


def _load(model: torch.nn.Module, incoming: Mapping[str, torch.Tensor]) -> None:
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    state = checked_state(incoming, expected)
    model.load_state_dict(state, strict=True)


def _feature_count(dataset: RegisteredDataset) -> int:
    if dataset.feature_names:
        return len(dataset.feature_names)
    for example in (*dataset.train, *dataset.validation, *dataset.test):
        if isinstance(example, TabularExample):
            return len(example.features)
    raise ValueError(f"dataset {dataset.name!r} has no tabular rows")


def _tabular_examples(
    dataset: RegisteredDataset, split: str, n_features: int
) -> tuple[TabularExample, ...]:
    examples = getattr(dataset, split)
    for example in examples:
        if not isinstance(example, TabularExample):
            raise ValueError(
                f"dataset {dataset.name!r} holds {dataset.task_type} examples, not {TASK_TYPE} ones"
            )
        if len(example.features) != n_features:
            raise ValueError(
                f"dataset {dataset.name!r} has a {split} row with {len(example.features)} "
                f"features, expected {n_features}"
            )
    return tuple(examples)


def _matrix(examples: Sequence[TabularExample]) -> torch.Tensor:
    return torch.tensor([example.features for example in examples], dtype=torch.float32)


def _targets(examples: Sequence[TabularExample], labels: Sequence[str]) -> torch.Tensor:
    index = {label: position for position, label in enumerate(labels)}
    unknown = sorted({e.label for e in examples if e.label not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not in the run's label set {list(labels)}")
    return torch.tensor([index[e.label] for e in examples], dtype=torch.long)


def _hidden(spec: TaskSpec) -> tuple[int, ...]:
    hidden = spec.options.get("hidden", list(_DEFAULT_HIDDEN))
    if (
        not isinstance(hidden, list)
        or not hidden
        or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in hidden)
    ):
        raise ValueError(f"option 'hidden' must be a non-empty list of positive ints, got {hidden}")
    return tuple(hidden)


def _vector_option(spec: TaskSpec, key: str, n_features: int) -> torch.Tensor:
    values = spec.options.get(key)
    if (
        not isinstance(values, list)
        or len(values) != n_features
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise ValueError(f"option {key!r} must be a list of {n_features} numbers for normalisation")
    return torch.tensor(values, dtype=torch.float32)
