"""Why sequential training sat 10-22 points below pooled on MedQuAD: forgetting, too few cycles,
or the learning rate (issue 17, item 3).

Fixed schedules (no search) on the splits and sites of ``medquad_paired.py`` (frozen MiniLM
embeddings + a softmax head), each trained on the split's training rows and scored on its test
rows after every visit. A diagnosis, never a selection: nothing here picks a schedule.

For each schedule, the gap to pooled training (same learning rate, every site's step budget
together) is split in two with the per-visit test scores:

* learning gap: pooled minus the mean over sites of each site's best score after any visit
  (what the model never learnt);
* forgetting: the mean over sites of (best score after any visit minus final score) (what it
  learnt and lost).

Schedules: each site's budget of ``--budget`` steps split over 1, 2 or 10 cycles (1-2 cycles of
<= 30 steps is session 5's space), at learning rates 0.03, 0.1 and 0.3 (AdamW, the site's linear
schedule within each visit); 10 cycles with per-hop decay 0.95 and a 5-step consolidation
cycle; 10 cycles with twice the budget.

    .venv/bin/python benchmarks/medquad_gap.py                 # 5 splits x 3 settings
    .venv/bin/python benchmarks/medquad_gap.py --splits 1 --settings sources

Writes benchmarks/results/medquad_paired_session6_gap.{json,md} after every (setting, split).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from _harness import markdown_row
from medquad_paired import (
    BATCH,
    DEFAULT_DATA,
    RESULTS_DIR,
    SETTINGS,
    Row,
    Scorer,
    _final_scores,
    _spec,
    load_pool,
    memoise_feature_matrices,
    run_plan_on_test,
    split_sites,
)

from ordering import CandidatePlan, SearchSpace
from site_agent.registry import RegisteredDataset
from site_agent.simulation import train_pooled
from site_agent.tasks import HopHyperparameters, TabularTrainer, TaskSpec, create_trainer

LEARNING_RATES = (0.03, 0.1, 0.3)


def schedules(budget: int) -> list[dict[str, Any]]:
    """The fixed schedules, as ``SearchSpace.plan`` arguments plus a name."""
    out = [
        {"name": f"{c} cycle(s), lr {lr:g}", "cycles": c, "learning_rate": lr, "budget": budget}
        for lr in LEARNING_RATES
        for c in (1, 2, 10)
    ]
    out.append(
        {
            "name": "10 cycles, lr 0.3, decay 0.95/hop, consolidation 5 steps",
            "cycles": 10,
            "learning_rate": 0.3,
            "budget": budget,
            "learning_rate_decay": 0.95,
            "consolidation_steps": 5,
        }
    )
    out.append(
        {
            "name": f"10 cycles, lr 0.1, budget {2 * budget}",
            "cycles": 10,
            "learning_rate": 0.1,
            "budget": 2 * budget,
        }
    )
    return out


def build_plan(sites: Sequence[str], schedule: Mapping[str, Any], seed: int) -> CandidatePlan:
    space = SearchSpace(
        sites=tuple(sites),
        cycles=schedule["cycles"],
        learning_rate=schedule["learning_rate"],
        learning_rate_decay=schedule.get("learning_rate_decay", 1.0),
        steps=schedule["budget"],
        steps_split_over_cycles=True,
        consolidation_steps=schedule.get("consolidation_steps"),
        consolidation_learning_rate_factor=0.3,
        batch_size=BATCH,
        max_grad_norm=0.0,
        seed=seed,
    )
    return space.plan(
        tuple(sites),
        cycles=schedule["cycles"],
        consolidation_steps=schedule.get("consolidation_steps"),
    )


def decompose(run: Mapping[str, Any], pooled: float) -> dict[str, float]:
    """The gap to pooled as learning gap + forgetting, from the per-visit test scores."""
    sites = list(run["site_test_accuracy"])
    best = {s: max(v["test"][s] for v in run["after_each_visit"]) for s in sites}
    final = run["site_test_accuracy"]
    return {
        "gap_to_pooled": pooled - run["test_avg"],
        "learning_gap": pooled - statistics.fmean(best.values()),
        "forgetting": statistics.fmean(best[s] - final[s] for s in sites),
        "worst_site_forgetting": run["test_worst_forgetting"],
    }


def run_cell(
    trainer: TabularTrainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    split: int,
    budget: int,
) -> dict[str, Any]:
    scorer = Scorer(spec.labels)
    sites = [d.name for d in datasets]
    pooled: dict[float, float] = {}
    for lr in sorted({s["learning_rate"] for s in schedules(budget)}):
        hp = HopHyperparameters(
            learning_rate=lr,
            steps=len(sites) * budget,
            batch_size=BATCH,
            max_grad_norm=0.0,
            seed=split,
        )
        tensors = train_pooled(trainer, spec, datasets, hp).tensors
        pooled[lr] = statistics.fmean(
            _final_scores(trainer, spec, datasets, tensors, scorer).values()
        )
    rows = []
    for schedule in schedules(budget):
        plan = build_plan(sites, schedule, split)
        run = run_plan_on_test(trainer, spec, datasets, plan, scorer)
        rows.append(
            {
                "schedule": schedule["name"],
                "hops": len(plan.hops),
                "steps_per_visit": plan.hops[0].hyperparameters.steps,
                "test_avg": run["test_avg"],
                "pooled_same_lr": pooled[schedule["learning_rate"]],
                **decompose(run, pooled[schedule["learning_rate"]]),
            }
        )
    return {"pooled": {str(k): v for k, v in pooled.items()}, "schedules": rows}


def markdown(report: Mapping[str, Any]) -> str:
    lines = [
        "# MedQuAD: why sequential sat below pooled (fixed schedules, per-visit test scores)",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}; "
        f"CPU {report['cpu_seconds'] / 60:.1f} min, load at start {report['load_start']}, now "
        f"{report['load_now']}. Frozen all-MiniLM-L6-v2 embeddings + softmax head (as "
        "medquad_paired.py), batch 16, AdamW with the site's linear schedule within each visit. "
        f"Each site's budget: {report['budget']} steps, split over the cycles. Pooled: the same "
        "learning rate, every site's budget together. Diagnosis on test rows; nothing is "
        "selected here. Gap to pooled = learning gap (pooled minus the mean of each site's best "
        "score after any visit) + forgetting (mean of best minus final).",
    ]
    for setting in SETTINGS:
        cells = [c for c in report["cells"] if c["setting"] == setting]
        if not cells:
            continue
        names = [r["schedule"] for r in cells[0]["schedules"]]
        lines += [
            "",
            f"## {setting} (splits {[c['split'] for c in cells]}), means over splits",
            "",
            "| schedule | visit steps | test avg | pooled (same lr) | gap to pooled | "
            "learning gap | forgetting | worst-site forgetting (max over splits) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in names:
            rows = [r for c in cells for r in c["schedules"] if r["schedule"] == name]

            def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
                return statistics.fmean(r[key] for r in rows)

            worst = max(r["worst_site_forgetting"] for r in rows)
            lines.append(markdown_row(
                name, rows[0]["steps_per_visit"], f"{mean('test_avg'):.3f}",
                f"{mean('pooled_same_lr'):.3f}", f"{mean('gap_to_pooled'):+.3f}",
                f"{mean('learning_gap'):+.3f}", f"{mean('forgetting'):.3f}",
                f"{mean('worst_site_forgetting'):.3f} ({worst:.3f})",
            ))  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], out: Path) -> bool:
    """Per setting, each schedule's gap to pooled as stacked bars: learning gap, forgetting."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(c["setting"] == s for c in report["cells"])]
    figure, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 5), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        cells = [c for c in report["cells"] if c["setting"] == setting]
        names = [r["schedule"] for r in cells[0]["schedules"]]
        means = {
            key: [
                statistics.fmean(
                    r[key] for c in cells for r in c["schedules"] if r["schedule"] == name
                )
                for name in names
            ]
            for key in ("learning_gap", "forgetting")
        }
        positions = range(len(names))
        axis.barh(positions, means["learning_gap"], label="never learnt (learning gap)")
        axis.barh(positions, means["forgetting"], left=means["learning_gap"], label="forgotten")
        axis.set_yticks(list(positions), names, fontsize=7)
        axis.invert_yaxis()
        axis.axvline(0.0, color="grey", linewidth=0.8)
        axis.set_xlabel("pooled minus sequential, test accuracy")
        axis.set_title(f"{setting} ({len(cells)} splits)")
        axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return True


def frozen_setup(
    data: Path, rows_per_source: int, cache: Path
) -> tuple[list[Row], TabularTrainer, TaskSpec]:
    """The question pool with its frozen MiniLM embeddings, the twin's tabular trainer and the
    task, as ``medquad_paired.py`` trains them (offline, one thread, memoised matrices)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    memoise_feature_matrices()
    pool = load_pool(data, rows_per_source, cache)
    trainer = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(trainer, TabularTrainer)
    return pool, trainer, _spec(sorted({r.label for r in pool}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_MEDQUAD_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--budget", type=int, default=60, help="each site's steps in the run")
    parser.add_argument("--rows-per-source", type=int, default=300)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "baton-medquad-cache"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="medquad_paired_session6_gap")
    parser.add_argument("--render", type=Path, help="re-render a JSON report's Markdown and plot")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report))
        plot(report, args.render.with_suffix(".png"))
        return 0
    cpu = time.process_time()
    pool, trainer, spec = frozen_setup(args.data, args.rows_per_source, args.cache)
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["medquad_gap.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "budget": args.budget,
        "cells": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for split in range(args.splits):
        for setting in args.settings:
            datasets, _ = split_sites(pool, setting, split)
            cell = run_cell(trainer, spec, datasets, split, args.budget)
            report["cells"].append({"setting": setting, "split": split, **cell})
            report["cpu_seconds"] = time.process_time() - cpu
            report["load_now"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
            (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
            (args.out / f"{args.name}.md").write_text(markdown(report))
            plot(report, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
