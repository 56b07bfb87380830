"""``causal-lm``: LoRA on a causal language model, trained on instruction/response pairs.

The loss covers the response tokens only: instruction and padding positions are labelled -100.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, TaskType, get_peft_model_state_dict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from site_agent.examples import InstructionExample
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

TASK_TYPE = "causal-lm"
DEFAULT_MAX_LENGTH = 256
# Every site formats pairs the same way; the response follows the marker directly.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
IGNORE_INDEX = -100
_OPTIONS = ("max_length",)
_EVAL_BATCH_SIZE = 16
_ENCODING_CACHE_ENTRIES = 8
_MAX_LOG_PERPLEXITY = 700.0  # math.exp overflows a float above ~709


class CausalLanguageModelTrainer:
    """Runs hops of LoRA fine-tuning of a causal LM on instruction/response pairs.

    The tokenizer and base model are loaded once; every hop and evaluation works on a deep copy.
    """

    def __init__(
        self, base_model_dir: Path, *, device: str | None = None, num_threads: int | None = None
    ) -> None:
        """Loads the tokenizer and the model config.

        Args:
            base_model_dir: A transformers causal-LM directory (config, weights, tokenizer), read
                offline.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when available.
            num_threads: If given, sets torch's intra-op CPU threads (process-wide).

        Raises:
            FileNotFoundError: If the directory does not exist.
            ValueError: If the device is unavailable or the tokenizer has neither a padding nor
                an end-of-sequence token.
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
        eos = self._tokenizer.eos_token_id
        pad = self._tokenizer.pad_token_id
        self._eos_id: int | None = eos if isinstance(eos, int) else None
        pad_id = pad if isinstance(pad, int) else self._eos_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a padding nor an end-of-sequence token")
        self._pad_id: int = pad_id
        self._autocast_dtype = _device.autocast_dtype(self._device)
        self._base: PreTrainedModel | None = None
        self._encodings: OrderedDict[tuple[str, str, int], dict[str, torch.Tensor]] = OrderedDict()
        self._state_specs: dict[LoraSettings, tuple[TensorSpec, ...]] = {}
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
        """The adapter's LoRA matrices, sorted by name."""
        self._check_spec(spec)
        if spec.lora not in self._state_specs:
            with _device.forked_rng(self._device):
                model = self._adapter_model(spec.lora, 0, None)
            self._state_specs[spec.lora] = tensor_specs(get_peft_model_state_dict(model))
        return self._state_specs[spec.lora]

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
            spec: The run's task (LoRA settings, ``max_length`` option).
            dataset: This site's registered instruction/response dataset.
            hyperparameters: Optimisation settings; ``seed`` fixes LoRA init and batch order.
            incoming: The previous hop's adapter tensors, or None for the first hop.
            progress: Called as ``progress(step, total_steps, loss)`` after each optimizer step.
            should_cancel: Checked before each optimizer step.

        Returns:
            The trained adapter, its PEFT config and validation metrics (none but the train_*
            keys when the dataset has no validation split).

        Raises:
            HopCancelled: If ``should_cancel`` returned True.
            ValueError: If the incoming adapter does not fit or is not finite, the data is
                empty or of another task, or training diverged.
        """
        self._check_spec(spec)
        max_length = max_length_option(spec, DEFAULT_MAX_LENGTH, self._config)
        train_examples = _instruction_examples(dataset, "train")
        if not train_examples:
            raise ValueError(f"dataset {dataset.name!r} has no training examples")
        validation = _instruction_examples(dataset, "validation")
        hp = hyperparameters
        encoded = self._encode(dataset.name, train_examples, max_length)

        with _device.forked_rng(self._device):
            model = self._adapter_model(spec.lora, hp.seed, incoming)
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
                total, tokens = self._token_loss(model, encoded, index)
                return total / tokens

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
            metrics = self._evaluate_model(model, dataset.name, validation, max_length)
        metrics["train_loss"] = run.train_loss
        metrics["train_steps"] = float(run.steps)
        metrics["train_examples"] = float(len(train_examples))
        logger.info(
            "hop on %s finished in %.2f s: train_loss %.4f, validation perplexity %s",
            dataset.name,
            (run.finished_ns - run.started_ns) / 1e9,
            run.train_loss,
            f"{metrics['perplexity']:.3f}" if "perplexity" in metrics else "n/a",
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
            ``loss`` (mean negative log-likelihood per response token), ``perplexity``
            (``exp(loss)``), ``examples`` and ``tokens`` (response tokens scored).

        Raises:
            ValueError: If the split is empty or the tensors do not fit.
        """
        self._check_spec(spec)
        max_length = max_length_option(spec, DEFAULT_MAX_LENGTH, self._config)
        examples = _instruction_examples(dataset, split)
        if not examples:
            raise ValueError(f"dataset {dataset.name!r} has no {split} examples")
        with _device.forked_rng(self._device):
            model = self._adapter_model(spec.lora, 0, tensors)
        return self._evaluate_model(model, dataset.name, examples, max_length)

    def encode(
        self, examples: Sequence[InstructionExample], max_length: int
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and labels (-100 outside responses), right-padded."""
        prompts = [PROMPT_TEMPLATE.format(instruction=e.instruction) for e in examples]
        prompt_ids = self._tokenizer(prompts, add_special_tokens=True)["input_ids"]
        response_ids = self._tokenizer([e.response for e in examples], add_special_tokens=False)[
            "input_ids"
        ]
        eos = [self._eos_id] if self._eos_id is not None else []
        rows = [
            _fit(list(prompt), [*response, *eos], max_length)
            for prompt, response in zip(prompt_ids, response_ids, strict=True)
        ]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            labels[row, prompt_length : len(ids)] = input_ids[row, prompt_length : len(ids)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _check_spec(self, spec: TaskSpec) -> None:
        if spec.task_type != TASK_TYPE:
            raise ValueError(f"this trainer runs {TASK_TYPE} tasks, not {spec.task_type!r}")
        check_task_options(spec, _OPTIONS)

    def _adapter_model(
        self, lora: LoraSettings, seed: int, incoming: Mapping[str, torch.Tensor] | None
    ) -> PeftModel:
        base = copy.deepcopy(self._base_model())
        return build_adapter_model(base, lora, TaskType.CAUSAL_LM, seed, incoming, self._device)

    def _base_model(self) -> PreTrainedModel:
        if self._base is None:
            # Adapters travel as float32 whatever dtype the checkpoint was stored in.
            model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
                self._base_model_dir, local_files_only=True, dtype=torch.float32
            )
            model.requires_grad_(False)
            torch.nn.Module.eval(model)
            self._base = model
        return self._base

    def _token_loss(
        self, model: PeftModel, encoded: Mapping[str, torch.Tensor], index: torch.Tensor | slice
    ) -> tuple[torch.Tensor, int]:
        """Summed next-token loss over the response tokens of a batch, and their count."""
        mask = encoded["attention_mask"][index]
        width = int(mask.sum(dim=1).max())  # trim the padding this batch does not need
        input_ids = encoded["input_ids"][index][:, :width].to(self._device)
        labels = encoded["labels"][index][:, :width].to(self._device)
        with _device.autocast(self._device, self._autocast_dtype):
            logits = model(
                input_ids=input_ids,
                attention_mask=mask[:, :width].to(self._device),
                use_cache=False,
            ).logits
        targets = labels[:, 1:]
        total = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total, int((targets != IGNORE_INDEX).sum())

    def _evaluate_model(
        self,
        model: PeftModel,
        dataset_name: str,
        examples: Sequence[InstructionExample],
        max_length: int,
    ) -> dict[str, float]:
        encoded = self._encode(dataset_name, examples, max_length)
        model.eval()
        total_loss = 0.0
        tokens = 0
        with torch.inference_mode():
            for start in range(0, len(examples), _EVAL_BATCH_SIZE):
                total, count = self._token_loss(
                    model, encoded, slice(start, start + _EVAL_BATCH_SIZE)
                )
                total_loss += float(total)
                tokens += count
        loss = total_loss / tokens
        if not math.isfinite(loss) or loss > _MAX_LOG_PERPLEXITY:
            raise ValueError(f"training diverged: validation loss is {loss}")
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "examples": float(len(examples)),
            "tokens": float(tokens),
        }

    def _encode(
        self, dataset_name: str, examples: Sequence[InstructionExample], max_length: int
    ) -> dict[str, torch.Tensor]:
        """``encode`` with a cache keyed by dataset name, content and max_length."""
        content = hashlib.sha256()
        for example in examples:
            for text in (example.instruction, example.response):
                encoded = text.encode("utf-8")
                content.update(len(encoded).to_bytes(8, "big"))
                content.update(encoded)
        key = (dataset_name, content.hexdigest(), max_length)
        cached = self._encodings.get(key)
        if cached is not None:
            self._encodings.move_to_end(key)
            return cached
        features = self.encode(examples, max_length)
        self._encodings[key] = features
        if len(self._encodings) > _ENCODING_CACHE_ENTRIES:
            self._encodings.popitem(last=False)
        return features


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], int]:
    """Joins prompt and response within ``max_length`` tokens; returns the ids and prompt length.

    When too long, the response keeps up to half the window (more if the prompt is short) and
    the prompt keeps its end, next to the response marker. The response always keeps a token.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt + response, len(prompt)
    keep_prompt = min(len(prompt), max(max_length - len(response), max_length // 2))
    kept_prompt = prompt[len(prompt) - keep_prompt :]
    return kept_prompt + response[: max_length - keep_prompt], keep_prompt


def _instruction_examples(dataset: RegisteredDataset, split: str) -> tuple[InstructionExample, ...]:
    examples = getattr(dataset, split)
    if not all(isinstance(example, InstructionExample) for example in examples):
        raise ValueError(
            f"dataset {dataset.name!r} holds {dataset.task_type} examples, not {TASK_TYPE} ones"
        )
    return tuple(examples)
