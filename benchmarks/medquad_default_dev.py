"""Choosing the search's default start (``ordering.short_cycles_seed``) on development splits.

The default is one plan built from the space alone: its most cycles, each site's whole step
budget, the learning rate at a position of its range, decayed to a fraction of it by the last
regular hop. This script scores a small grid of (position, final fraction) on MedQuAD
*development* splits (100 and up by default, never the splits a paired run reports), by the
search's own objective (k-fold CV inside the training rows, mean over sites) and, for the
record, on the development splits' test rows. The grid point with the best mean CV over every
setting and development split becomes ``SHORT_CYCLES_LEARNING_RATE_POSITION`` /
``SHORT_CYCLES_FINAL_FRACTION``. ``--consolidations`` adds the default's consolidation cycle to
the grid (``shortest`` or STEPS:FACTOR); each grid point also reports its worst-site forgetting
(mean and maximum over the development cells, per setting, on test and on CV), which is how
``results/mq8-prereg.md`` judged a forgetting-aware default.

    .venv/bin/python benchmarks/medquad_default_dev.py --dev-splits 100 --name dev100
    .venv/bin/python benchmarks/medquad_default_dev.py --dev-splits 101 --name dev101
    .venv/bin/python benchmarks/medquad_default_dev.py --merge dev100.json dev101.json

Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medquad_gap import frozen_setup
from medquad_paired import (
    DEFAULT_DATA,
    RESULTS_DIR,
    SETTINGS,
    SPACES,
    TwinExecutor,
    _scorer,
    parse_consolidation,
    run_plan_on_test,
    search_space,
    split_sites,
)

from ordering import short_cycles_seed

POSITIONS = (0.8, 1.0)
FINAL_FRACTIONS = (1.0, 0.3)
CONSOLIDATIONS = ("shortest",)  # or STEPS:FACTOR (--default-consolidation of medquad_paired.py)


def write(
    rows: list[dict[str, Any]], args: argparse.Namespace, cpu_seconds: float, argv: Any
) -> None:
    """The grid's means over every setting and development split, the choice, JSON + Markdown."""
    positions = sorted({r["position"] for r in rows})
    fractions = sorted({r["final_fraction"] for r in rows}, reverse=True)
    consolidations = list(dict.fromkeys(r.get("consolidation", "shortest") for r in rows))
    splits = sorted({r["split"] for r in rows})
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    grid = []
    for position in positions:
        for fraction in fractions:
            for consolidation in consolidations:
                key = (position, fraction, consolidation)
                mine = [
                    r
                    for r in rows
                    if (r["position"], r["final_fraction"], r.get("consolidation", "shortest"))
                    == key
                ]
                if not mine:
                    continue
                grid.append(
                    {
                        "position": position,
                        "final_fraction": fraction,
                        "consolidation": consolidation,
                        "cv_mean": statistics.fmean(r["cv"] for r in mine),
                        "test_mean": statistics.fmean(r["test"] for r in mine),
                        "worst_forgetting_mean": statistics.fmean(
                            r["test_worst_forgetting"] for r in mine
                        ),
                        # The worst (setting, split): the forgetting target is a maximum.
                        "worst_forgetting_max": max(r["test_worst_forgetting"] for r in mine),
                        "cv_worst_forgetting_max": max(
                            (r["cv_worst_forgetting"] for r in mine if "cv_worst_forgetting" in r),
                            default=None,
                        ),
                        "worst_forgetting_max_by_setting": {
                            setting: max(
                                r["test_worst_forgetting"] for r in mine if r["setting"] == setting
                            )
                            for setting in settings
                        },
                    }
                )
    chosen = max(grid, key=lambda g: g["cv_mean"])
    report = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["medquad_default_dev.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "cpu_seconds": cpu_seconds,
        "config": {k: v for k, v in vars(args).items() if k != "merge"},
        "rows": rows,
        "grid": grid,
        "chosen": chosen,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = [
        "# MedQuAD: choosing the search's default start on development splits",
        "",
        f"Generated {report['generated']} by `{report['command']}`; CPU "
        f"{report['cpu_seconds'] / 60:.1f} min. Development splits {splits} (never "
        f"reported), settings {settings}, space `{args.space}`, {args.max_steps} steps per "
        f"site, {args.folds}-fold CV. Selection by mean CV over every setting and split; test "
        "of the development splits shown for the record.",
        "",
        "| lr position in range (log) | last hop's lr fraction | consolidation (steps:factor) | "
        "CV mean | dev test mean | worst-site forgetting (dev test, mean / max) | "
        "max per setting (dev test) | worst-site forgetting (CV, max) |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {g['position']:g} | {g['final_fraction']:g} | "
            f"{g.get('consolidation', 'shortest')} | {g['cv_mean']:.4f} | "
            f"{g['test_mean']:.3f} | {g['worst_forgetting_mean']:.3f} / "
            f"{g.get('worst_forgetting_max', float('nan')):.3f} | "
            + ", ".join(
                f"{k} {v:.3f}" for k, v in g.get("worst_forgetting_max_by_setting", {}).items()
            )
            + " | "
            + (
                "n/a"
                if g.get("cv_worst_forgetting_max") is None
                else f"{g['cv_worst_forgetting_max']:.3f}"
            )
            + " |"
            for g in grid
        ),
        "",
        f"Best CV mean: position {chosen['position']:g}, final fraction "
        f"{chosen['final_fraction']:g}, consolidation {chosen.get('consolidation', 'shortest')}.",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_MEDQUAD_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--dev-splits", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--space", choices=SPACES, default="budget")
    parser.add_argument("--rows-per-source", type=int, default=300)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "baton-medquad-cache"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="mq7-default-dev")
    parser.add_argument("--positions", type=float, nargs="+", default=list(POSITIONS))
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FINAL_FRACTIONS))
    parser.add_argument(
        "--consolidations",
        nargs="+",
        default=list(CONSOLIDATIONS),
        help="the default's consolidation cycle: 'shortest' or STEPS:FACTOR",
    )
    parser.add_argument("--merge", type=Path, nargs="+", help="combine runs' JSON reports")
    args = parser.parse_args(argv)
    if args.merge:
        reports = [json.loads(path.read_text()) for path in args.merge]
        rows = [row for report in reports for row in report["rows"]]
        write(
            rows,
            args,
            sum(r["cpu_seconds"] for r in reports),
            ["--merge", *(r["command"] for r in reports)],
        )
        return 0
    if min(args.dev_splits) < 100:
        raise SystemExit("development splits are 100 and up (the paired runs report 0-99)")
    cpu = time.process_time()
    pool, trainer, spec = frozen_setup(args.data, args.rows_per_source, args.cache)
    rows: list[dict[str, Any]] = []
    for split in args.dev_splits:
        for setting in args.settings:
            datasets, _ = split_sites(pool, setting, split)
            sites = [d.name for d in datasets]
            sizes = {d.name: len(d.train) for d in datasets}
            order = tuple(sorted(sites, key=lambda s: (sizes[s], s)))
            space = search_space(sites, split, args.max_steps, args.space)
            scorer = _scorer(trainer, spec)
            executor = TwinExecutor(trainer, spec, datasets, args.folds, scorer)
            grid = [
                (p, f, c)
                for p in args.positions
                for f in args.fractions
                for c in args.consolidations
            ]  # fmt: skip
            for position, fraction, consolidation in grid:
                steps, factor = parse_consolidation(consolidation) or (None, None)
                plan = short_cycles_seed(
                    space,
                    order,
                    learning_rate_position=position,
                    final_fraction=fraction,
                    consolidation_steps=steps,
                    consolidation_learning_rate_factor=factor,
                )
                outcome = executor.execute(plan, budget=1.0, report=lambda c, v: None)
                test = run_plan_on_test(trainer, spec, datasets, plan, scorer)
                rows.append(
                    {
                        "split": split,
                        "setting": setting,
                        "position": position,
                        "final_fraction": fraction,
                        "consolidation": consolidation,
                        "plan": plan.describe(),
                        "cv": statistics.fmean(s.value for s in outcome.site_scores),
                        "cv_failed": outcome.failure_reason,
                        "cv_worst_forgetting": max(outcome.forgetting().values(), default=0.0),
                        "test": test["test_avg"],
                        "test_worst_forgetting": test["test_worst_forgetting"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    write(rows, args, time.process_time() - cpu, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
