"""Order search efficiency (BENCHMARKS.md section 2) on the synthetic objective.

Four sites: all 24 fixed orders are run once (exhaustive ground truth, fixed hyperparameters),
then every permutation encoding searches with TPE, and random search runs beside them, with 10
search seeds on each of several synthetic objectives. Target: within 0.5 points of the best order
in <= 8 trials (median over the search seeds), and a best-so-far curve above random search at
every trial count. Six sites (720 orders): the same, against random search at equal budget.

    .venv/bin/python benchmarks/ordering_search.py           # full run, about a minute
    .venv/bin/python benchmarks/ordering_search.py --quick   # smoke run, seconds

Writes benchmarks/results/ordering_search.json and ordering_search.md, plus
ordering_search.png (best-so-far curves) when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna

from ordering import (
    RANDOM_SEARCH,
    AllOrders,
    HopHyperparameters,
    LehmerCode,
    PermutationEncoding,
    RandomKeys,
    SyntheticObjective,
    compare_encodings,
    exhaustive_ranking,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOLERANCE = 0.005  # "within 0.5 points": objective values are fractions in [0, 1]
TARGET_TRIALS = 8


@dataclass(frozen=True)
class Setting:
    """One site count: how many objectives, search seeds and trials."""

    sites: int
    objective_seeds: tuple[int, ...]
    search_seeds: tuple[int, ...]
    trials: int


def _encodings() -> list[PermutationEncoding]:
    return [LehmerCode(), RandomKeys(), AllOrders()]


def _settings(quick: bool) -> list[Setting]:
    if quick:
        return [Setting(4, (0,), tuple(range(3)), 10), Setting(6, (0,), tuple(range(3)), 12)]
    return [
        Setting(4, tuple(range(8)), tuple(range(10)), 24),
        Setting(6, tuple(range(5)), tuple(range(10)), 48),
    ]


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.fmean(column) for column in zip(*curves, strict=True)]


def _median_trials(reached: Sequence[int | None], trials: int) -> float:
    """Median trials to the target; a run that never reached it counts as ``trials + 1``."""
    return float(statistics.median(trials + 1 if r is None else r for r in reached))


def run_setting(setting: Setting, n_startup_trials: int | None = None) -> dict[str, Any]:
    """Exhaustive ground truth, then every method on every objective of one site count."""
    started = time.perf_counter()
    objectives: list[dict[str, Any]] = []
    pooled: dict[str, dict[str, list[Any]]] = {}
    for objective_seed in setting.objective_seeds:
        objective = SyntheticObjective(setting.sites, seed=objective_seed)
        fixed = HopHyperparameters(
            learning_rate=objective.optimal_learning_rate, steps=objective.optimal_steps
        )
        ranking = exhaustive_ranking(objective, objective.sites, hyperparameters=fixed)
        best = ranking[0].value
        within = sum(1 for e in ranking if e.value >= best - TOLERANCE)
        result = compare_encodings(
            objective,
            setting.trials,
            setting.search_seeds,
            target=best,
            tolerance=TOLERANCE,
            encodings=_encodings(),
            n_startup_trials=n_startup_trials,
        )
        entry: dict[str, Any] = {
            "objective_seed": objective_seed,
            "orders": len(ranking),
            "best_order": list(ranking[0].plan.order),
            "best_value": best,
            "orders_within_tolerance": within,
            "second_best_gap_points": 100 * (best - ranking[1].value),
            "methods": {},
        }
        for name, method in result["methods"].items():
            entry["methods"][name] = {
                "median_trials_to_target": method["median_trials_to_target"],
                "median_runs_to_target": _median_trials(method["runs_to_target"], setting.trials),
                "trials_to_target": method["trials_to_target"],
                "wall_seconds": method["wall_seconds"],
            }
            bucket = pooled.setdefault(
                name, {"curves": [], "trials_to_target": [], "runs_to_target": [], "regret": []}
            )
            bucket["curves"] += method["best_so_far"]
            bucket["trials_to_target"] += method["trials_to_target"]
            bucket["runs_to_target"] += method["runs_to_target"]
            # Regret in points below the exhaustive best, per seed, after each trial.
            bucket["regret"] += [[100 * (best - v) for v in c] for c in method["best_so_far"]]
        objectives.append(entry)
        logging.info("%d sites, objective %d done", setting.sites, objective_seed)

    random_mean = _mean_curve(pooled[RANDOM_SEARCH]["curves"])
    methods: dict[str, Any] = {}
    for name, bucket in pooled.items():
        mean_curve = _mean_curve(bucket["curves"])
        per_objective = [o["methods"][name]["median_trials_to_target"] for o in objectives]
        reached = bucket["trials_to_target"]
        methods[name] = {
            "median_trials_to_target": _median_trials(reached, setting.trials),
            "median_runs_to_target": _median_trials(bucket["runs_to_target"], setting.trials),
            "median_trials_to_target_per_objective": per_objective,
            "objectives_meeting_target": sum(t <= TARGET_TRIALS for t in per_objective),
            "reached_within_target_trials": sum(
                1 for r in reached if r is not None and r <= TARGET_TRIALS
            ),
            "reached_at_all": sum(1 for r in reached if r is not None),
            "runs": len(reached),
            "mean_best_so_far": mean_curve,
            "median_best_so_far": [
                statistics.median(column) for column in zip(*bucket["curves"], strict=True)
            ],
            "mean_regret_points": _mean_curve(bucket["regret"]),
            "at_or_above_random_every_trial": all(
                m >= r - 1e-12 for m, r in zip(mean_curve, random_mean, strict=True)
            ),
            "strictly_above_random_trials": sum(
                m > r + 1e-12 for m, r in zip(mean_curve, random_mean, strict=True)
            ),
        }
    return {
        **asdict(setting),
        "n_startup_trials": n_startup_trials,
        "tolerance_points": 100 * TOLERANCE,
        "objectives": objectives,
        "methods": methods,
        "wall_seconds": time.perf_counter() - started,
    }


def _checkpoints(trials: int) -> list[int]:
    marks = [k for k in (1, 4, 8, 12, 16, 24, 32, 48) if k <= trials]
    return marks if marks[-1] == trials else [*marks, trials]


def _markdown(report: dict[str, Any], plot: str | None) -> str:
    lines = [
        "# Order search efficiency (synthetic objective)",
        "",
        f"`{report['command']}` at {report['created_at']} (Optuna {report['optuna']}, "
        f"Python {report['python']}), {report['wall_seconds']:.0f} s.",
        "",
        "The objective is `ordering.SyntheticObjective` (a hidden best order; each site's score",
        "is the weighted share of site pairs ordered as in it; hyperparameters fixed at their",
        "optimum, so only the order is searched). Ground truth is exhaustive: every fixed order",
        "run once. A run *reaches the target* when its best-so-far is within "
        f"{100 * TOLERANCE:g} points",
        "of the exhaustive best. *Trials* count every trial; *runs* leave out trials that",
        "repeated an already-completed plan (their result is reused at no cost). Each method",
        "runs with the same search seeds on every objective. TPE starts with "
        + (
            "the study's default number of random trials (one per site, within [3, 10])."
            if report["settings"][0]["n_startup_trials"] is None
            else f"{report['settings'][0]['n_startup_trials']} random trials."
        ),
        "",
    ]
    for setting in report["settings"]:
        n, trials = setting["sites"], setting["trials"]
        runs = len(setting["objective_seeds"]) * len(setting["search_seeds"])
        lines += [
            f"## {n} sites ({setting['objectives'][0]['orders']} orders), {trials} trials, "
            f"{len(setting['objective_seeds'])} objectives x {len(setting['search_seeds'])} "
            f"search seeds",
            "",
            "| method | median trials to target | median runs | per objective (median "
            f"over seeds) | objectives <= {TARGET_TRIALS} | runs reaching it in <= "
            f"{TARGET_TRIALS} trials | mean best-so-far >= random at every trial |",
            "| --- | ---: | ---: | --- | ---: | ---: | --- |",
        ]
        for name, m in setting["methods"].items():
            per = ", ".join(f"{t:g}" for t in m["median_trials_to_target_per_objective"])
            above = (
                "n/a"
                if name == RANDOM_SEARCH
                else ("yes" if m["at_or_above_random_every_trial"] else "no")
                + f" (strictly above at {m['strictly_above_random_trials']}/{trials})"
            )
            lines.append(
                f"| {name} | {m['median_trials_to_target']:g} | {m['median_runs_to_target']:g} "
                f"| {per} | {m['objectives_meeting_target']}/{len(setting['objective_seeds'])} "
                f"| {m['reached_within_target_trials']}/{runs} | {above} |"
            )
        marks = _checkpoints(trials)
        lines += [
            "",
            "Mean regret (points below the exhaustive best) after k trials:",
            "",
            "| method | " + " | ".join(f"k={k}" for k in marks) + " |",
            "| --- |" + " ---: |" * len(marks),
        ]
        for name, m in setting["methods"].items():
            regret = m["mean_regret_points"]
            lines.append(f"| {name} | " + " | ".join(f"{regret[k - 1]:.2f}" for k in marks) + " |")
        gaps = [o["second_best_gap_points"] for o in setting["objectives"]]
        lines += [
            "",
            f"Second-best order trails the best by {min(gaps):.1f}-{max(gaps):.1f} points, so "
            "reaching the target means finding the best order itself.",
            "",
        ]
    if plot:
        lines += [f"![best-so-far curves]({plot})", ""]
    lines += ["## Verdict", "", *report["verdict"], ""]
    return "\n".join(lines)


def _verdict(settings: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    four = next((s for s in settings if s["sites"] == 4), None)
    if four is not None:
        for name, m in four["methods"].items():
            if name == RANDOM_SEARCH:
                continue
            meets = m["median_trials_to_target"] <= TARGET_TRIALS
            lines.append(
                f"- 4 sites, {name}: median {m['median_trials_to_target']:g} trials to within "
                f"{100 * TOLERANCE:g} points (target <= {TARGET_TRIALS}: "
                f"{'met' if meets else 'missed'}; met on {m['objectives_meeting_target']}/"
                f"{len(four['objective_seeds'])} objectives); mean best-so-far "
                f"{'at or above' if m['at_or_above_random_every_trial'] else 'not always above'}"
                " random search"
            )
    for setting in settings:
        if setting["sites"] == 4:
            continue
        random_regret = setting["methods"][RANDOM_SEARCH]["mean_regret_points"][-1]
        for name, m in setting["methods"].items():
            if name == RANDOM_SEARCH:
                continue
            lines.append(
                f"- {setting['sites']} sites, {name}: mean regret after {setting['trials']} "
                f"trials {m['mean_regret_points'][-1]:.2f} points vs {random_regret:.2f} for "
                f"random search; median trials to target {m['median_trials_to_target']:g} vs "
                f"{setting['methods'][RANDOM_SEARCH]['median_trials_to_target']:g}"
            )
    return lines


def _plot(report: dict[str, Any], out: Path) -> bool:
    """Best-so-far curves per method and site count; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = report["settings"]
    figure, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        for name, m in setting["methods"].items():
            curve = m["mean_regret_points"]
            axis.plot(range(1, len(curve) + 1), curve, label=name)
        axis.axhline(100 * TOLERANCE, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"{setting['sites']} sites")
        axis.set_xlabel("trials")
        axis.set_ylabel("mean regret (points below best)")
        axis.set_yscale("symlog", linthresh=1.0)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 objective, 3 seeds, few trials")
    parser.add_argument(
        "--n-startup-trials",
        type=int,
        help="TPE's random start (default: the study's, one per site within [3, 10])",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ordering").setLevel(logging.WARNING)
    started = time.perf_counter()
    settings = [run_setting(s, args.n_startup_trials) for s in _settings(args.quick)]
    report: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/ordering_search.py",
                                                                 *(argv or sys.argv[1:])]),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "optuna": optuna.__version__,
        "quick": args.quick,
        "target_trials": TARGET_TRIALS,
        "settings": settings,
        "verdict": _verdict(settings),
        "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot = "ordering_search.png" if _plot(report, args.out_dir / "ordering_search.png") else None
    (args.out_dir / "ordering_search.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(report, plot)
    (args.out_dir / "ordering_search.md").write_text(markdown)
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
