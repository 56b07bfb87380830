"""Per-fold normalisers on FLamby's Fed-Heart-Disease (issue 17, item 2: honest CV).

For each registration seed (the seed deals the CV folds) and fold count K:

* whether a per-fold statistics request can be answered at the default minimum count (every
  fold of every centre must hold that many rows; Switzerland keeps ~30 training rows);
* how far the fold normalisers, as the real round computes them (each centre's
  ``site_agent.statistics.compute_statistics(..., cv_folds=K)`` pooled by
  ``coordinator.statistics.combine``), move from the global normaliser, in global stds;
* how optimistic k-fold CV is when every fold model uses the global normaliser (fitted on its
  held-out rows too) instead of its fold's: the CV accuracy and loss of one fixed cyclic
  schedule (FLamby's settings: 4 cycles, 100 updates per visit, lr 1e-3, batch 4) both ways,
  in the in-process twin, paired per seed.

    nice -n 19 .venv/bin/python benchmarks/fold_normalisers.py --seeds 0 1 2 3 4 5 6 7 8 9
    .venv/bin/python benchmarks/fold_normalisers.py --quick     # one seed, K = 5, seconds

The data: FLamby's four processed.*.data files in ``--data`` (default
``$BATON_HEART_DISEASE_DIR``, else ``../shared/datasets/heart_disease`` beside the checkout).

Writes benchmarks/results/fold_normalisers.{json,md} (after every seed, so a cut run leaves its
partial results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heart_disease import (  # FLamby's data files and cyclic settings
    CYCLIC_CYCLES,
    DEFAULT_DATA,
    FLAMBY_BATCH,
    FLAMBY_LR,
    FLAMBY_UPDATES,
    LABELS,
    SITE_FILES,
)

from coordinator.statistics import combine
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.simulation import (
    cross_validate,
    pooled_normalisation_spec,
    train_sequential,
)
from site_agent.statistics import compute_statistics
from site_agent.tasks import HopHyperparameters, TabularTrainer, TaskSpec, create_trainer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIN_COUNT = 10  # the coordinator's and the sites' default minimum count


def _register(data: Path, work: Path, seed: int) -> list[RegisteredDataset]:
    datasets = []
    for site, file in SITE_FILES.items():
        registered = register_dataset(work / f"{seed}" / site, "heart", data / file,
                                      task_type="tabular", fmt="heart-disease",
                                      validation_fraction=0.0, seed=seed)  # fmt: skip
        datasets.append(dataclasses.replace(registered, name=site))
    return datasets


def _fold_sizes(datasets: Sequence[RegisteredDataset], folds: int) -> dict[str, list[int]]:
    return {d.name: [Counter(d.fold_ids(folds))[k] for k in range(folds)] for d in datasets}


def _normaliser_shift(datasets: Sequence[RegisteredDataset], folds: int) -> dict[str, float]:
    """The real round's fold normalisers against its global one (min count 1: the maths only)."""
    answers = [
        dataclasses.replace(compute_statistics(d, min_count=1, cv_folds=folds), site=d.name)
        for d in datasets
    ]
    pooled = combine(answers, cv_folds=folds)
    mean_shift = max(
        abs(m - g) / s
        for fold in pooled.folds
        for m, g, s in zip(fold.mean, pooled.mean, pooled.std, strict=True)
        if s > 0
    )
    std_ratio = max(
        abs(fs / s - 1.0)
        for fold in pooled.folds
        for fs, s in zip(fold.std, pooled.std, strict=True)
        if s > 0
    )
    return {"max_mean_shift_in_stds": mean_shift, "max_std_relative_change": std_ratio}


def _cv(
    trainer: TabularTrainer, datasets: Sequence[RegisteredDataset], folds: int, per_fold: bool
) -> dict[str, float]:
    base = TaskSpec("tabular", labels=LABELS, options={"model": "logistic"})
    everything = pooled_normalisation_spec(base, datasets)  # global: every training row

    def spec_for(views: Sequence[RegisteredDataset]) -> TaskSpec:
        return pooled_normalisation_spec(base, views) if per_fold else everything

    hp = HopHyperparameters(learning_rate=FLAMBY_LR, steps=FLAMBY_UPDATES, batch_size=FLAMBY_BATCH,
                            seed=0)  # fmt: skip

    def train(views: Sequence[RegisteredDataset]) -> Any:
        visits = [(view, hp) for _ in range(CYCLIC_CYCLES) for view in views]
        return train_sequential(trainer, spec_for(views), visits)

    result = cross_validate(trainer, base, datasets, folds, train, evaluation_spec=spec_for,
                            guard=False)  # fmt: skip
    return {"accuracy": result.mean["accuracy"], "loss": result.mean["loss"]}


def _interval(values: Sequence[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Per-fold normalisers on Fed-Heart-Disease",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; load at start: {report['load']}; CPU seconds "
        f"{report['cpu_seconds']:.1f}.",
        "",
        "## Can a per-fold request be answered (minimum count "
        f"{MIN_COUNT} per fold at every centre)?",
        "",
        "| K | smallest fold per centre (over seeds) | answerable |",
        "| --- | --- | --- |",
    ]
    for folds, row in sorted(report["answerable"].items()):
        smallest = ", ".join(f"{site} {n}" for site, n in row["smallest"].items())
        lines.append(f"| {folds} | {smallest} | {'yes' if row['answerable'] else 'no'} |")
    lines += [
        "",
        "## Fold normalisers against the global one, and CV with each",
        "",
        "Global minus per-fold CV score (mean over centres) of one fixed cyclic schedule; "
        "positive accuracy (negative loss) = the global normaliser inside CV is optimistic.",
        "",
        "| K | seeds | max mean shift (global stds) | max std change | CV acc global | "
        "CV acc per-fold | acc diff (95% CI) | loss diff (95% CI) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for folds, rows in sorted(report["runs"].items()):
        if not rows:
            continue
        acc = _interval([r["global"]["accuracy"] - r["per_fold"]["accuracy"] for r in rows])
        loss = _interval([r["global"]["loss"] - r["per_fold"]["loss"] for r in rows])
        lines.append(
            f"| {folds} | {len(rows)} | "
            f"{max(r['shift']['max_mean_shift_in_stds'] for r in rows):.3f} | "
            f"{max(r['shift']['max_std_relative_change'] for r in rows):.3f} | "
            f"{statistics.fmean(r['global']['accuracy'] for r in rows):.4f} | "
            f"{statistics.fmean(r['per_fold']['accuracy'] for r in rows):.4f} | "
            f"{acc[0]:+.4f} ({acc[1]:+.4f}, {acc[2]:+.4f}) | "
            f"{loss[0]:+.4f} ({loss[1]:+.4f}, {loss[2]:+.4f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_HEART_DISEASE_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--folds", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--quick", action="store_true", help="one seed, K = 5")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fold_normalisers")
    args = parser.parse_args(argv)  # fmt: skip
    if args.quick:
        args.seeds, args.folds = [0], [5]
    torch.set_num_threads(1)
    trainer = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(trainer, TabularTrainer)
    started = time.process_time()
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/fold_normalisers.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "min_count": MIN_COUNT,
        "answerable": {},
        "runs": {str(k): [] for k in args.folds},
        "cpu_seconds": 0.0,
    }
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            datasets = _register(args.data, Path(work), seed)
            for folds in args.folds:
                sizes = _fold_sizes(datasets, folds)
                row = report["answerable"].setdefault(
                    str(folds), {"smallest": {}, "answerable": True}
                )
                for site, counts in sizes.items():
                    row["smallest"][site] = min(row["smallest"].get(site, 10**9), min(counts))
                row["answerable"] = min(row["smallest"].values()) >= MIN_COUNT
                report["runs"][str(folds)].append({
                    "seed": seed,
                    "fold_sizes": sizes,
                    "shift": _normaliser_shift(datasets, folds),
                    "global": _cv(trainer, datasets, folds, per_fold=False),
                    "per_fold": _cv(trainer, datasets, folds, per_fold=True),
                })  # fmt: skip
            report["cpu_seconds"] = time.process_time() - started
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(_markdown(report))
            print(f"seed {seed} done ({report['cpu_seconds']:.0f} CPU s)", flush=True)
    print(_markdown(report))


if __name__ == "__main__":
    main()
