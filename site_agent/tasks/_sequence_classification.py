"""``seq-classification``: LoRA plus the classification head on a sequence-classification model."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, TaskType, get_peft_model_state_dict
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from site_agent.examples import TextExample
from site_agent.registry import RegisteredDataset
from site_agent.tasks import _device
from site_agent.tasks._loop import proximal_anchors, train
from site_agent.tasks._lora import (
    adapter_config,
    adapter_tensors,
    build_adapter_model,
    hash_base_model,
    max_length_option,
)
from site_agent.tasks._metrics import classification_metrics
from site_agent.tasks._spec import (
    CancelCheck,
    HopHyperparameters,
    HopOutcome,
    LoraSettings,
    ProgressCallback,
    Split,
    TaskSpec,
    TensorSpec,
    check_task_options,
)
from site_agent.tasks._state import tensor_specs

logger = logging.getLogger(__name__)

TASK_TYPE = "seq-classification"
DEFAULT_MAX_LENGTH = 64
_OPTIONS = ("max_length",)
_EVAL_BATCH_SIZE = 64
_ENCODING_CACHE_ENTRIES = 16
_CLASSIFIER_HEAD_NAMES = ("classifier", "score")  # what peft's SEQ_CLS puts in modules_to_save


class SequenceClassificationTrainer:
    """Runs hops of LoRA fine-tuning for text classification on one base model.

    The tokenizer is loaded once; the base model once per number of labels. Every hop and every
    evaluation works on a deep copy of the cached base model, so hops never share state.
    """

    def __init__(
        self, base_model_dir: Path, *, device: str | None = None, num_threads: int | None = None
    ) -> None:
        """Loads the tokenizer and the model config.

        Args:
            base_model_dir: A transformers model directory (config, weights, tokenizer), read
                offline.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when available.
            num_threads: If given, sets torch's intra-op CPU threads (process-wide).

        Raises:
            FileNotFoundError: If the directory does not exist.
            ValueError: If the device is unavailable.
        """
        self._base_model_dir = Path(base_model_dir)
        if not self._base_model_dir.is_dir():
            raise FileNotFoundError(f"base model directory not found: {self._base_model_dir}")
        self._device = _device.resolve_device(device)
        _device.set_num_threads(num_threads)
        self._config: PretrainedConfig = AutoConfig.from_pretrained(
            self._base_model_dir, local_files_only=True
        )
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            self._base_model_dir, local_files_only=True
        )
        self._autocast_dtype = _device.autocast_dtype(self._device)
        self._base_models: dict[int, PreTrainedModel] = {}
        self._encodings: OrderedDict[tuple[str, str, int], dict[str, torch.Tensor]] = OrderedDict()
        self._state_specs: dict[tuple[int, LoraSettings], tuple[TensorSpec, ...]] = {}
        self._base_model_sha256: str | None = None

    @property
    def base_model_sha256(self) -> str:
        """sha256 of the base model's weights files (see ``hash_base_model``), computed once."""
        if self._base_model_sha256 is None:
            self._base_model_sha256 = hash_base_model(self._base_model_dir)
        return self._base_model_sha256

    @property
    def device(self) -> torch.device:
        """The device training runs on."""
        return self._device

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        """What a run pins: the base model's hash."""
        return self.base_model_sha256

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        """The adapter's LoRA matrices and classification head, sorted by name."""
        self._check_spec(spec)
        key = (len(spec.labels), spec.lora)
        if key not in self._state_specs:
            with _device.forked_rng(self._device):
                model = self._adapter_model(len(spec.labels), spec.lora, 0, None)
            self._state_specs[key] = tensor_specs(get_peft_model_state_dict(model))
        return self._state_specs[key]

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> HopOutcome:
        """Trains the adapter for one hop on the dataset's train split.

        Args:
            spec: The run's task; ``spec.labels[i]`` is classifier output ``i``.
            dataset: This site's registered dataset.
            hyperparameters: Optimisation settings; ``seed`` fixes head/LoRA init and batch order.
            incoming: The previous hop's adapter tensors, or None for the first hop.
            progress: Called as ``progress(step, total_steps, loss)`` after each optimizer step.
            should_cancel: Checked before each optimizer step.

        Returns:
            The trained adapter, its PEFT config and validation metrics (none but the train_*
            keys when the dataset has no validation split).

        Raises:
            HopCancelled: If ``should_cancel`` returned True.
            ValueError: If the incoming adapter does not fit the model or is not finite, the
                data is empty, of another task or has unknown labels, or training diverged.
        """
        self._check_spec(spec)
        max_length = max_length_option(spec, DEFAULT_MAX_LENGTH, self._config)
        label_index = {label: i for i, label in enumerate(spec.labels)}
        train_examples = _text_examples(dataset, "train")
        if not train_examples:
            raise ValueError(f"dataset {dataset.name!r} has no training examples")
        validation = _text_examples(dataset, "validation")
        hp = hyperparameters
        features = self._encode(dataset.name, train_examples, max_length)
        targets = _targets(train_examples, label_index)
        # Validation is checked up front so that a bad label fails before any training.
        _targets(validation, label_index)

        with _device.forked_rng(self._device):
            model = self._adapter_model(len(label_index), spec.lora, hp.seed, incoming)
            trainable = [p for p in model.parameters() if p.requires_grad]
            logger.info(
                "hop on %s: %d train / %d validation examples, %d steps, %d trainable "
                "parameters, device %s, incoming adapter: %s",
                dataset.name,
                len(train_examples),
                len(validation),
                hp.total_steps(len(train_examples)),
                sum(p.numel() for p in trainable),
                self._device,
                "yes" if incoming is not None else "no",
            )

            def batch_loss(index: torch.Tensor) -> torch.Tensor:
                batch = {name: values[index].to(self._device) for name, values in features.items()}
                with _device.autocast(self._device, self._autocast_dtype):
                    logits = model(**batch).logits
                return F.cross_entropy(logits.float(), targets[index].to(self._device))

            model.train()
            run = train(
                trainable=trainable,
                batch_loss=batch_loss,
                num_examples=len(train_examples),
                hyperparameters=hp,
                device=self._device,
                fp16=self._autocast_dtype == torch.float16,
                anchors=proximal_anchors(trainable, hp, incoming is not None),
                progress=progress,
                should_cancel=should_cancel,
            )
            model.eval()

        tensors = adapter_tensors(model)
        metrics: dict[str, float] = {}
        if validation:
            metrics = self._evaluate_model(model, dataset.name, validation, label_index, max_length)
            if not math.isfinite(metrics["loss"]):
                raise ValueError(f"training diverged: validation loss is {metrics['loss']}")
        metrics["train_loss"] = run.train_loss
        metrics["train_steps"] = float(run.steps)
        metrics["train_examples"] = float(len(train_examples))
        logger.info(
            "hop on %s finished in %.2f s: train_loss %.4f, validation loss %s",
            dataset.name,
            (run.finished_ns - run.started_ns) / 1e9,
            run.train_loss,
            f"{metrics['loss']:.4f}" if "loss" in metrics else "n/a",
        )
        return HopOutcome(
            tensors=tensors,
            adapter_config=adapter_config(model),
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
        """Evaluates adapter tensors on the dataset's validation or test split.

        Returns:
            ``loss`` (mean cross-entropy), ``accuracy``, ``macro_f1`` (over the labels that occur
            in the targets or predictions), ``examples``, and ``auroc`` for two labels.

        Raises:
            ValueError: If the split is empty, has unknown labels, or the tensors do not fit.
        """
        self._check_spec(spec)
        max_length = max_length_option(spec, DEFAULT_MAX_LENGTH, self._config)
        label_index = {label: i for i, label in enumerate(spec.labels)}
        examples = _text_examples(dataset, split)
        if not examples:
            raise ValueError(f"dataset {dataset.name!r} has no {split} examples")
        _targets(examples, label_index)
        with _device.forked_rng(self._device):
            model = self._adapter_model(len(label_index), spec.lora, 0, tensors)
        return self._evaluate_model(model, dataset.name, examples, label_index, max_length)

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
        examples = _text_examples(dataset, split)
        with _device.forked_rng(self._device):
            model = self._adapter_model(len(spec.labels), spec.lora, 0, tensors)
        features = self._encode(dataset.name, examples, max_length)
        return [int(p) for _, logits in self._batches(model, features) for p in logits.argmax(-1)]

    def adapter_model(
        self, spec: TaskSpec, tensors: Mapping[str, torch.Tensor] | None, *, seed: int = 0
    ) -> PeftModel:
        """A fresh PeftModel on a copy of the base with ``tensors`` loaded (for inspection)."""
        self._check_spec(spec)
        with _device.forked_rng(self._device):
            return self._adapter_model(len(spec.labels), spec.lora, seed, tensors)

    def _check_spec(self, spec: TaskSpec) -> None:
        if spec.task_type != TASK_TYPE:
            raise ValueError(f"this trainer runs {TASK_TYPE} tasks, not {spec.task_type!r}")
        check_task_options(spec, _OPTIONS)

    def _adapter_model(
        self,
        num_labels: int,
        lora: LoraSettings,
        seed: int,
        incoming: Mapping[str, torch.Tensor] | None,
    ) -> PeftModel:
        """A fresh PeftModel on a copy of the base, seeded, with ``incoming`` loaded if given."""
        base = copy.deepcopy(self._base_model(num_labels))
        _reinitialise_classifier(base, seed)
        return build_adapter_model(base, lora, TaskType.SEQ_CLS, seed, incoming, self._device)

    def _base_model(self, num_labels: int) -> PreTrainedModel:
        model = self._base_models.get(num_labels)
        if model is None:
            loaded = AutoModelForSequenceClassification.from_pretrained(
                self._base_model_dir, num_labels=num_labels, local_files_only=True
            )
            # Adapters travel as float32 whatever dtype the checkpoint was stored in.
            model = loaded.float()
            model.requires_grad_(False)
            model.eval()
            self._base_models[num_labels] = model
        return model

    def _evaluate_model(
        self,
        model: PeftModel,
        dataset_name: str,
        examples: Sequence[TextExample],
        label_index: Mapping[str, int],
        max_length: int,
    ) -> dict[str, float]:
        features = self._encode(dataset_name, examples, max_length)
        targets = _targets(examples, label_index)
        total_loss = 0.0
        predictions: list[torch.Tensor] = []
        positive_scores: list[torch.Tensor] = []
        for window, logits in self._batches(model, features):
            batch_targets = targets[window].to(self._device)
            total_loss += float(F.cross_entropy(logits, batch_targets, reduction="sum"))
            predictions.append(logits.argmax(dim=-1).cpu())
            if len(label_index) == 2:
                positive_scores.append((logits[:, 1] - logits[:, 0]).cpu())
        binary = len(label_index) == 2
        return classification_metrics(
            total_loss=total_loss,
            targets=targets.tolist(),
            predictions=torch.cat(predictions).tolist(),
            positive_scores=torch.cat(positive_scores).tolist() if binary else None,
            num_labels=len(label_index),
        )

    def _batches(
        self, model: PeftModel, features: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Float32 logits of the encoded examples, one evaluation batch at a time."""
        model.eval()
        rows = len(next(iter(features.values())))
        with torch.inference_mode():
            for start in range(0, rows, _EVAL_BATCH_SIZE):
                window = slice(start, start + _EVAL_BATCH_SIZE)
                batch = {name: values[window].to(self._device) for name, values in features.items()}
                with _device.autocast(self._device, self._autocast_dtype):
                    logits = model(**batch).logits.float()
                yield window, logits

    def _encode(
        self, dataset_name: str, examples: Sequence[TextExample], max_length: int
    ) -> dict[str, torch.Tensor]:
        """Tokenizes a split once; cached by dataset name, text content and max_length."""
        content = hashlib.sha256()
        for example in examples:
            encoded = example.text.encode("utf-8")
            content.update(len(encoded).to_bytes(8, "big"))
            content.update(encoded)
        key = (dataset_name, content.hexdigest(), max_length)
        cached = self._encodings.get(key)
        if cached is not None:
            self._encodings.move_to_end(key)
            return cached
        encoding = self._tokenizer(
            [example.text for example in examples],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        features = {name: tensor for name, tensor in encoding.items()}
        self._encodings[key] = features
        if len(self._encodings) > _ENCODING_CACHE_ENTRIES:
            self._encodings.popitem(last=False)
        return features


def _text_examples(dataset: RegisteredDataset, split: str) -> tuple[TextExample, ...]:
    examples = getattr(dataset, split)
    if not all(isinstance(example, TextExample) for example in examples):
        raise ValueError(
            f"dataset {dataset.name!r} holds {dataset.task_type} examples, not {TASK_TYPE} ones"
        )
    return tuple(examples)


def _targets(examples: Sequence[TextExample], label_index: Mapping[str, int]) -> torch.Tensor:
    unknown = sorted({e.label for e in examples if e.label not in label_index})
    if unknown:
        raise ValueError(f"labels {unknown} are not in the run's label set {list(label_index)}")
    return torch.tensor([label_index[e.label] for e in examples], dtype=torch.long)


def _reinitialise_classifier(model: PreTrainedModel, seed: int) -> None:
    """Re-draws the classification head from ``seed``.

    transformers initialises a missing head from the global generator at load time, so without
    this a first hop would not be reproducible.
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
                    weight = torch.randn(layer.weight.shape, generator=generator) * std
                    layer.weight.copy_(weight)
                    if layer.bias is not None:
                        layer.bias.zero_()
