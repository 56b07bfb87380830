"""benchmarks/medquad_lora.py: the cached top-layer path equals the full model's forward with
the same adapter, and its trainer runs hops the simulation can chain (a tiny random BERT)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from site_agent.examples import TabularExample
from site_agent.registry import RegisteredDataset
from site_agent.simulation import train_sequential
from site_agent.tasks import HopHyperparameters, TaskSpec

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "medquad_lora.py"
TINY = {
    "vocab_size": 60,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 16,
}
LABELS = ("a", "b", "c")


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("medquad_lora_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _inputs(rows: int = 12, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, TINY["vocab_size"], (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):  # padded rows of different lengths
        mask[row, 4 + row % (length - 4) :] = 0
    return ids * mask, mask


@pytest.mark.parametrize("top_layers", [1, 2])
def test_the_cached_path_equals_the_full_forward_with_the_same_adapter(
    bench: Any, top_layers: int
) -> None:
    model = bench.build_model(None, len(LABELS), top_layers, seed=0, **TINY)
    ids, mask = _inputs()
    result = bench.check_cached_forward(model, top_layers, ids, mask)
    assert result["lora_b_abs_max"] > 0  # the adapter is no longer the identity
    assert result["max_abs_logit_difference"] <= 1e-5
    # The adapter does change the full model's output (so the equality is not vacuous).
    with torch.inference_mode():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask).logits
    assert float((adapted - plain).abs().max()) > 1e-4


def test_only_the_top_layers_lora_and_the_head_train(bench: Any) -> None:
    model = bench.build_model(None, len(LABELS), 1, seed=0, **TINY)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in names if "lora_" in n]
    assert lora and all(".layer.2." in n for n in lora)  # the top one of 3 layers
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora} == {"query", "value"}
    assert any("classifier" in n for n in names)
    assert not any(".layer.0." in n or ".layer.1." in n or "embeddings" in n for n in names)


def _dataset(name: str, rows: range) -> RegisteredDataset:
    examples = tuple(TabularExample(features=(float(i),), label=LABELS[i % 3]) for i in rows)
    return RegisteredDataset(
        name=name,
        task_type="tabular",
        fingerprint=name,
        train=examples,
        validation=(),
        test=examples,
        feature_names=("row",),
        labels=LABELS,
        seed=0,
    )


def test_hops_chain_through_the_simulation_and_learn(bench: Any) -> None:
    model = bench.build_model(None, len(LABELS), 1, seed=0, **TINY)
    ids, mask = _inputs(rows=24)
    cache = bench.HiddenStateCache.build(model, 1, ids, mask)
    trainer = bench.TopLayerLoraTrainer(cache, LABELS)
    spec = TaskSpec("tabular", labels=LABELS)
    sites = [_dataset("one", range(0, 12)), _dataset("two", range(12, 24))]
    before = {s.name: trainer.evaluate(spec, s, "test", trainer.initial)["accuracy"] for s in sites}
    hp = HopHyperparameters(learning_rate=0.05, steps=30, batch_size=8, max_grad_norm=0.0)
    result = train_sequential(trainer, spec, [(s, hp) for s in sites * 3])
    after = {s.name: trainer.evaluate(spec, s, "test", result.tensors)["accuracy"] for s in sites}
    assert set(result.tensors) == set(trainer.initial)
    assert sum(after.values()) > sum(before.values())
    assert all(v.metrics["train_steps"] == 30 for v in result.visits)
    # A hop starts from what comes in: the same incoming tensors give the same outcome.
    again = trainer.run_hop(spec, sites[0], hp, result.tensors).tensors
    once = trainer.run_hop(spec, sites[0], hp, result.tensors).tensors
    assert all(torch.equal(again[k], once[k]) for k in once)
