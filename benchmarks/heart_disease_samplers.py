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
* ``random``: random search (default encoding);
* ``tpe-pruned``: ``tpe`` with median pruning of partial schedules (the twin reports the CV
  objective after every cycle; a trial is compared only with trials of its own cycle count,
  from 2 such trials on): reported at the same trial count (``tpe-pruned``) and continued to
  the training steps ``tpe`` spent on that split (``tpe-pruned@steps``, equal compute).

Every study selects the best trial whose worst-site CV forgetting is <= ``--max-forgetting``
(the least-forgetting one if none is), as ``heart_disease_paired.py`` does.

    .venv/bin/python benchmarks/heart_disease_samplers.py --splits 5 --trials 16
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from heart_disease import DEFAULT_DATA, SITES, _register_sites
from heart_disease_paired import (
    _WORKER,
    COLLAPSED_KEY,
    MAX_FORGETTING,
    RESULTS_DIR,
    TEST_FORGETTING_KEY,
    TwinExecutor,
    _best,
    _final_sequential,
    _init_worker,
    _study_summary,
    paired_summary,
    resample_split,
    search_space,
)

from ordering import OrderingStudy, PlanFailed, PruningSettings, SamplerName, TrialRecord

logger = logging.getLogger("benchmarks.heart_disease_samplers")

# name -> (sampler, encoding, start-up trials)
SAMPLERS: dict[str, tuple[SamplerName, str, int]] = {
    "tpe": ("tpe", "auto", 3),
    "tpe-startup8": ("tpe", "auto", 8),
    "gp": ("gp", "auto", 3),
    "cmaes": ("cmaes", "random-keys", 3),
    "qmc": ("qmc", "random-keys", 3),
    "random": ("random", "auto", 3),
    "tpe-pruned": ("tpe", "auto", 3),
}
PRUNED = "tpe-pruned"
PRUNING = PruningSettings(percentile=50.0, n_startup_trials=2)
# Rows of the report: every sampler, and the pruned search at equal training steps.
ROWS = (*SAMPLERS, f"{PRUNED}@steps")
SETTING = "per-site"


def _scored(
    name: str,
    split: int,
    study: OrderingStudy,
    records: list[TrialRecord],
    steps: int,
    started: float,
) -> dict[str, Any]:
    """The study's selected schedule (so far), scored once on the split's test rows."""
    trainer = _WORKER["trainer"]
    datasets = resample_split(_WORKER["datasets"], split)
    chosen = _best(study)
    assert chosen.plan is not None
    search_seconds = time.perf_counter() - started
    scores = _final_sequential(trainer, SETTING, datasets, chosen.plan)
    collapsed = scores.pop(COLLAPSED_KEY, None)
    test_forgetting = scores.pop(TEST_FORGETTING_KEY, None)
    result = {
        "sampler": name,
        "split": split,
        **_study_summary(records, chosen),
        "pruned": sum(1 for r in records if r.state == "PRUNED"),
        "steps": steps,
        "search_seconds": search_seconds,
        "site_test_accuracy": scores,
        "final_collapsed": collapsed,
        "test_worst_forgetting": test_forgetting,
        "test_avg": statistics.fmean(scores.values()),
    }
    logger.info("%s split %d: cv %.3f test %.3f, %d trials, %d steps in %.0f s", name, split,
                result["cv_accuracy"], result["test_avg"], len(records), steps,
                search_seconds)  # fmt: skip
    return result


def run_cell(name: str, split: int, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One sampler's search on one split, and its selected schedule's test scores; for the
    pruned search also the same search continued to ``config["step_budget"]`` steps."""
    started = time.perf_counter()
    datasets = resample_split(_WORKER["datasets"], split)
    space = search_space(split, config["cycles"], config["max_steps"], controls=True)
    sampler, encoding, startup = SAMPLERS[name]
    executor = TwinExecutor(_WORKER["trainer"], SETTING, datasets, config["folds"])
    study = OrderingStudy.create(None, f"{name}-{split}", space, encoding, "mean", seed=split,
                                 sampler=sampler, pruning=PRUNING if name == PRUNED else None,
                                 n_startup_trials=startup,
                                 max_forgetting=config["max_forgetting"])  # fmt: skip
    if sampler != "random":
        sizes = {d.name: len(d.train) for d in datasets}
        study.enqueue(tuple(sorted(SITES, key=lambda s: (sizes[s], s))), note="seed: sizes")
    records = study.optimize(executor, config["trials"], catch=(PlanFailed,))
    results = [_scored(name, split, study, records, executor.steps_run, started)]
    budget = config.get("step_budget")
    if name == PRUNED and budget is not None:
        # Equal compute: go on until the pruned search has trained as many steps as the
        # unpruned one did on this split (at most 4x its trials).
        while executor.steps_run < budget and len(records) < 4 * config["trials"]:
            records += study.optimize(executor, 1, catch=(PlanFailed,))
        results.append(
            _scored(f"{PRUNED}@steps", split, study, records, executor.steps_run, started)
        )
    return results


def summarise(cells: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(c["sampler"], c["split"]): c for c in cells}
    splits = sorted({c["split"] for c in cells})
    out: dict[str, Any] = {}
    for name in ROWS:
        rows = [by[(name, s)] for s in splits if (name, s) in by]
        if not rows:
            continue
        entry: dict[str, Any] = {
            "splits": len(rows),
            "test_avg": statistics.fmean(r["test_avg"] for r in rows),
            "cv_accuracy": statistics.fmean(r["cv_accuracy"] for r in rows),
            "worst_forgetting_mean": statistics.fmean(r["cv_worst_forgetting"] for r in rows),
            "worst_forgetting_max": max(r["cv_worst_forgetting"] for r in rows),
            "test_forgetting_mean": statistics.fmean(r["test_worst_forgetting"] for r in rows),
            "test_forgetting_max": max(r["test_worst_forgetting"] for r in rows),
            "selected_feasible": sum(
                1 for r in rows if r["cv_worst_forgetting"] <= MAX_FORGETTING + 1e-12
            ),
            "search_seconds": statistics.fmean(r["search_seconds"] for r in rows),
            "failed": sum(len(r["failed"]) for r in rows),
            "trials": statistics.fmean(r["trials"] for r in rows),
            "pruned": sum(r["pruned"] for r in rows),
            "steps": statistics.fmean(r["steps"] for r in rows),
            "cv_per_ksteps": statistics.fmean(1000 * r["cv_accuracy"] / r["steps"] for r in rows),
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
        "Forgetting = worst site's best post-visit CV accuracy minus its final one; every "
        f"study selects the best trial with CV forgetting <= {config['max_forgetting']:g} "
        "(the least-forgetting one if none is); test forgetting is reported only. Steps = "
        "training steps of all trials (every fold's hops, pruned trials' partial runs "
        "included), mean per split.",
        "",
        "| sampler | best CV accuracy | CV - tpe | test Avg | test - tpe | worst-site "
        "forgetting CV mean (max) | on test mean (max) | selected feasible | trials (pruned) | "
        "steps | search s per split | failed trials |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        lines.append(
            f"| {name} | {s['cv_accuracy']:.3f} | {_interval(s.get('cv_vs_tpe'))} | "
            f"{s['test_avg']:.3f} | {_interval(s.get('test_vs_tpe'))} | "
            f"{s['worst_forgetting_mean']:.3f} ({s['worst_forgetting_max']:.3f}) | "
            f"{s['test_forgetting_mean']:.3f} ({s['test_forgetting_max']:.3f}) | "
            f"{s['selected_feasible']}/{s['splits']} | {s['trials']:.1f} ({s['pruned']}) | "
            f"{s['steps']:.0f} | {s['search_seconds']:.0f} | {s['failed']} |"
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
    parser.add_argument("--max-forgetting", type=float, default=MAX_FORGETTING)
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
    config: dict[str, Any] = {"trials": args.trials, "folds": args.folds, "cycles": args.cycles,
                              "max_steps": args.max_steps, "jobs": 1,
                              "max_forgetting": args.max_forgetting}  # fmt: skip
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}",
        "splits": list(range(args.splits)),
        "config": config,
        "cells": [],
    }
    # Unpruned TPE first on each split: the pruned search's equal-steps budget is what it spent.
    order = sorted(args.samplers, key=lambda n: (n == PRUNED, n != "tpe"))
    _init_worker(site_dirs)
    for split in range(args.splits):
        for name in order:
            spent = [c["steps"] for c in report["cells"]
                     if c["sampler"] == "tpe" and c["split"] == split]  # fmt: skip
            cell_config = {**config, "step_budget": spent[0] if spent else None}
            report["cells"] += run_cell(name, split, cell_config)
            report["wall_seconds"] = time.perf_counter() - started
            _write(report, out, args.name)
    report["wall_seconds"] = time.perf_counter() - started
    _write(report, out, args.name)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
