"""Which sampler should Baton's search use? Measured on the real objective (issue 17, item 4).

Fed-Heart-Disease, per-site normalisation, the forgetting-control space of
``heart_disease_paired.py --controls``, 3-fold CV inside each centre's training rows (mean over
centres) as the objective, the in-process twin. Every sampler gets the same trial budget on the
same resampled splits (paired by split) and its selected schedule is scored once on the split's
test rows:

* ``tpe``: Baton's default (TPE, 3 start-up trials, the default encoding, size-ordered seed);
* ``tpe-startup8``: the same with 8 random start-up trials;
* ``gp``: Optuna's Gaussian-process sampler (3 start-up trials, default encoding);
* ``cmaes``: CMA-ES over random keys (3 start-up trials);
* ``qmc``: scrambled Sobol over random keys;
* ``random``: random search (default encoding).

    .venv/bin/python benchmarks/heart_disease_samplers.py --splits 5 --trials 16 --jobs 2
    .venv/bin/python benchmarks/heart_disease_samplers.py --quick

Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from heart_disease import DEFAULT_DATA, SITES, _register_sites
from heart_disease_paired import (
    _WORKER,
    COLLAPSED_KEY,
    RESULTS_DIR,
    TwinExecutor,
    _best,
    _final_sequential,
    _init_worker,
    _study_summary,
    paired_summary,
    resample_split,
    search_space,
)

from ordering import OrderingStudy, PlanFailed, SamplerName

logger = logging.getLogger("benchmarks.heart_disease_samplers")

# name -> (sampler, encoding, start-up trials)
SAMPLERS: dict[str, tuple[SamplerName, str, int]] = {
    "tpe": ("tpe", "auto", 3),
    "tpe-startup8": ("tpe", "auto", 8),
    "gp": ("gp", "auto", 3),
    "cmaes": ("cmaes", "random-keys", 3),
    "qmc": ("qmc", "random-keys", 3),
    "random": ("random", "auto", 3),
}
SETTING = "per-site"


def run_cell(name: str, split: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """One sampler's search on one split, and its selected schedule's test scores."""
    started = time.perf_counter()
    trainer = _WORKER["trainer"]
    datasets = resample_split(_WORKER["datasets"], split)
    space = search_space(split, config["cycles"], config["max_steps"], controls=True)
    sampler, encoding, startup = SAMPLERS[name]
    executor = TwinExecutor(trainer, SETTING, datasets, config["folds"])
    study = OrderingStudy.create(None, f"{name}-{split}", space, encoding, "mean", seed=split,
                                 sampler=sampler, pruning=None,
                                 n_startup_trials=startup)  # fmt: skip
    if sampler != "random":
        sizes = {d.name: len(d.train) for d in datasets}
        study.enqueue(tuple(sorted(SITES, key=lambda s: (sizes[s], s))), note="seed: sizes")
    records = study.optimize(executor, config["trials"], catch=(PlanFailed,))
    chosen = _best(records)
    assert chosen.plan is not None
    search_seconds = time.perf_counter() - started
    scores = _final_sequential(trainer, SETTING, datasets, chosen.plan)
    collapsed = scores.pop(COLLAPSED_KEY, None)
    result = {
        "sampler": name,
        "split": split,
        **_study_summary(records, chosen),
        "search_seconds": search_seconds,
        "seconds": time.perf_counter() - started,
        "site_test_accuracy": scores,
        "final_collapsed": collapsed,
        "test_avg": statistics.fmean(scores.values()),
    }
    logger.info("%s split %d: cv %.3f test %.3f in %.0f s", name, split, result["cv_accuracy"],
                result["test_avg"], result["seconds"])  # fmt: skip
    return result


def summarise(cells: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(c["sampler"], c["split"]): c for c in cells}
    splits = sorted({c["split"] for c in cells})
    out: dict[str, Any] = {}
    for name in SAMPLERS:
        rows = [by[(name, s)] for s in splits if (name, s) in by]
        if not rows:
            continue
        entry: dict[str, Any] = {
            "splits": len(rows),
            "test_avg": statistics.fmean(r["test_avg"] for r in rows),
            "cv_accuracy": statistics.fmean(r["cv_accuracy"] for r in rows),
            "worst_forgetting_mean": statistics.fmean(r["cv_worst_forgetting"] for r in rows),
            "worst_forgetting_max": max(r["cv_worst_forgetting"] for r in rows),
            "search_seconds": statistics.fmean(r["search_seconds"] for r in rows),
            "failed": sum(len(r["failed"]) for r in rows),
        }
        if name != "tpe":
            pairs = [s for s in splits if ("tpe", s) in by and (name, s) in by]
            if len(pairs) > 1:
                entry["cv_vs_tpe"] = paired_summary(
                    [by[(name, s)]["cv_accuracy"] - by[("tpe", s)]["cv_accuracy"] for s in pairs]
                )
                entry["test_vs_tpe"] = paired_summary(
                    [by[(name, s)]["test_avg"] - by[("tpe", s)]["test_avg"] for s in pairs]
                )
        out[name] = entry
    return out


def _interval(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "—"
    return (f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}], p={p['wilcoxon_p']:.3f}, "
            f"{p['wins']}/{p['ties']}/{p['losses']}")  # fmt: skip


def markdown(report: Mapping[str, Any]) -> str:
    config = report["config"]
    lines = [
        "# Samplers on the real objective: Fed-Heart-Disease, per-site, forgetting controls",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}; "
        f"wall time {report['wall_seconds'] / 60:.1f} min with {config['jobs']} worker(s) at "
        f"low priority on a shared machine. Splits {report['splits']} (0 = FLamby's), "
        f"{config['trials']} trials per sampler and split, {config['folds']}-fold CV mean "
        "accuracy over centres as the objective; test Avg = unweighted mean of the centres' "
        "test accuracies of the selected schedule. Differences are sampler minus tpe (Baton's "
        "default), paired by split: mean [95% t-interval], Wilcoxon p, wins/ties/losses. "
        "Forgetting = worst site's best post-visit CV accuracy minus its final one.",
        "",
        "| sampler | best CV accuracy | CV - tpe | test Avg | test - tpe | worst-site "
        "forgetting mean (max) | search s per split | failed trials |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        lines.append(
            f"| {name} | {s['cv_accuracy']:.3f} | {_interval(s.get('cv_vs_tpe'))} | "
            f"{s['test_avg']:.3f} | {_interval(s.get('test_vs_tpe'))} | "
            f"{s['worst_forgetting_mean']:.3f} ({s['worst_forgetting_max']:.3f}) | "
            f"{s['search_seconds']:.0f} | {s['failed']} |"
        )
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: Path, name: str) -> None:
    report["summary"] = summarise(report["cells"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (out / f"{name}.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_HEART_DISEASE_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 splits, 4 trials, 2 folds")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="heart_disease_samplers")
    args = parser.parse_args(argv)
    if args.quick:
        args.splits, args.trials, args.folds, args.cycles, args.max_steps = 2, 4, 2, 2, 20
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="baton-heart-samplers-"))
    out = args.out or (work / "results" if args.quick else RESULTS_DIR)
    site_dirs = _register_sites(args.data, work)
    config = {"trials": args.trials, "folds": args.folds, "cycles": args.cycles,
              "max_steps": args.max_steps, "jobs": args.jobs}  # fmt: skip
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}",
        "splits": list(range(args.splits)),
        "config": config,
        "cells": [],
    }
    wanted = [(name, split) for split in range(args.splits) for name in args.samplers]
    with ProcessPoolExecutor(max(1, args.jobs), initializer=_init_worker,
                             initargs=(site_dirs,)) as pool:  # fmt: skip
        futures = [pool.submit(run_cell, name, split, config) for name, split in wanted]
        for future in futures:
            report["cells"].append(future.result())
            report["wall_seconds"] = time.perf_counter() - started
            _write(report, out, args.name)
    report["wall_seconds"] = time.perf_counter() - started
    _write(report, out, args.name)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
