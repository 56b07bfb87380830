"""The one LoRA trainer: base model, adapter, device and hop loop, with a task plugged in.

A ``LoraTask`` says what its examples are, how they are encoded, which base model class to load
and how a batch is scored; ``LoraTrainer`` does everything else the same way for every task.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import torch
from peft import PeftModel, TaskType, get_peft_model_state_dict
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from site_agent.base_model import hash_base_model
from site_agent.registry import RegisteredDataset
from site_agent.tasks._adamw import AdamW
from site_agent.tasks._device import ComputeDevice, set_num_threads
from site_agent.tasks._loop import idle_optimizer, proximal_anchors, train
from site_agent.tasks._lora import (
    adapter_config,
    adapter_slots,
    adapter_tensors,
    build_adapter_model,
    load_adapter,
    load_adapter_in_place,
    max_length_option,
    private_copy,
)
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
from site_agent.tasks._state import (
    FlatTensors,
    flat_parameters,
    load_flat,
    outgoing,
    tensor_specs,
)

logger = logging.getLogger(__name__)

ExampleT = TypeVar("ExampleT")
TargetsT = TypeVar("TargetsT")
Features = dict[str, torch.Tensor]


class LoraTask(Protocol[ExampleT, TargetsT]):
    """What a task type adds to ``LoraTrainer``; built once per trainer from its tokenizer.

    ``TargetsT`` is what a task keeps apart from the (cached, label-free) encoding: label
    indices for classification, nothing (``None``) when the encoding carries its own labels.
    """

    task_type: str
    peft_task_type: TaskType
    options: tuple[str, ...]
    default_max_length: int
    encoding_cache_entries: int
    headline_metric: str  # the validation metric the end-of-hop log line shows

    def examples(self, dataset: RegisteredDataset, split: str) -> tuple[ExampleT, ...]:
        """A split's examples, refused if the dataset holds another task's examples."""
        ...

    def texts(self, example: ExampleT) -> tuple[str, ...]:
        """The text an example's encoding depends on (the encoding cache key)."""
        ...

    def encode(self, examples: Sequence[ExampleT], max_length: int) -> Features:
        """Model inputs for the examples, one row each."""
        ...

    def targets(self, spec: TaskSpec, examples: Sequence[ExampleT]) -> TargetsT:
        """What the loss compares to, refused (ValueError) if it does not fit the run."""
        ...

    def base_model_key(self, spec: TaskSpec) -> int:
        """Which cached base model a spec needs (e.g. its number of labels)."""
        ...

    def load_base_model(self, directory: Path, spec: TaskSpec) -> PreTrainedModel:
        """Loads the base model offline, in float32: adapters travel as float32 whatever dtype
        the checkpoint was stored in."""
        ...

    def prepare_base(self, base: PreTrainedModel, seed: int) -> None:
        """Seeds what the task adds to a private copy of the base before LoRA wraps it."""
        ...

    def loss(
        self,
        model: PeftModel,
        features: Features,
        targets: TargetsT,
        index: torch.Tensor,
        compute: ComputeDevice,
    ) -> torch.Tensor:
        """The float32 mean training loss of the examples at ``index``."""
        ...

    def evaluate(
        self,
        model: PeftModel,
        spec: TaskSpec,
        features: Features,
        targets: TargetsT,
        compute: ComputeDevice,
    ) -> dict[str, float]:
        """The task's metrics (at least ``loss``) of an evaluation-mode model on the examples."""
        ...


@dataclass
class _PreparedHop:
    """A hop's freshly seeded adapter model, built before its input arrived.

    ``rng_state`` is the generator state right after the build: a hop that starts from it
    draws exactly what it would have drawn had it built the model itself.
    """

    key: tuple[int, LoraSettings]
    seed: int
    model: PeftModel
    rng_state: torch.Tensor
    cuda_rng_state: torch.Tensor | None
    # Where each incoming adapter tensor goes (found while preparing, off the handoff).
    slots: dict[str, torch.nn.Parameter] | None
    # The PEFT config the hand back carries (the same for every hop with this key).
    adapter_config: dict[str, object]
    # The hop's AdamW over the model's trainable parameters, idle (settings come with the hop).
    optimizer: AdamW
    # Those parameters in the model's order: the hop's start does not walk the module tree
    # (~130 modules, 6 ms under load) to find them again.
    trainable: list[torch.nn.Parameter]
    # The slots' values in one buffer (each slot a view of it), in the order a bundle lays
    # them out: the input loaded, the output copied out, in one operation each. None: per slot.
    flat: FlatTensors | None = None


class LoraTrainer(Generic[ExampleT, TargetsT]):
    """Runs hops of LoRA fine-tuning of one base model for one task type.

    The tokenizer is loaded once, the base model once per ``base_model_key``; every hop and
    every evaluation works on a copy of the cached base model (``private_copy``: its own
    modules over the base's frozen, never written weights), so hops never share state.
    ``prepare`` makes that copy (and the encodings) ahead of a hop, while another site trains;
    the hop then loads its incoming adapter into the prepared model in place.
    """

    def __init__(
        self,
        base_model_dir: Path,
        task: Callable[[PreTrainedTokenizerBase], LoraTask[ExampleT, TargetsT]],
        *,
        device: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        """Loads the tokenizer and the model config, and builds the task from the tokenizer.

        Args:
            base_model_dir: A transformers model directory (config, weights, tokenizer), read
                offline.
            task: Builds the task hooks from the base model's tokenizer.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when available.
            num_threads: If given, sets torch's intra-op CPU threads (process-wide).

        Raises:
            FileNotFoundError: If the directory does not exist.
            ValueError: If the device is unavailable or the task refuses the tokenizer.
        """
        self._base_model_dir = Path(base_model_dir)
        if not self._base_model_dir.is_dir():
            raise FileNotFoundError(f"base model directory not found: {self._base_model_dir}")
        self._compute = ComputeDevice.resolve(device)
        set_num_threads(num_threads)
        self._config: PretrainedConfig = AutoConfig.from_pretrained(
            self._base_model_dir, local_files_only=True
        )
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            self._base_model_dir, local_files_only=True
        )
        self._task = task(self._tokenizer)
        self._base_models: dict[int, PreTrainedModel] = {}
        self._encodings: OrderedDict[tuple[str, str, int], Features] = OrderedDict()
        # The text digest of each split tuple seen (kept alive here, so its id stays its own).
        self._digests: dict[int, tuple[tuple[ExampleT, ...], str]] = {}
        self._state_specs: dict[tuple[int, LoraSettings], tuple[TensorSpec, ...]] = {}
        self._base_model_sha256: str | None = None
        self._prepared: _PreparedHop | None = None
        # prepare() runs on a background thread while the agent may run a task.
        self._lock = threading.RLock()

    @property
    def base_model_sha256(self) -> str:
        """sha256 of the base model's weights files (see ``hash_base_model``), computed once."""
        if self._base_model_sha256 is None:
            self._base_model_sha256 = hash_base_model(self._base_model_dir)
        return self._base_model_sha256

    @property
    def device(self) -> torch.device:
        """The device training runs on."""
        return self._compute.device

    def load_base_model(self, spec: TaskSpec) -> None:
        """Loads (once) the base model a spec needs, ahead of the hops that will use it.

        Raises:
            ValueError: If the spec is not this trainer's.
        """
        self._check_spec(spec)
        with self._lock:
            self._base_model(spec)

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        """What a run pins: the base model's hash."""
        return self.base_model_sha256

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        """The adapter's tensors (LoRA matrices and any task head), sorted by name."""
        self._check_spec(spec)
        key = (self._task.base_model_key(spec), spec.lora)
        if key not in self._state_specs:
            model = self.adapter_model(spec, None)
            self._state_specs[key] = tensor_specs(get_peft_model_state_dict(model))
        return self._state_specs[key]

    def prepare(self, spec: TaskSpec, dataset: RegisteredDataset, seed: int) -> None:
        """Gets a hop with this spec and seed ready: base model loaded, data encoded, a seeded
        adapter model built. The hop itself then only loads its incoming tensors.

        Raises:
            ValueError: If the spec or the data does not fit (the hop would refuse them too).
        """
        task = self._task
        with self._lock:
            self._check_spec(spec)
            max_length = max_length_option(spec, task.default_max_length, self._config)
            for split in ("train", "validation"):
                examples = task.examples(dataset, split)
                task.targets(spec, examples)
                if examples:
                    self._encode(dataset.name, examples, max_length)
            key = (task.base_model_key(spec), spec.lora)
            prepared = self._prepared
            if prepared is not None and prepared.key == key and prepared.seed == seed:
                return
            self._prepared = None  # one prepared model at a time: drop the old one first
            with self._compute.forked_rng():
                model = self._adapter_model(spec, seed, None)
                cuda_state = (
                    torch.cuda.get_rng_state(self._compute.device)
                    if self._compute.device.type == "cuda"
                    else None
                )
                rng_state = torch.get_rng_state()
            # Its optimizer built too: the hop's start only loads its input.
            slots, flat, trainable = self._ready_to_train(key, model)
            optimizer = idle_optimizer(trainable)
            self._prepared = _PreparedHop(key, seed, model, rng_state, cuda_state, slots,
                                          adapter_config(model), optimizer, trainable,
                                          flat)  # fmt: skip
            logger.info("prepared a hop on %s (seed %d)", dataset.name, seed)

    def _ready_to_train(
        self, key: tuple[int, LoraSettings], model: PeftModel
    ) -> tuple[dict[str, torch.nn.Parameter] | None, FlatTensors | None, list[torch.nn.Parameter]]:
        """A freshly built adapter model set up for training (prepared or not): what its egress
        check declares noted from it (the hand back then builds no second model, a base copy,
        to find it), training mode, its adapter slots laid in one buffer; returns the slots,
        that buffer and the trainable parameters."""
        if key not in self._state_specs:
            self._state_specs[key] = tensor_specs(get_peft_model_state_dict(model))
        model.train()
        slots = adapter_slots(model)
        flat = flat_parameters(slots) if slots is not None else None
        return slots, flat, [p for p in model.parameters() if p.requires_grad]

    def _take_prepared(
        self, spec: TaskSpec, seed: int, incoming: Mapping[str, torch.Tensor] | None
    ) -> _PreparedHop | None:
        """The prepared hop for this hop with ``incoming`` loaded in place into its model (in
        training mode), its RNG state restored; None if nothing fits (the hop builds its own).
        The caller forks the RNG."""
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return None
        if prepared.key != (self._task.base_model_key(spec), spec.lora) or prepared.seed != seed:
            return None
        if incoming is not None:
            if prepared.flat is not None and load_flat(prepared.flat, incoming):
                pass  # loaded in one copy
            elif prepared.slots is not None:
                load_adapter_in_place(prepared.slots, incoming)
            else:
                load_adapter(prepared.model, incoming)
        torch.set_rng_state(prepared.rng_state)
        if prepared.cuda_rng_state is not None:
            torch.cuda.set_rng_state(prepared.cuda_rng_state, self._compute.device)
        return prepared

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        *,
        defer_validation: bool = False,
    ) -> HopOutcome:
        """Trains the adapter for one hop on the dataset's train split.

        Args:
            spec: The run's task (labels, LoRA settings, ``max_length`` option).
            dataset: This site's registered dataset.
            hyperparameters: Optimisation settings; ``seed`` fixes the adapter's initial
                weights and the batch order.
            incoming: The previous hop's adapter tensors, or None for the first hop.
            progress: Called as ``progress(step, total_steps, loss)`` after each optimizer step.
            should_cancel: Checked before each optimizer step.
            defer_validation: Leave the validation pass to the outcome's ``validate`` (the
                site runs it after handing the adapter back).

        Returns:
            The trained adapter, its PEFT config and validation metrics (none but the train_*
            keys when the dataset has no validation split or validation is deferred).

        Raises:
            HopCancelled: If ``should_cancel`` returned True.
            ValueError: If the incoming adapter does not fit the model or is not finite, the
                data is empty, of another task or has unknown labels, or training diverged.
        """
        with self._lock:
            return self._run_hop(
                spec, dataset, hyperparameters, incoming, progress, should_cancel, defer_validation
            )

    def _run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        defer_validation: bool,
    ) -> HopOutcome:
        task, compute, hp = self._task, self._compute, hyperparameters
        self._check_spec(spec)
        max_length = max_length_option(spec, task.default_max_length, self._config)
        train_examples = task.examples(dataset, "train")
        if not train_examples:
            raise ValueError(f"dataset {dataset.name!r} has no training examples")
        validation = task.examples(dataset, "validation")
        features = self._encode(dataset.name, train_examples, max_length)
        targets = task.targets(spec, train_examples)
        # Validation is checked up front so that a bad label fails before any training.
        validation_targets = task.targets(spec, validation)

        with compute.forked_rng():
            prepared = self._take_prepared(spec, hp.seed, incoming)
            optimizer = None
            flat = None
            if prepared is not None:
                model, slots, config = prepared.model, prepared.slots, prepared.adapter_config
                optimizer, trainable, flat = prepared.optimizer, prepared.trainable, prepared.flat
            else:
                # Nothing prepared (a run's first hop): set up here as `prepare` does.
                model = self._adapter_model(spec, hp.seed, incoming)
                config = adapter_config(model)
                slots, flat, trainable = self._ready_to_train(
                    (task.base_model_key(spec), spec.lora), model
                )
            logger.info(
                "hop on %s: %d train / %d validation examples, %d steps, %d trainable "
                "parameters, device %s, incoming adapter: %s",
                dataset.name,
                len(train_examples),
                len(validation),
                hp.total_steps(len(train_examples)),
                sum(p.numel() for p in trainable),
                compute.device,
                "yes" if incoming is not None else "no",
            )

            def batch_loss(index: torch.Tensor) -> torch.Tensor:
                return task.loss(model, features, targets, index, compute)

            run = train(
                trainable=trainable,
                batch_loss=batch_loss,
                num_examples=len(train_examples),
                hyperparameters=hp,
                device=compute.device,
                fp16=compute.fp16,
                anchors=proximal_anchors(trainable, hp, incoming is not None),
                progress=progress,
                should_cancel=should_cancel,
                optimizer=optimizer,
            )

        # The prepared model's slots hold the adapter (in one buffer): no state-dict walk, one
        # copy on the handoff.
        state = flat if flat is not None else slots
        tensors = outgoing(state) if state is not None else adapter_tensors(model)
        metrics: dict[str, float] = {}

        def validate() -> dict[str, float]:
            with self._lock:
                # Evaluation mode here, not after the last step: the hand back (validation
                # deferred) does not wait for the module walk.
                model.eval()
                features = self._encode(dataset.name, validation, max_length)
                scores = task.evaluate(model, spec, features, validation_targets, compute)
            if not math.isfinite(scores["loss"]):
                raise ValueError(f"training diverged: validation loss is {scores['loss']}")
            return scores

        deferred = bool(validation) and defer_validation
        if validation and not deferred:
            metrics = validate()
        metrics.update(run.metrics(len(train_examples)))
        seconds = (run.finished_ns - run.started_ns) / 1e9
        if deferred:
            logger.info(
                "hop on %s finished in %.2f s: train_loss %.4f (validation follows)",
                dataset.name,
                seconds,
                run.train_loss,
            )
        else:
            headline = task.headline_metric
            logger.info(
                "hop on %s finished in %.2f s: train_loss %.4f, validation %s %s",
                dataset.name,
                seconds,
                run.train_loss,
                headline,
                f"{metrics[headline]:.4f}" if headline in metrics else "n/a",
            )
        return HopOutcome(
            tensors=tensors,
            adapter_config=config,
            metrics=metrics,
            train_started_at_ns=run.started_ns,
            train_finished_at_ns=run.finished_ns,
            validate=validate if deferred else None,
            leftovers=(run.last_step,),
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
            The task's metrics: at least ``loss`` and ``examples``.

        Raises:
            ValueError: If the split is empty, does not fit the run (e.g. unknown labels), or
                the tensors do not fit.
        """
        with self._lock:
            return self._evaluate(spec, dataset, split, tensors)

    def _evaluate(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        split: Split,
        tensors: Mapping[str, torch.Tensor],
    ) -> dict[str, float]:
        self._check_spec(spec)
        max_length = max_length_option(spec, self._task.default_max_length, self._config)
        examples = self._task.examples(dataset, split)
        if not examples:
            raise ValueError(f"dataset {dataset.name!r} has no {split} examples")
        targets = self._task.targets(spec, examples)
        model = self.adapter_model(spec, tensors)
        features = self._encode(dataset.name, examples, max_length)
        return self._task.evaluate(model, spec, features, targets, self._compute)

    def adapter_model(
        self, spec: TaskSpec, tensors: Mapping[str, torch.Tensor] | None, *, seed: int = 0
    ) -> PeftModel:
        """A fresh PeftModel on a copy of the base with ``tensors`` loaded (for inspection)."""
        self._check_spec(spec)
        with self._compute.forked_rng():
            return self._adapter_model(spec, seed, tensors)

    def _check_spec(self, spec: TaskSpec) -> None:
        task_type = self._task.task_type
        if spec.task_type != task_type:
            raise ValueError(f"this trainer runs {task_type} tasks, not {spec.task_type!r}")
        check_task_options(spec, self._task.options)

    def _adapter_model(
        self, spec: TaskSpec, seed: int, incoming: Mapping[str, torch.Tensor] | None
    ) -> PeftModel:
        """A fresh PeftModel on a copy of the base, seeded, with ``incoming`` loaded if given.

        The caller forks the RNG around this call.
        """
        base = private_copy(self._base_model(spec))
        self._task.prepare_base(base, seed)
        return build_adapter_model(
            base, spec.lora, self._task.peft_task_type, seed, incoming, self._compute.device
        )

    def _base_model(self, spec: TaskSpec) -> PreTrainedModel:
        key = self._task.base_model_key(spec)
        model = self._base_models.get(key)
        if model is None:
            try:
                model = self._task.load_base_model(self._base_model_dir, spec)
            except Exception as exc:  # any library's error about a broken model folder
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise ValueError(
                    f"cannot load the base model from {self._base_model_dir}: {reason}"
                ) from exc
            model.requires_grad_(False)
            torch.nn.Module.eval(model)
            self._base_models[key] = model
        return model

    def _encode(self, dataset_name: str, examples: Sequence[ExampleT], max_length: int) -> Features:
        """Encodes a split once; cached by dataset name, text content and max_length."""
        key = (dataset_name, self._text_digest(examples), max_length)
        cached = self._encodings.get(key)
        if cached is not None:
            self._encodings.move_to_end(key)
            return cached
        features = self._task.encode(examples, max_length)
        self._encodings[key] = features
        if len(self._encodings) > self._task.encoding_cache_entries:
            self._encodings.popitem(last=False)
        return features

    def _text_digest(self, examples: Sequence[ExampleT]) -> str:
        """The sha256 of a split's texts; hashed once per split tuple.

        A site's dataset is parsed once per registration and source bytes (the registry's
        cache), so each hop hands over the same tuple of frozen examples: its texts cannot have
        changed, and hashing them again (1-3 ms for the demo's notes) sat on the next site's
        start, between its task and its first step. Any other sequence is hashed every time.
        """
        if isinstance(examples, tuple):
            seen = self._digests.get(id(examples))
            if seen is not None and seen[0] is examples:
                return seen[1]
        content = hashlib.sha256()
        for example in examples:
            for text in self._task.texts(example):
                encoded = text.encode("utf-8")
                content.update(len(encoded).to_bytes(8, "big"))
                content.update(encoded)
        digest = content.hexdigest()
        if isinstance(examples, tuple):
            if len(self._digests) >= 4 * self._task.encoding_cache_entries:
                self._digests.clear()  # splits of datasets re-registered or gone
            self._digests[id(examples)] = (examples, digest)
        return digest


def split_examples(
    dataset: RegisteredDataset, split: str, kind: type[ExampleT], task_type: str
) -> tuple[ExampleT, ...]:
    """A split's examples, refused if the dataset holds another task's examples."""
    examples = getattr(dataset, split)
    if not all(isinstance(example, kind) for example in examples):
        raise ValueError(
            f"dataset {dataset.name!r} holds {dataset.task_type} examples, not {task_type} ones"
        )
    return tuple(examples)
