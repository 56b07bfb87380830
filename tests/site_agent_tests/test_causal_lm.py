"""The causal-lm task: instruction/response LoRA, loss on response tokens only, perplexity."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from site_agent._tiny_model import TINY_CAUSAL_LM_TARGET_MODULES, write_tiny_causal_lm
from site_agent.examples import InstructionExample
from site_agent.registry import RegisteredDataset
from site_agent.tasks import (
    CausalLanguageModelTrainer,
    HopHyperparameters,
    HopOutcome,
    LoraSettings,
    TaskSpec,
    create_trainer,
)
from site_agent.tasks._causal_lm import IGNORE_INDEX, _fit

SPEC = TaskSpec(
    "causal-lm",
    lora=LoraSettings(r=4, alpha=8, target_modules=TINY_CAUSAL_LM_TARGET_MODULES),
    options={"max_length": 48},
)
HYPERPARAMETERS = HopHyperparameters(learning_rate=1e-2, steps=8, batch_size=8, seed=2)
EVALUATION_KEYS = {"loss", "perplexity", "examples", "tokens"}


@pytest.fixture(scope="module")
def trainer(tiny_causal_lm_dir: Path) -> CausalLanguageModelTrainer:
    created = create_trainer("causal-lm", base_model_dir=tiny_causal_lm_dir, device="cpu")
    assert isinstance(created, CausalLanguageModelTrainer)
    return created


@pytest.fixture(scope="module")
def first_hop(
    trainer: CausalLanguageModelTrainer, instruction_dataset: RegisteredDataset
) -> HopOutcome:
    return trainer.run_hop(SPEC, instruction_dataset, HYPERPARAMETERS, None)


def test_hop_trains_and_reports_loss_and_perplexity(
    first_hop: HopOutcome, instruction_dataset: RegisteredDataset
) -> None:
    metrics = first_hop.metrics

    assert set(metrics) == EVALUATION_KEYS | {"train_loss", "train_steps", "train_examples"}
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["examples"] == len(instruction_dataset.validation)
    assert metrics["train_examples"] == len(instruction_dataset.train)
    assert first_hop.adapter_config["task_type"] == "CAUSAL_LM"
    assert first_hop.adapter_config["base_model_name_or_path"] == ""


def test_training_lowers_the_validation_loss_of_the_base_model(
    trainer: CausalLanguageModelTrainer,
    instruction_dataset: RegisteredDataset,
    first_hop: HopOutcome,
) -> None:
    # LoRA B matrices at zero leave the base model unchanged.
    untouched = {
        spec.name: torch.zeros(spec.shape)
        for spec in trainer.trainable_state(SPEC, instruction_dataset)
    }

    before = trainer.evaluate(SPEC, instruction_dataset, "validation", untouched)

    assert first_hop.metrics["loss"] < before["loss"]
    assert before["tokens"] == first_hop.metrics["tokens"]


def test_trainable_state_lists_the_lora_matrices_the_hop_returns(
    trainer: CausalLanguageModelTrainer,
    instruction_dataset: RegisteredDataset,
    first_hop: HopOutcome,
) -> None:
    declared = trainer.trainable_state(SPEC, instruction_dataset)

    assert [t.name for t in declared] == list(first_hop.tensors)
    assert all(("lora_A" in t.name or "lora_B" in t.name) and t.dtype == "F32" for t in declared)
    assert {tuple(first_hop.tensors[t.name].shape) for t in declared} == {t.shape for t in declared}
    # 2 layers x (q_proj, v_proj) x (A, B)
    assert len(declared) == 8


def test_loss_is_the_mean_over_response_tokens_as_transformers_computes_it(
    tmp_path: Path,
    tiny_causal_lm_dir: Path,
    trainer: CausalLanguageModelTrainer,
    instruction_dataset: RegisteredDataset,
    first_hop: HopOutcome,
) -> None:
    save_file(first_hop.tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(first_hop.adapter_config))
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    examples = [e for e in instruction_dataset.validation if isinstance(e, InstructionExample)]
    encoded = trainer.encode(examples, 48)

    with torch.no_grad():
        loss = model(**encoded).loss  # transformers shifts the labels and skips -100

    assert float(loss) == pytest.approx(first_hop.metrics["loss"], abs=1e-5)


def test_only_response_tokens_carry_labels(trainer: CausalLanguageModelTrainer) -> None:
    examples = [
        InstructionExample("what causes fever ?", "infection"),
        InstructionExample("what causes a very long list of symptoms in the patient ?", "stroke"),
    ]

    encoded = trainer.encode(examples, 48)

    ids, mask, labels = encoded["input_ids"], encoded["attention_mask"], encoded["labels"]
    for row in range(2):
        labelled = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        length = int(mask[row].sum())
        # The response and its end-of-sequence token, nothing before or after.
        assert labelled == list(range(length - 2, length))
        assert labels[row, length - 1] == trainer._eos_id
        assert torch.equal(labels[row, labelled], ids[row, labelled])
    assert int(mask[0].sum()) < ids.shape[1]  # the shorter row is padded


def test_truncation_keeps_part_of_the_response_and_the_end_of_the_prompt() -> None:
    prompt, response = list(range(100)), list(range(1000, 1050))

    ids, prompt_length = _fit(prompt, response, 64)

    assert len(ids) == 64
    assert prompt_length == 32
    assert ids[:32] == prompt[-32:]
    assert ids[32:] == response[:32]
    assert _fit([1, 2], [3], 8) == ([1, 2, 3], 2)
    assert _fit(list(range(10)), list(range(100, 200)), 8)[0][-4:] == [100, 101, 102, 103]


def test_same_seed_reproduces_and_the_next_hop_continues(
    trainer: CausalLanguageModelTrainer,
    instruction_dataset: RegisteredDataset,
    first_hop: HopOutcome,
) -> None:
    again = trainer.run_hop(SPEC, instruction_dataset, HYPERPARAMETERS, None)
    proximal = dataclasses.replace(HYPERPARAMETERS, proximal_mu=0.5)
    continued = trainer.run_hop(SPEC, instruction_dataset, proximal, first_hop.tensors)

    assert all(torch.equal(again.tensors[k], first_hop.tensors[k]) for k in first_hop.tensors)
    assert any(
        not torch.equal(continued.tensors[k], first_hop.tensors[k]) for k in first_hop.tensors
    )
    test = trainer.evaluate(SPEC, instruction_dataset, "test", continued.tensors)
    assert set(test) == EVALUATION_KEYS
    assert test["examples"] == len(instruction_dataset.test)


def test_wrong_data_labels_and_target_modules_are_refused(
    trainer: CausalLanguageModelTrainer,
    instruction_dataset: RegisteredDataset,
    site_datasets: list[RegisteredDataset],
) -> None:
    with pytest.raises(ValueError, match="holds seq-classification examples"):
        trainer.run_hop(SPEC, site_datasets[0], HYPERPARAMETERS, None)
    with pytest.raises(ValueError, match="LoRA settings do not fit the base model"):
        trainer.run_hop(
            dataclasses.replace(SPEC, lora=LoraSettings(target_modules=("query", "value"))),
            instruction_dataset,
            HYPERPARAMETERS,
            None,
        )


def test_tiny_causal_lm_is_deterministic(tmp_path: Path) -> None:
    first = write_tiny_causal_lm(tmp_path / "a", words=["zebra"], seed=1)
    second = write_tiny_causal_lm(tmp_path / "b", words=["zebra"], seed=1)

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
