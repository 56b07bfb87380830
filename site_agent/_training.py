"""Trains and evaluates one hop of a sequence-classification LoRA adapter (torch, peft)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from site_agent._data import TextDataset, TextExample

logger = logging.getLogger(__name__)

_HASH_BLOCK_BYTES = 1 << 20
_EVAL_BATCH_SIZE = 64
_TRAIN_LOSS_WINDOW = 10
_ENCODING_CACHE_ENTRIES = 16
_CLASSIFIER_HEAD_NAMES = ("classifier", "score")  # what peft's SEQ_CLS puts in modules_to_save
_KEYS_SHOWN_IN_ERRORS = 20


@dataclass(frozen=True)
class LoraSettings:
    """Shape of the LoRA adapter; every site in a run must use the same settings."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(self.target_modules):
            raise ValueError("LoRA target_modules must name at least one module")


@dataclass(frozen=True)
class HopHyperparameters:
    """Optimisation settings for one hop.

    The learning rate warms up linearly over ``warmup_steps`` optimizer steps, then decays
    linearly so that it would reach 0 at step ``steps``.
    """

    learning_rate: float = 5e-4
    steps: int = 20
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not math.isfinite(self.max_grad_norm):
            raise ValueError(f"max_grad_norm must be finite, got {self.max_grad_norm}")


@dataclass(frozen=True)
class HopOutcome:
    """What one hop produces: the adapter to pass on, and how it did."""

    tensors: dict[str, torch.Tensor]  # get_peft_model_state_dict(...) on CPU, contiguous, float32
    adapter_config: dict[str, object]  # JSON-able peft config usable by PeftModel.from_pretrained
    metrics: dict[str, float]  # evaluate() on validation + train_loss, train_steps, train_examples
    train_started_at_ns: int  # time.time_ns() right before the first optimizer step
    train_finished_at_ns: int  # time.time_ns() right after the last optimizer step


class _LoadResult(Protocol):
    """What ``set_peft_model_state_dict`` returns (torch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class HopCancelled(Exception):
    """The hop was cancelled between optimizer steps (``should_cancel`` returned True)."""


def hash_base_model(directory: Path) -> str:
    """Hashes a base model's weights so sites can prove they train on the same model.

    A single ``model.safetensors`` hashes to the plain sha256 of its bytes (what ``sha256sum``
    prints). Otherwise every ``*.safetensors`` file, or failing that every ``pytorch_model*.bin``
    file, is hashed in name order, each as its name, size and bytes.

    Args:
        directory: The base model directory.

    Returns:
        The lowercase hex sha256 digest.

    Raises:
        FileNotFoundError: If the directory holds no weights file.
    """
    directory = Path(directory)
    single = directory / "model.safetensors"
    if single.is_file():
        digest = hashlib.sha256()
        _update_from_file(digest, single)
        return digest.hexdigest()

    files = sorted(directory.glob("*.safetensors"), key=lambda p: p.name) or sorted(
        directory.glob("pytorch_model*.bin"), key=lambda p: p.name
    )
    if not files:
        raise FileNotFoundError(
            f"no weights files (*.safetensors or pytorch_model*.bin) in {directory}"
        )
    digest = hashlib.sha256()
    for path in files:
        name = path.name.encode("utf-8")
        # Length-prefixed fields, so that no two file sets produce the same byte stream.
        digest.update(len(name).to_bytes(8, "big"))
        digest.update(name)
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        _update_from_file(digest, path)
    return digest.hexdigest()


class SequenceClassificationTrainer:
    """Runs hops of LoRA fine-tuning for text classification on one base model.

    The tokenizer is loaded once; the base model once per number of labels. Every hop and every
    evaluation works on a deep copy of the cached base model, so hops never share state.
    """

    def __init__(
        self,
        base_model_dir: Path,
        *,
        device: str | None = None,
        num_threads: int | None = None,
        max_length: int = 64,
    ) -> None:
        """Loads the tokenizer and checks the base model directory.

        Args:
            base_model_dir: A transformers model directory (config, weights, tokenizer), read
                offline.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when available.
            num_threads: If given, sets torch's intra-op CPU threads (process-wide).
            max_length: Tokens per example; longer texts are truncated, shorter ones padded.

        Raises:
            FileNotFoundError: If the directory does not exist.
            ValueError: If the device is unavailable or ``max_length`` is out of range.
        """
        self._base_model_dir = Path(base_model_dir)
        if not self._base_model_dir.is_dir():
            raise FileNotFoundError(f"base model directory not found: {self._base_model_dir}")
        self._device = _resolve_device(device)
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)

        config = AutoConfig.from_pretrained(self._base_model_dir, local_files_only=True)
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_length < 2 or (isinstance(max_positions, int) and max_length > max_positions):
            raise ValueError(
                f"max_length must be in [2, {max_positions}] for this model, got {max_length}"
            )
        self._max_length = max_length
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            self._base_model_dir, local_files_only=True
        )
        self._autocast_dtype = _autocast_dtype(self._device)
        self._base_models: dict[int, PreTrainedModel] = {}
        self._encodings: OrderedDict[tuple[str, str, int], dict[str, torch.Tensor]] = OrderedDict()
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

    def run_hop(
        self,
        dataset: TextDataset,
        labels: Sequence[str],
        lora: LoraSettings,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: Callable[[int, int, float], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> HopOutcome:
        """Trains the adapter for one hop on this site's data.

        Args:
            dataset: This site's train and validation examples.
            labels: The run's label set; label ``i`` is classifier output ``i``.
            lora: Adapter shape.
            hyperparameters: Optimisation settings; ``seed`` fixes head/LoRA init and batch order.
            incoming: The previous hop's adapter tensors, or None for the first hop.
            progress: Called as ``progress(step, total_steps, loss)`` after each optimizer step.
            should_cancel: Checked before each optimizer step.

        Returns:
            The trained adapter, its config and validation metrics.

        Raises:
            HopCancelled: If ``should_cancel`` returned True.
            ValueError: If the incoming adapter does not fit the model or is not finite, the
                data is empty or has unknown labels, or training diverged.
        """
        label_index = _label_index(labels)
        if not dataset.train:
            raise ValueError(f"dataset {dataset.name!r} has no training examples")
        if not dataset.validation:
            raise ValueError(f"dataset {dataset.name!r} has no validation examples")
        hp = hyperparameters
        features = self._encode(dataset.name, dataset.train)
        targets = _targets(dataset.train, label_index)
        # Validation is encoded up front so that a bad label fails before any training.
        self._encode(dataset.name, dataset.validation)
        _targets(dataset.validation, label_index)

        with self._forked_rng():
            model = self._adapter_model(len(label_index), lora, hp.seed, incoming)
            trainable = [p for p in model.parameters() if p.requires_grad]
            logger.info(
                "hop on %s: %d train / %d validation examples, %d steps, %d trainable "
                "parameters, device %s, incoming adapter: %s",
                dataset.name,
                len(dataset.train),
                len(dataset.validation),
                hp.steps,
                sum(p.numel() for p in trainable),
                self._device,
                "yes" if incoming is not None else "no",
            )
            recent_losses, started_ns, finished_ns = self._train(
                model, trainable, features, targets, hp, progress, should_cancel
            )

        tensors = _adapter_tensors(model)
        non_finite = sorted(key for key, tensor in tensors.items() if not _is_finite(tensor))
        if non_finite:
            raise ValueError(
                f"training diverged: trained adapter has non-finite values in "
                f"{_preview(non_finite)}"
            )
        metrics = self._evaluate_model(model, dataset.name, dataset.validation, label_index)
        if not math.isfinite(metrics["loss"]):
            raise ValueError(f"training diverged: validation loss is {metrics['loss']}")
        metrics["train_loss"] = sum(recent_losses) / len(recent_losses)
        metrics["train_steps"] = float(hp.steps)
        metrics["train_examples"] = float(len(dataset.train))
        logger.info(
            "hop on %s finished in %.2f s: train_loss %.4f, validation loss %.4f, "
            "accuracy %.4f, macro_f1 %.4f",
            dataset.name,
            (finished_ns - started_ns) / 1e9,
            metrics["train_loss"],
            metrics["loss"],
            metrics["accuracy"],
            metrics["macro_f1"],
        )
        return HopOutcome(
            tensors=tensors,
            adapter_config=_adapter_config(model),
            metrics=metrics,
            train_started_at_ns=started_ns,
            train_finished_at_ns=finished_ns,
        )

    def evaluate(
        self,
        dataset_split: Sequence[TextExample],
        labels: Sequence[str],
        lora: LoraSettings,
        tensors: Mapping[str, torch.Tensor],
    ) -> dict[str, float]:
        """Evaluates adapter tensors on examples.

        Args:
            dataset_split: The examples; must not be empty.
            labels: The run's label set, in classifier output order.
            lora: The adapter shape the tensors were trained with.
            tensors: Adapter tensors as in ``HopOutcome.tensors``.

        Returns:
            ``loss`` (mean cross-entropy), ``accuracy``, ``macro_f1`` (over the labels that occur
            in the targets or predictions) and ``examples``.

        Raises:
            ValueError: If the split is empty, has unknown labels, or the tensors do not fit.
        """
        label_index = _label_index(labels)
        if not dataset_split:
            raise ValueError("cannot evaluate on an empty split")
        _targets(dataset_split, label_index)
        with self._forked_rng():
            model = self._adapter_model(len(label_index), lora, 0, tensors)
        return self._evaluate_model(model, "evaluate", dataset_split, label_index)

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
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
        )
        torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
        model = get_peft_model(base, config)
        if incoming is not None:
            _load_adapter(model, incoming)
        return model.to(self._device)

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

    def _train(
        self,
        model: PeftModel,
        trainable: list[torch.nn.Parameter],
        features: dict[str, torch.Tensor],
        targets: torch.Tensor,
        hp: HopHyperparameters,
        progress: Callable[[int, int, float], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> tuple[deque[float], int, int]:
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        scaler = (
            torch.amp.GradScaler(self._device.type)
            if self._autocast_dtype == torch.float16
            else None
        )
        batches = _batches(len(targets), hp.batch_size, hp.seed)
        recent_losses: deque[float] = deque(maxlen=_TRAIN_LOSS_WINDOW)
        model.train()
        started_ns = time.time_ns()
        for step in range(hp.steps):
            if should_cancel is not None and should_cancel():
                raise HopCancelled(f"hop cancelled after {step} of {hp.steps} steps")
            learning_rate = hp.learning_rate * _learning_rate_factor(
                step, hp.steps, hp.warmup_steps
            )
            for group in optimizer.param_groups:
                group["lr"] = learning_rate

            index = next(batches)
            batch = {name: values[index].to(self._device) for name, values in features.items()}
            batch_targets = targets[index].to(self._device)
            with self._autocast():
                logits = model(**batch).logits
            loss = F.cross_entropy(logits.float(), batch_targets)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise ValueError(
                    f"training diverged: loss is {loss_value} at step {step + 1} of {hp.steps}"
                )

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                torch.autograd.backward(scaler.scale(loss))
                if hp.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
                # The scaler skips steps with inf/nan gradients and lowers its scale.
                scaler.step(optimizer)
                scaler.update()
            else:
                torch.autograd.backward(loss)
                if hp.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
                    if not math.isfinite(float(norm)):
                        raise ValueError(
                            f"training diverged: gradient norm is {float(norm)} at step "
                            f"{step + 1} of {hp.steps}"
                        )
                optimizer.step()

            recent_losses.append(loss_value)
            if progress is not None:
                progress(step + 1, hp.steps, loss_value)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        finished_ns = time.time_ns()
        model.eval()
        return recent_losses, started_ns, finished_ns

    def _evaluate_model(
        self,
        model: PeftModel,
        dataset_name: str,
        examples: Sequence[TextExample],
        label_index: Mapping[str, int],
    ) -> dict[str, float]:
        features = self._encode(dataset_name, examples)
        targets = _targets(examples, label_index)
        model.eval()
        total_loss = 0.0
        predictions: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(targets), _EVAL_BATCH_SIZE):
                window = slice(start, start + _EVAL_BATCH_SIZE)
                batch = {name: values[window].to(self._device) for name, values in features.items()}
                with self._autocast():
                    logits = model(**batch).logits.float()
                batch_targets = targets[window].to(self._device)
                total_loss += float(F.cross_entropy(logits, batch_targets, reduction="sum"))
                predictions.append(logits.argmax(dim=-1).cpu())
        predicted = torch.cat(predictions)
        return {
            "loss": total_loss / len(targets),
            "accuracy": float((predicted == targets).float().mean()),
            "macro_f1": _macro_f1(targets.tolist(), predicted.tolist(), len(label_index)),
            "examples": float(len(targets)),
        }

    def _encode(
        self, dataset_name: str, examples: Sequence[TextExample]
    ) -> dict[str, torch.Tensor]:
        """Tokenizes a split once; cached by dataset name, text content and max_length."""
        content = hashlib.sha256()
        for example in examples:
            encoded = example.text.encode("utf-8")
            content.update(len(encoded).to_bytes(8, "big"))
            content.update(encoded)
        key = (dataset_name, content.hexdigest(), self._max_length)
        cached = self._encodings.get(key)
        if cached is not None:
            self._encodings.move_to_end(key)
            return cached
        encoding = self._tokenizer(
            [example.text for example in examples],
            padding="max_length",
            truncation=True,
            max_length=self._max_length,
            return_tensors="pt",
        )
        features = {name: tensor for name, tensor in encoding.items()}
        self._encodings[key] = features
        if len(self._encodings) > _ENCODING_CACHE_ENTRIES:
            self._encodings.popitem(last=False)
        return features

    def _autocast(self) -> AbstractContextManager[object]:
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=self._autocast_dtype)

    def _forked_rng(self) -> AbstractContextManager[object]:
        """Seeding inside a hop must not change the caller's global RNG streams."""
        if self._device.type == "cuda":
            index = self._device.index
            devices = [index if index is not None else torch.cuda.current_device()]
            return torch.random.fork_rng(devices=devices, device_type="cuda")
        return torch.random.fork_rng(devices=[])


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _label_index(labels: Sequence[str]) -> dict[str, int]:
    if isinstance(labels, str):
        raise ValueError("labels must be a sequence of label names, not one string")
    index = {label: position for position, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError(f"labels must be unique, got {list(labels)}")
    if len(index) < 2 or not all(isinstance(label, str) and label for label in index):
        raise ValueError(f"need at least two non-empty label names, got {list(labels)}")
    return index


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


def _load_adapter(model: PeftModel, incoming: Mapping[str, torch.Tensor]) -> None:
    """Loads adapter tensors, refusing anything that does not fit exactly."""
    expected = get_peft_model_state_dict(model)
    unexpected = sorted(set(incoming) - set(expected))
    missing = sorted(set(expected) - set(incoming))
    if unexpected or missing:
        raise ValueError(
            f"incoming adapter does not fit this model: unexpected keys {_preview(unexpected)}, "
            f"missing keys {_preview(missing)}"
        )
    state: dict[str, torch.Tensor] = {}
    non_finite: list[str] = []
    for key in sorted(incoming):
        tensor = incoming[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"incoming adapter value {key!r} is not a floating-point tensor")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"incoming adapter tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
        if not _is_finite(tensor):
            non_finite.append(key)
        state[key] = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if non_finite:
        raise ValueError(f"incoming adapter has non-finite values in {_preview(non_finite)}")

    result = cast("_LoadResult", set_peft_model_state_dict(model, state))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    not_loaded = sorted(set(result.missing_keys) & trainable)
    if result.unexpected_keys or not_loaded:
        raise ValueError(
            f"peft did not load the incoming adapter cleanly: unexpected keys "
            f"{_preview(sorted(result.unexpected_keys))}, adapter parameters not loaded "
            f"{_preview(not_loaded)}"
        )
    # Read the adapter back: proof that every tensor landed where it belongs.
    loaded = get_peft_model_state_dict(model)
    differing = sorted(key for key in state if not torch.equal(loaded[key].cpu(), state[key]))
    if differing:
        raise ValueError(f"incoming adapter tensors did not load: {_preview(differing)}")


def _adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    # clone: the outcome must not alias the parameters of a model that may still be used.
    return {
        key: tensor.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()
        for key, tensor in get_peft_model_state_dict(model).items()
    }


def _adapter_config(model: PeftModel) -> dict[str, object]:
    raw = model.peft_config["default"].to_dict()
    config = {str(key): _jsonable(value) for key, value in raw.items()}
    # Sites may keep the base model at different paths; the base is pinned by its hash instead.
    config["base_model_name_or_path"] = ""
    json.dumps(config)  # fail here, not at upload time, if something is still not JSON
    return config


def _jsonable(value: object) -> object:
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(item) for item in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"adapter config value of type {type(value).__name__} is not JSON-serialisable")


def _batches(count: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of indices: a fresh seeded permutation per epoch; the last may be short."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            yield order[start : start + batch_size]


def _learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier for 0-based optimizer step ``step``: linear warmup, then linear decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (total_steps - step) / (total_steps - warmup_steps)


def _macro_f1(targets: Sequence[int], predictions: Sequence[int], num_labels: int) -> float:
    """Mean F1 over the labels that occur in the targets or the predictions."""
    scores: list[float] = []
    for label in range(num_labels):
        true_positive = sum(1 for t, p in zip(targets, predictions, strict=True) if t == p == label)
        false_positive = sum(
            1 for t, p in zip(targets, predictions, strict=True) if p == label and t != label
        )
        false_negative = sum(
            1 for t, p in zip(targets, predictions, strict=True) if t == label and p != label
        )
        denominator = 2 * true_positive + false_positive + false_negative
        if denominator:
            scores.append(2 * true_positive / denominator)
    return sum(scores) / len(scores) if scores else 0.0


def _is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _preview(keys: Sequence[str]) -> str:
    if len(keys) <= _KEYS_SHOWN_IN_ERRORS:
        return str(list(keys))
    shown = list(keys[:_KEYS_SHOWN_IN_ERRORS])
    return f"{shown} and {len(keys) - _KEYS_SHOWN_IN_ERRORS} more"


def _update_from_file(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as stream:
        while block := stream.read(_HASH_BLOCK_BYTES):
            digest.update(block)
