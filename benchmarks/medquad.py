"""MedQuAD: does the searched site order beat random order? (BENCHMARKS.md §1, last paragraph)

Six NIH sources of MedQuAD are six hospitals, each a real `baton-site` process holding its own
source (question -> question type, seq-classification), with all-MiniLM-L6-v2 plus a LoRA adapter
(r=8 on query, value). The sources cover different question types, so a sequential model forgets
the types only early sites teach: the order matters. Per seed, side by side in one run:

* searched: an Optuna study (every trial a real run; order, learning rate and visit length),
  scored by the sites' validation accuracy only; its best plan runs once more and every site
  scores it on its test split;
* random search at equal budget: the same number of trials with a random sampler over the same
  space, its best plan run and tested the same way;
* random orders: the searched plan's hyperparameters with uniformly random site orders (equal
  training budget), tested the same way.

Reported: mean test accuracy over the six sites (mean ± std over seeds), per-site accuracy, and
paired bootstrap intervals over test rows (per-row predictions recomputed here from the exported
final adapters; they match what the sites reported).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/medquad.py            # about 45 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/medquad.py --quick    # smoke run
    BATON_MEDQUAD_DIR=/path/to/medquad ...                             # data elsewhere

Writes benchmarks/results/medquad.{json,md} and medquad.png.

Not a paired, equal-tuning comparison: the random orders reuse the searched plan's
hyperparameters and the bootstrap resamples test rows only (issue 17). For that comparison (five
resampled splits, every comparator tuned with the same budget and CV objective, label skew) see
``benchmarks/medquad_paired.py``; this script remains the end-to-end run of MiniLM + LoRA through
real site processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import safetensors.torch
import torch
from _harness import (
    mean_site_accuracy,
    paired_bootstrap,
    report_head,
    site_test_accuracy,
    wait_for_completed_run,
)

from coordinator.console.admin import AdminClient
from coordinator.console.demo import packaged_minilm, prepare_pki
from coordinator.console.processes import Cluster
from coordinator.console.study import (
    RunExecutor,
    RunTemplate,
    approval_bounds,
    attach_run_template,
    heuristic_seed_orders,
    run_search,
)
from ordering import CandidatePlan, FloatRange, IntRange, OrderingStudy, SearchSpace
from protocols.transport import TlsFiles
from site_agent.registry import RegisteredDataset, load_registered, register_dataset
from site_agent.tasks import LoraSettings as SiteLora
from site_agent.tasks import (
    SequenceClassificationTrainer,
    TaskSpec,
    create_trainer,
    hash_base_model,
)

logger = logging.getLogger("benchmarks.medquad")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad"
# Six sources of a few hundred to a few thousand questions with overlapping, unequal type sets.
SOURCES = ("GARD", "NIDDK", "NINDS", "SeniorHealth", "CancerGov", "NHLBI")
DATASET = "medquad"
SEEDS = (0, 1, 2)
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]}
OPTIONS = {"max_length": 32}  # questions are short; 32 tokens hold nearly all of them
BATCH = 16
RANDOM_ORDERS = 3
BOOTSTRAP_RESAMPLES = 2000


def _site(source: str) -> str:
    return source.lower()


def _register(data: Path, work: Path) -> dict[str, Path]:
    dirs = {}
    for source in SOURCES:
        directory = work / "sites" / _site(source)
        register_dataset(
            directory, DATASET, data / "medquad.jsonl.gz", task_type="seq-classification",
            fmt="medquad", validation_fraction=0.1, test_fraction=0.2, seed=0,
            options={"source": source, "dedupe": "true"},
        )  # fmt: skip
        dirs[_site(source)] = directory
    return dirs


def _space(seed: int) -> SearchSpace:
    return SearchSpace(
        sites=tuple(_site(s) for s in SOURCES),
        cycles=1,
        learning_rate=FloatRange(1e-3, 2e-2, log=True),
        steps=IntRange(8, 24),
        batch_size=BATCH,
        seed=seed,
    )


def _final_run(
    admin: AdminClient, template: RunTemplate, plan: CandidatePlan, name: str, state_dir: Path
) -> dict[str, Any]:
    """Runs a plan, has every site score its final adapter on test (once), keeps the tensors."""
    run_id = admin.start_run(template.run_plan(plan, name=name))
    wait_for_completed_run(admin, run_id, 3600.0)
    scores = site_test_accuracy(admin, run_id, 900)
    path = state_dir / "runs" / run_id / "final_adapter" / "adapter_model.safetensors"
    return {
        "run": run_id,
        "plan": plan.describe(),
        "site_test_accuracy": scores,
        "tensors": safetensors.torch.load_file(str(path)),
    }


def _row_correct(
    trainer: SequenceClassificationTrainer,
    spec: TaskSpec,
    tensors: Mapping[str, torch.Tensor],
    datasets: Sequence[RegisteredDataset],
) -> dict[str, list[int]]:
    """1/0 per test row and site, from the trainer's own predictions."""
    correct: dict[str, list[int]] = {}
    for dataset in datasets:
        predicted = trainer.predict(spec, dataset, "test", tensors)
        targets = [spec.labels.index(getattr(row, "label", "")) for row in dataset.test]
        correct[dataset.name] = [int(p == t) for p, t in zip(predicted, targets, strict=True)]
    return correct


def _random_orders(plan: CandidatePlan, count: int, seed: int) -> list[CandidatePlan]:
    """The plan's hops (hyperparameters by position) with uniformly random site orders."""
    rng = np.random.default_rng(1000 + seed)
    plans: list[CandidatePlan] = []
    while len(plans) < count:
        order = tuple(plan.order[int(i)] for i in rng.permutation(len(plan.order)))
        if order == plan.order:
            continue
        hops = tuple(
            type(hop)(site, hop.hyperparameters) for site, hop in zip(order, plan.hops, strict=True)
        )
        plans.append(dataclasses.replace(plan, hops=hops, order=order, cycle_orders=(order,),
                                          encoding="random-order"))  # fmt: skip
    return plans


def _search(
    admin: AdminClient,
    template: RunTemplate,
    storage: str,
    seed: int,
    trials: int,
    sampler: str,
    sizes: Mapping[str, int],
) -> tuple[CandidatePlan, list[dict[str, Any]], float]:
    space = _space(seed)
    name = f"{sampler}-{seed}"
    if sampler == "random":
        study = OrderingStudy.create(storage, name, space, "auto", "mean", "maximize", seed=seed,
                                     sampler="random", pruning=None)  # fmt: skip
    else:
        study = OrderingStudy.create(storage, name, space, "auto", "mean", "maximize", seed=seed)
    attach_run_template(study, template)
    if sampler == "tpe":
        study.enqueue(*heuristic_seed_orders(sizes, space.sites), note="seed: training-set sizes")
    executor = RunExecutor(admin, template, run_name=name, poll_seconds=0.1, run_timeout=3600)
    started = time.perf_counter()
    records = run_search(study, executor, trials)
    seconds = time.perf_counter() - started
    history = [
        {"number": r.number, "state": r.state, "validation_accuracy": r.value,
         "plan": r.plan.describe() if r.plan else None, "compute_seconds": r.compute_seconds}
        for r in records
    ]  # fmt: skip
    return study.best_plan(), history, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_MEDQUAD_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 trials, 1 random order")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="medquad")
    args = parser.parse_args(argv)
    random_orders = RANDOM_ORDERS
    if args.quick:
        args.seeds, args.trials, random_orders = args.seeds[:1], 3, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(2)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="baton-medquad-"))
    site_dirs = _register(args.data, work)
    sites = tuple(site_dirs)
    datasets = [dataclasses.replace(load_registered(site_dirs[s], DATASET), name=s) for s in sites]
    labels = tuple(sorted({label for d in datasets for label in d.labels}))
    model = packaged_minilm()
    trainer = create_trainer("seq-classification", base_model_dir=model, device="cpu")
    assert isinstance(trainer, SequenceClassificationTrainer)
    spec = TaskSpec("seq-classification", labels=labels, lora=SiteLora(**LORA), options=OPTIONS)  # type: ignore[arg-type]
    template = RunTemplate(dataset=DATASET, labels=labels, task="seq-classification",
                           metric="accuracy", lora=LORA, options=OPTIONS,
                           base_model_sha256=hash_base_model(model),
                           bounds=approval_bounds(_space(0)),
                           failure={"on_failure": "abort"})  # fmt: skip
    bundle = template.approval_bundle(_space(0).plan(sites))
    pki = work / "pki"
    prepare_pki(pki, list(sites))
    state_dir = work / "coordinator"
    storage = f"sqlite:///{work / 'studies.sqlite3'}"
    sizes = {d.name: len(d.train) for d in datasets}
    report: dict[str, Any] = {
        **report_head(argv, f"torch {torch.__version__}"),
        "seeds": args.seeds,
        "trials": args.trials,
        "sites": {
            d.name: {
                "train": len(d.train),
                "validation": len(d.validation),
                "test": len(d.test),
                "labels": len(d.labels),
            }
            for d in datasets
        },
        "labels": list(labels),
        "approval_bundle": bundle.sha256,
        "per_seed": [],
    }
    rows: dict[str, list[dict[str, list[int]]]] = {}
    cluster = Cluster(log_dir=work / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=state_dir, pki_dir=pki,
                                         port_file=work / "port")  # fmt: skip
        for site in sites:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki,
                               data_dir=site_dirs[site], base_model_dir=model, threads=2,
                               approve=[bundle.sha256])  # fmt: skip
        tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        with AdminClient(f"localhost:{port}", tls) as admin:
            admin.wait_for_sites(set(sites), timeout=300)
            for seed in args.seeds:
                entry: dict[str, Any] = {"seed": seed}
                finals: dict[str, list[dict[str, Any]]] = {}
                for sampler in ("tpe", "random"):
                    logger.info("seed %d: %s search, %d trials", seed, sampler, args.trials)
                    best, history, seconds = _search(
                        admin, template, storage, seed, args.trials, sampler, sizes
                    )
                    entry[f"{sampler}_search"] = {"trials": history, "seconds": seconds,
                                                  "best_plan": best.describe()}  # fmt: skip
                    finals[sampler] = [_final_run(admin, template, best, f"{sampler}-{seed}-final",
                                                  state_dir)]  # fmt: skip
                    if sampler == "tpe":
                        searched_plan = best
                finals["random-order"] = [
                    _final_run(admin, template, plan, f"random-order-{seed}-{i}", state_dir)
                    for i, plan in enumerate(_random_orders(searched_plan, random_orders, seed))
                ]
                for method, runs in finals.items():
                    for run in runs:
                        correct = _row_correct(trainer, spec, run.pop("tensors"), datasets)
                        recomputed = {s: statistics.fmean(c) for s, c in correct.items()}
                        run["reported_equals_recomputed"] = all(
                            abs(recomputed[s] - run["site_test_accuracy"][s]) < 1e-9 for s in sites
                        )
                        run["mean_test_accuracy"] = mean_site_accuracy(correct)
                        rows.setdefault(method, []).append(correct)
                        rows.setdefault(f"{method}@seed{seed}", []).append(correct)
                entry["finals"] = finals
                report["per_seed"].append(entry)
                # Written after every seed: a long run that is stopped keeps what it measured.
                done = [e["seed"] for e in report["per_seed"]]
                _write(report, rows, done, random_orders, started, args.out, args.name)
                logger.info("seed %d: %s", seed, {m: [r["mean_test_accuracy"] for r in v]
                                                  for m, v in finals.items()})  # fmt: skip
    _write(report, rows, args.seeds, random_orders, started, args.out, args.name)
    return 0


def _write(
    report: dict[str, Any],
    rows: Mapping[str, list[dict[str, list[int]]]],
    seeds: Sequence[int],
    random_orders: int,
    started: float,
    out: Path,
    name: str,
) -> None:
    """Summarises the seeds done so far and writes the JSON, Markdown and plot."""
    methods = {"searched (tpe)": "tpe", "random search": "random", "random order": "random-order"}
    report["seeds_done"] = list(seeds)
    report["methods"] = {}
    for label, key in methods.items():
        per_seed = [
            statistics.fmean(mean_site_accuracy(c) for c in rows[f"{key}@seed{seed}"])
            for seed in seeds
        ]
        report["methods"][label] = {
            "mean": statistics.fmean(per_seed),
            "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            "per_seed": per_seed,
        }
    # Paired over seeds and test rows: the searched final against each baseline's final(s).
    report["bootstrap"] = {
        "searched - random search": paired_bootstrap(
            [rows[f"tpe@seed{seed}"][0] for seed in seeds],
            [rows[f"random@seed{seed}"][0] for seed in seeds],
            BOOTSTRAP_RESAMPLES,
        ),
        "searched - random order": paired_bootstrap(
            [rows[f"tpe@seed{seed}"][0] for seed in seeds for _ in range(random_orders)],
            [c for seed in seeds for c in rows[f"random-order@seed{seed}"]],
            BOOTSTRAP_RESAMPLES,
        ),
    }
    report["wall_seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    markdown = _markdown(report)
    (out / f"{name}.md").write_text(markdown)
    _plot(report, out / f"{name}.png")
    print(markdown, flush=True)


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# MedQuAD: searched site order against random order",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}; wall "
        f"time {report['wall_seconds'] / 60:.1f} min. Six NIH sources as six site processes, "
        f"all-MiniLM-L6-v2 + LoRA r=8, question -> question type ({len(report['labels'])} "
        f"types), seeds {report['seeds_done']} (of {report['seeds']}), {report['trials']} "
        "trials per search. Score: mean over sites of test accuracy (each site scores the "
        "final adapter once).",
        "",
        "| site | train | validation | test | question types |",
        "|---|---|---|---|---|",
    ]
    for site, counts in report["sites"].items():
        lines.append(f"| {site} | {counts['train']} | {counts['validation']} | {counts['test']} | "
                     f"{counts['labels']} |")  # fmt: skip
    lines += ["", "| method | mean test accuracy | per seed |", "|---|---|---|"]
    for method, summary in report["methods"].items():
        lines.append(
            f"| {method} | {summary['mean']:.3f} ± {summary['std']:.3f} | "
            + ", ".join(f"{v:.3f}" for v in summary["per_seed"])
            + " |"
        )
    lines += ["", "Paired bootstrap over test rows (95%):", ""]
    for name, ci in report["bootstrap"].items():
        separated = ci["low"] > 0 or ci["high"] < 0
        lines.append(
            f"- {name}: {ci['difference']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"
            f"{' (separated)' if separated else ' (not separated)'}"
        )
    lines += ["", "| seed | searched plan | random-search plan |", "|---|---|---|"]
    for entry in report["per_seed"]:
        lines.append(f"| {entry['seed']} | {entry['tpe_search']['best_plan']} | "
                     f"{entry['random_search']['best_plan']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for sampler, label in (("tpe_search", "searched (TPE)"), ("random_search", "random search")):
        curves = []
        for entry in report["per_seed"]:
            best, curve = float("-inf"), []
            for trial in entry[sampler]["trials"]:
                if trial["validation_accuracy"] is not None:
                    best = max(best, trial["validation_accuracy"])
                curve.append(best if best > float("-inf") else float("nan"))
            curves.append(curve)
        median = np.nanmedian(np.array(curves), axis=0)
        axis.plot(range(1, len(median) + 1), median, label=label)
    axis.set_xlabel("trials")
    axis.set_ylabel("best validation accuracy so far (median over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
