"""``seq-classification``: LoRA plus the classification head on a sequence-classification model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, TaskType
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from site_agent.examples import TextExample
from site_agent.registry import RegisteredDataset
from site_agent.tasks._device import ComputeDevice
from site_agent.tasks._lora import max_length_option
from site_agent.tasks._lora_trainer import Features, LoraTrainer, split_examples
from site_agent.tasks._metrics import classification_metrics
from site_agent.tasks._spec import Split, TaskSpec

TASK_TYPE = "seq-classification"
DEFAULT_MAX_LENGTH = 64
_OPTIONS = ("max_length",)
_EVAL_BATCH_SIZE = 64
_ENCODING_CACHE_ENTRIES = 16
# Splits whose targets are kept (a site trains on a few datasets, each with a few splits).
_TARGET_CACHE_ENTRIES = 8
_CLASSIFIER_HEAD_NAMES = ("classifier", "score")  # what peft's SEQ_CLS puts in modules_to_save


class SequenceClassificationTrainer(LoraTrainer[TextExample, torch.Tensor]):
    """Runs hops of LoRA fine-tuning for text classification on one base model.

    The base model is loaded once per number of labels (``LoraTrainer``).
    """

    def __init__(
        self, base_model_dir: Path, *, device: str | None = None, num_threads: int | None = None
    ) -> None:
        """Loads the tokenizer and the model config (see ``LoraTrainer``).

        Raises:
            FileNotFoundError: If the directory does not exist.
            ValueError: If the device is unavailable.
        """
        super().__init__(
            base_model_dir, SequenceClassificationTask, device=device, num_threads=num_threads
        )

    def predict(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        split: Split,
        tensors: Mapping[str, torch.Tensor],
    ) -> list[int]:
        """The predicted label index of every example of a split, in split order.

        For researchers' own analyses of a model (e.g. paired bootstrap intervals over rows);
        never sent anywhere by the site agent, which reports aggregates only.
        """
        self._check_spec(spec)
        max_length = max_length_option(spec, DEFAULT_MAX_LENGTH, self._config)
        examples = self._task.examples(dataset, split)
        model = self.adapter_model(spec, tensors)
        features = self._encode(dataset.name, examples, max_length)
        batches = _batches(model, features, self._compute)
        return [int(p) for _, logits in batches for p in logits.argmax(-1)]


class SequenceClassificationTask:
    """The ``LoraTask`` hooks of text classification: cross-entropy over ``spec.labels``.

    ``spec.labels[i]`` is classifier output ``i``; the head is trained along with LoRA.
    """

    task_type: str = TASK_TYPE
    peft_task_type: TaskType = TaskType.SEQ_CLS
    options: tuple[str, ...] = _OPTIONS
    default_max_length: int = DEFAULT_MAX_LENGTH
    encoding_cache_entries: int = _ENCODING_CACHE_ENTRIES
    headline_metric: str = "loss"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        # Targets of splits seen before, by the split's id: (labels, the split itself, held so
        # that its id is not reused, its targets). A registered dataset's splits are immutable
        # tuples that a site's hops share (`load_registered` serves one parse), so a hop's
        # targets are those of the hop before it on the same data and labels.
        self._targets: dict[int, tuple[tuple[str, ...], Sequence[TextExample], torch.Tensor]] = {}

    def examples(self, dataset: RegisteredDataset, split: str) -> tuple[TextExample, ...]:
        return split_examples(dataset, split, TextExample, TASK_TYPE)

    def texts(self, example: TextExample) -> tuple[str, ...]:
        return (example.text,)

    def encode(self, examples: Sequence[TextExample], max_length: int) -> Features:
        encoding = self._tokenizer(
            [example.text for example in examples],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return {name: tensor for name, tensor in encoding.items()}

    def targets(self, spec: TaskSpec, examples: Sequence[TextExample]) -> torch.Tensor:
        """Label indices; labels outside ``spec.labels`` are refused. Read only: the targets of
        an immutable split (a tuple) are kept for its next hop under the same labels."""
        known = self._targets.get(id(examples))
        if known is not None and known[1] is examples and known[0] == spec.labels:
            return known[2]
        targets = self._label_indices(spec, examples)
        if isinstance(examples, tuple):
            if len(self._targets) >= _TARGET_CACHE_ENTRIES:
                self._targets.clear()  # splits of datasets re-registered or gone
            self._targets[id(examples)] = (spec.labels, examples, targets)
        return targets

    @staticmethod
    def _label_indices(spec: TaskSpec, examples: Sequence[TextExample]) -> torch.Tensor:
        label_index = {label: i for i, label in enumerate(spec.labels)}
        unknown = sorted({e.label for e in examples if e.label not in label_index})
        if unknown:
            raise ValueError(f"labels {unknown} are not in the run's label set {list(label_index)}")
        return torch.tensor([label_index[e.label] for e in examples], dtype=torch.long)

    def base_model_key(self, spec: TaskSpec) -> int:
        return len(spec.labels)

    def load_base_model(self, directory: Path, spec: TaskSpec) -> PreTrainedModel:
        loaded = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=len(spec.labels), local_files_only=True
        )
        model: PreTrainedModel = loaded.float()
        return model

    def prepare_base(self, base: PreTrainedModel, seed: int) -> None:
        _reinitialise_classifier(base, seed)

    def loss(
        self,
        model: PeftModel,
        features: Features,
        targets: torch.Tensor,
        index: torch.Tensor,
        compute: ComputeDevice,
    ) -> torch.Tensor:
        logits = compute.logits(model, {name: values[index] for name, values in features.items()})
        return F.cross_entropy(logits.float(), targets[index].to(compute.device))

    def evaluate(
        self,
        model: PeftModel,
        spec: TaskSpec,
        features: Features,
        targets: torch.Tensor,
        compute: ComputeDevice,
    ) -> dict[str, float]:
        """``loss`` (mean cross-entropy), ``accuracy``, ``macro_f1`` (over the labels that occur
        in the targets or predictions), ``examples``, and ``auroc`` for two labels."""
        binary = len(spec.labels) == 2
        total_loss = 0.0
        predictions: list[torch.Tensor] = []
        positive_scores: list[torch.Tensor] = []
        for window, logits in _batches(model, features, compute):
            batch_targets = targets[window].to(compute.device)
            total_loss += float(F.cross_entropy(logits, batch_targets, reduction="sum"))
            predictions.append(logits.argmax(dim=-1).cpu())
            if binary:
                positive_scores.append((logits[:, 1] - logits[:, 0]).cpu())
        return classification_metrics(
            total_loss=total_loss,
            targets=targets.tolist(),
            predictions=torch.cat(predictions).tolist(),
            positive_scores=torch.cat(positive_scores).tolist() if binary else None,
            num_labels=len(spec.labels),
        )


def _batches(
    model: PeftModel, features: Mapping[str, torch.Tensor], compute: ComputeDevice
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Float32 logits of the encoded examples, one evaluation batch at a time."""
    model.eval()
    rows = len(next(iter(features.values())))
    with torch.inference_mode():
        for start in range(0, rows, _EVAL_BATCH_SIZE):
            window = slice(start, start + _EVAL_BATCH_SIZE)
            batch = {name: values[window] for name, values in features.items()}
            yield window, compute.logits(model, batch).float()


def _reinitialise_classifier(model: PreTrainedModel, seed: int) -> None:
    """Re-draws the classification head from ``seed``.

    transformers initialises a missing head from the global generator at load time, so without
    this a first hop would not be reproducible. The head gets new tensors: the ones it had are
    the cached base's, which its copies share (``private_copy``) and nothing writes into.
    """
    heads = [
        module
        for name in _CLASSIFIER_HEAD_NAMES
        if isinstance(module := getattr(model, name, None), torch.nn.Module)
    ]
    if not heads:
        raise ValueError(
            f"{type(model).__name__} has no classification head named "
            f"{' or '.join(_CLASSIFIER_HEAD_NAMES)}"
        )
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for head in heads:
            for layer in head.modules():
                if isinstance(layer, torch.nn.Linear):
                    old = layer.weight
                    weight = torch.randn(old.shape, generator=generator) * std
                    layer.weight = torch.nn.Parameter(
                        weight.to(dtype=old.dtype, device=old.device),
                        requires_grad=old.requires_grad,
                    )
                    if layer.bias is not None:
                        layer.bias = torch.nn.Parameter(
                            torch.zeros_like(layer.bias), requires_grad=layer.bias.requires_grad
                        )
