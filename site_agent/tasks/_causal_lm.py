"""``causal-lm``: LoRA on a causal language model, trained on instruction/response pairs.

The loss covers the response tokens only: instruction and padding positions are labelled -100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, TaskType
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from site_agent.examples import InstructionExample
from site_agent.registry import RegisteredDataset
from site_agent.tasks._device import ComputeDevice
from site_agent.tasks._lora_trainer import Features, LoraTrainer, split_examples
from site_agent.tasks._spec import TaskSpec

TASK_TYPE = "causal-lm"
DEFAULT_MAX_LENGTH = 256
# Every site formats pairs the same way; the response follows the marker directly.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
IGNORE_INDEX = -100
_OPTIONS = ("max_length",)
_EVAL_BATCH_SIZE = 16
_ENCODING_CACHE_ENTRIES = 8
_MAX_LOG_PERPLEXITY = 700.0  # math.exp overflows a float above ~709


class CausalLanguageModelTrainer(LoraTrainer[InstructionExample, None]):
    """Runs hops of LoRA fine-tuning of a causal LM on instruction/response pairs."""

    def __init__(
        self, base_model_dir: Path, *, device: str | None = None, num_threads: int | None = None
    ) -> None:
        """Loads the tokenizer and the model config (see ``LoraTrainer``).

        Raises:
            FileNotFoundError: If the directory does not exist.
            ValueError: If the device is unavailable or the tokenizer has neither a padding nor
                an end-of-sequence token.
        """
        super().__init__(
            base_model_dir, CausalLanguageModelTask, device=device, num_threads=num_threads
        )
        self._eos_id, _ = _special_token_ids(self._tokenizer)  # appended to every response

    def encode(self, examples: Sequence[InstructionExample], max_length: int) -> Features:
        """Token ids, attention mask and labels (-100 outside responses), right-padded."""
        return self._task.encode(examples, max_length)


class CausalLanguageModelTask:
    """The ``LoraTask`` hooks of instruction tuning: next-token loss on the response tokens.

    Targets travel inside the encoding (``labels``), so ``targets`` is None.
    """

    task_type: str = TASK_TYPE
    peft_task_type: TaskType = TaskType.CAUSAL_LM
    options: tuple[str, ...] = _OPTIONS
    default_max_length: int = DEFAULT_MAX_LENGTH
    encoding_cache_entries: int = _ENCODING_CACHE_ENTRIES
    headline_metric: str = "perplexity"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raises ValueError if the tokenizer has neither a padding nor an end-of-sequence token."""
        self._tokenizer = tokenizer
        self._eos_id, self._pad_id = _special_token_ids(tokenizer)

    def examples(self, dataset: RegisteredDataset, split: str) -> tuple[InstructionExample, ...]:
        return split_examples(dataset, split, InstructionExample, TASK_TYPE)

    def texts(self, example: InstructionExample) -> tuple[str, ...]:
        return (example.instruction, example.response)

    def encode(self, examples: Sequence[InstructionExample], max_length: int) -> Features:
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

    def targets(self, spec: TaskSpec, examples: Sequence[InstructionExample]) -> None:
        return None

    def base_model_key(self, spec: TaskSpec) -> int:
        return 0  # one base model whatever the spec

    def load_base_model(self, directory: Path, spec: TaskSpec) -> PreTrainedModel:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32
        )
        return model

    def prepare_base(self, base: PreTrainedModel, seed: int) -> None:
        return None  # LoRA is all this task adds

    def loss(
        self,
        model: PeftModel,
        features: Features,
        targets: None,
        index: torch.Tensor,
        compute: ComputeDevice,
    ) -> torch.Tensor:
        total, tokens = _token_loss(model, features, index, compute)
        return total / tokens

    def evaluate(
        self,
        model: PeftModel,
        spec: TaskSpec,
        features: Features,
        targets: None,
        compute: ComputeDevice,
    ) -> dict[str, float]:
        """``loss`` (mean negative log-likelihood per response token), ``perplexity``
        (``exp(loss)``), ``examples`` and ``tokens`` (response tokens scored).

        Raises:
            ValueError: If the loss is not finite or too large for a perplexity (diverged).
        """
        model.eval()
        examples = len(features["input_ids"])
        total_loss = 0.0
        tokens = 0
        with torch.inference_mode():
            for start in range(0, examples, _EVAL_BATCH_SIZE):
                window = slice(start, start + _EVAL_BATCH_SIZE)
                total, count = _token_loss(model, features, window, compute)
                total_loss += float(total)
                tokens += count
        loss = total_loss / tokens
        if not math.isfinite(loss) or loss > _MAX_LOG_PERPLEXITY:
            raise ValueError(f"training diverged: validation loss is {loss}")
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "examples": float(examples),
            "tokens": float(tokens),
        }


def _special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int]:
    """The end-of-sequence id (None if there is none) and the padding id (else eos)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    eos_id = eos if isinstance(eos, int) else None
    pad_id = pad if isinstance(pad, int) else eos_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a padding nor an end-of-sequence token")
    return eos_id, pad_id


def _token_loss(
    model: PeftModel,
    encoded: Features,
    index: torch.Tensor | slice,
    compute: ComputeDevice,
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the response tokens of a batch, and their count."""
    mask = encoded["attention_mask"][index]
    width = int(mask.sum(dim=1).max())  # trim the padding this batch does not need
    inputs = {"input_ids": encoded["input_ids"][index], "attention_mask": mask}
    logits = compute.logits(model, {k: v[:, :width] for k, v in inputs.items()}, use_cache=False)
    targets = encoded["labels"][index][:, 1:width].to(compute.device)
    total = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, int((targets != IGNORE_INDEX).sum())


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
