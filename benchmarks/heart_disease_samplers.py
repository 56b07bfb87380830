"""Which sampler, and is pruning worth it? Measured on the real objective (issue 17, item 4).

Fed-Heart-Disease, the forgetting-control space of ``heart_disease_paired.py --controls``
(1-4 cycles splitting each site's visit budget, per-hop learning-rate decay, proximal term,
consolidation cycle), 3-fold CV inside each centre's training rows with per-fold normalisers
(``global``) or each centre's own (``per-site``), the in-process twin; the objective is the
mean CV accuracy over centres, as ``heart_disease_paired.py`` optimises it. Every sampler gets
the same trial budget on the same resampled splits (paired by split; splits 200+ by default,
never the 0-9 that ``heart_disease_paired.py`` reports on). At each budget (``--budgets``) the
best trial so far is selected on CV and scored once on the split's test rows. No seed order is
enqueued and no forgetting limit applies: the measurement is of the samplers alone.

* ``random``: random search (the comparator every row is paired with);
* ``tpe``: Baton's default (multivariate TPE, 3 random start-up trials, default encoding);
* ``tpe-startup5``: the same with 5 start-up trials (half of a 10-trial budget);
* ``tpe-group``: multivariate TPE with ``group=True`` (models each conditional sub-space, here
  the per-cycle order parameters, jointly), 3 start-up trials;
* ``gp``: Optuna's Gaussian-process sampler, 3 start-up trials, default encoding;
* ``cmaes``: CMA-ES over random keys for the order, 3 start-up trials;
* ``qmc``: scrambled Sobol over random keys.

Pruning at equal compute (``--pruning``): ``tpe`` again with a stage-keyed median pruner on the
twin's per-cycle CV values (``tpe-pruned``: Baton's default ``PruningSettings()``;
``tpe-pruned2``: 2 comparable trials before pruning, the default since session 7) or on its
per-hop CV values (``tpe-pruned2-hop``: the twin reports, and the pruner may stop, after every
hop), run until it has trained as many hops as ``tpe`` did at each budget (hops = fold x site
visits actually trained, pruned trials' partial runs included); it is selected and tested at
the hop counts where ``tpe`` was at 10 and 20 trials.

    nice -n 19 .venv/bin/python benchmarks/heart_disease_samplers.py --splits 10 --jobs 2
    .venv/bin/python benchmarks/heart_disease_samplers.py --quick        # smoke run

Writes benchmarks/results/<name>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from _harness import report_head
from heart_disease import DEFAULT_DATA, SITES, _register_sites
from heart_disease_paired import (
    _WORKER,
    COLLAPSED_KEY,
    RESULTS_DIR,
    TEST_FORGETTING_KEY,
    TwinExecutor,
    _final_sequential,
    _init_worker,
    paired_summary,
    plan_key,
    resample_split,
    search_space,
)

from ordering import (
    DEFAULT_PRUNING,
    CandidatePlan,
    OrderingStudy,
    PlanFailed,
    PruningSettings,
    Reporter,
    SamplerName,
    TrialOutcome,
    TrialRecord,
    cycle_end_steps,
)

logger = logging.getLogger("benchmarks.heart_disease_samplers")

SETTINGS = ("per-site", "global")
BASELINE = "random"
UNPRUNED = "tpe"


@dataclass(frozen=True)
class Variant:
    """One searcher of the comparison."""

    sampler: SamplerName
    encoding: str = "auto"
    n_startup_trials: int = 3
    group: bool = False  # multivariate TPE with group=True (not a named sampler of the study)
    pruning: PruningSettings | None = None
    per_hop: bool = False  # the twin reports (and the pruner may stop) after every hop


SAMPLERS: dict[str, Variant] = {
    "random": Variant("random"),
    "tpe": Variant("tpe"),
    "tpe-startup5": Variant("tpe", n_startup_trials=5),
    "tpe-group": Variant("tpe", group=True),
    "gp": Variant("gp"),
    "cmaes": Variant("cmaes", encoding="random-keys"),
    "qmc": Variant("qmc", encoding="random-keys"),
}
PRUNED: dict[str, Variant] = {
    "tpe-pruned": Variant("tpe", pruning=DEFAULT_PRUNING),
    "tpe-pruned2": Variant("tpe", pruning=PruningSettings(percentile=50.0, n_startup_trials=2)),
    "tpe-pruned2-hop": Variant(
        "tpe", pruning=PruningSettings(percentile=50.0, n_startup_trials=2), per_hop=True
    ),
}


class _GroupTPEStudy(OrderingStudy):
    """An OrderingStudy whose TPE models each conditional sub-space jointly (``group=True``)."""

    def _new_sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(
            seed=self._seed,
            n_startup_trials=self._n_startup_trials,
            multivariate=True,
            group=True,
            warn_independent_sampling=False,
        )


class HopCounter:
    """Wraps the twin executor and counts hops trained (folds x visits run, whether the twin
    reports after each cycle or after each hop)."""

    def __init__(self, inner: TwinExecutor) -> None:
        self.inner = inner
        self.hops = 0

    def execute(self, plan: CandidatePlan, *, budget: float, report: Reporter) -> TrialOutcome:
        ends = cycle_end_steps(plan)
        done = 0  # hops of this plan trained so far

        def counted(cycle: int, value: float, *, hop: int | None = None) -> None:
            nonlocal done
            reached = ends[cycle] + 1 if hop is None else hop + 1
            self.hops += self.inner.folds * max(0, reached - done)
            done = max(done, reached)
            if hop is None:
                report(cycle, value)
            else:
                report(cycle, value, hop=hop)

        return self.inner.execute(plan, budget=budget, report=counted)


def _selected(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The best completed trial (no forgetting limit), first one on ties."""
    complete = [r for r in records if r.state == "COMPLETE" and r.value is not None]
    return max(complete, key=lambda r: r.value or 0.0) if complete else None


def trials_at_hops(curve: Sequence[Mapping[str, Any]], hops: int) -> int:
    """The first trial count at which a study's curve has trained ``hops`` hops (all of its
    trials if it never did)."""
    return next((i + 1 for i, point in enumerate(curve) if point["hops"] >= hops), len(curve))


def replay_pruning(
    curve: Sequence[Mapping[str, Any]], n_startup_trials: int, percentile: float = 50.0
) -> list[int | None]:
    """Which of an unpruned study's trials a stage-keyed percentile pruner would have stopped,
    and after which cycle (None: run to the end), replaying its recorded per-cycle values in
    trial order the way ``StagePruner(PercentilePruner(...))`` decides (maximising): a trial is
    compared only with earlier completed, unpruned trials of its own cycle count, from
    ``n_startup_trials`` of them on; after cycle c (not the last) it is stopped when the best
    value it reported so far is below the ``percentile`` of their values at cycle c.

    A counterfactual: the sampler would have seen the pruned trials as pruned and proposed
    differently afterwards; it tells how much compute the pruner saves and whether it would
    have stopped the selected trial.
    """
    completed: dict[int, list[list[float]]] = {}
    decisions: list[int | None] = []
    for point in curve:
        stage, values = point.get("cycles"), point.get("intermediate") or []
        decision: int | None = None
        peers = completed.get(stage, []) if stage is not None else []
        if stage is not None and len(peers) >= n_startup_trials:
            for cycle in range(min(len(values), stage - 1)):
                at_cycle = [p[cycle] for p in peers if len(p) > cycle]
                if at_cycle and max(values[: cycle + 1]) < float(
                    np.percentile(at_cycle, 100.0 - percentile)
                ):
                    decision = cycle
                    break
        decisions.append(decision)
        if decision is None and point.get("value") is not None and stage is not None:
            completed.setdefault(stage, []).append(list(values))
    return decisions


def _replayed(curve: Sequence[Mapping[str, Any]], budget: int, n_startup: int) -> dict[str, Any]:
    points = list(curve[:budget])
    decisions = replay_pruning(points, n_startup)
    full = sum(sum(p.get("cycle_hops") or []) for p in points)
    spent = sum(
        sum((p.get("cycle_hops") or [])[: (len(p.get("cycle_hops") or []) if d is None else d + 1)])
        for p, d in zip(points, decisions, strict=True)
    )
    kept = [p["value"] for p, d in zip(points, decisions, strict=True)
            if d is None and p.get("value") is not None]  # fmt: skip
    best = max((p["value"] for p in points if p.get("value") is not None), default=None)
    return {
        "pruned": sum(d is not None for d in decisions),
        "hops_saved_share": 1.0 - spent / full if full else 0.0,
        "best_kept": best is not None and bool(kept) and max(kept) >= best,
    }


def _study(name: str, variant: Variant, split: int, config: Mapping[str, Any]) -> OrderingStudy:
    space = search_space(split, config["cycles"], config["max_steps"], controls=True)
    cls = _GroupTPEStudy if variant.group else OrderingStudy
    return cls.create(
        None,
        f"{name}-{split}",
        space,
        variant.encoding,
        "mean",
        seed=split,
        sampler=variant.sampler,
        pruning=variant.pruning,
        n_startup_trials=variant.n_startup_trials,
    )


def _search(
    name: str,
    variant: Variant,
    setting: str,
    split: int,
    config: Mapping[str, Any],
    stop: Callable[[int, int], bool],
) -> tuple[list[TrialRecord], list[dict[str, Any]], float]:
    """Runs one study a trial at a time until ``stop(trials, hops)``; the curve holds the hops
    and best CV so far after every trial."""
    datasets = resample_split(_WORKER["datasets"], split)
    executor = HopCounter(
        TwinExecutor(
            _WORKER["trainer"], setting, datasets, config["folds"], per_hop=variant.per_hop
        )
    )
    study = _study(name, variant, split, config)
    records: list[TrialRecord] = []
    curve: list[dict[str, Any]] = []
    started = time.process_time()
    while not stop(len(records), executor.hops):
        records += study.optimize(executor, 1, catch=(PlanFailed,))
        best = _selected(records)
        last = records[-1]
        curve.append(
            {
                "trial": len(records),
                "hops": executor.hops,
                "steps": executor.inner.steps_run,
                "best_cv": None if best is None else best.value,
                "state": last.state,
                "cycles": None if last.plan is None else last.plan.cycles,
                "cycle_hops": []
                if last.plan is None
                else [config["folds"] * len(c) for c in last.plan.cycle_hops()],
                "intermediate": [v for _, v in sorted(last.intermediate)],
                "hop_values": [v for _, v in sorted(last.hop_values)],
                "value": last.value if last.state == "COMPLETE" else None,
            }
        )
    return records, curve, time.process_time() - started


def centre_mean(scores: Mapping[str, float]) -> float:
    """Test Avg: the unweighted mean of the four centres' test accuracies (and nothing else
    ``_final_sequential`` reports beside them, such as forgetting on other scales)."""
    missing = [site for site in SITES if site not in scores]
    if missing:
        raise ValueError(f"no test accuracy for {', '.join(missing)}")
    return statistics.fmean(scores[site] for site in SITES)


def _recompute_test_avg(cells: Sequence[Mapping[str, Any]]) -> None:
    """Re-derives every test Avg from its centres' accuracies (reports written before the
    forgetting scales were split off averaged those in too)."""
    for cell in cells:
        for sampler in cell["samplers"].values():
            for at in sampler["at"].values():
                if "site_test" in at:
                    at["test_avg"] = centre_mean(at["site_test"])


def _tested(setting: str, split: int, chosen: TrialRecord | None, cache: dict[str, Any]) -> Any:
    if chosen is None or chosen.plan is None:
        return None
    key = plan_key(chosen.plan)
    if key not in cache:
        datasets = resample_split(_WORKER["datasets"], split)
        scores = _final_sequential(_WORKER["trainer"], setting, datasets, chosen.plan)
        collapsed = scores.pop(COLLAPSED_KEY, None)
        forgetting = scores.pop(TEST_FORGETTING_KEY, None)
        cache[key] = {
            "test_avg": centre_mean(scores),
            "site_test": {site: scores[site] for site in SITES},
            "test_other": {k: v for k, v in scores.items() if k not in SITES},
            "test_collapsed": collapsed,
            "test_worst_forgetting": forgetting,
            "cv": chosen.value,
            "plan": chosen.plan.describe(),
        }
    return cache[key]


def run_cell(setting: str, split: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """Every sampler (and pruned variant) on one split in one setting."""
    started = time.process_time()
    budgets: list[int] = config["budgets"]
    cache: dict[str, Any] = {}
    out: dict[str, Any] = {"setting": setting, "split": split, "samplers": {}}
    for name in config["samplers"]:
        records, curve, cpu = _search(
            name,
            SAMPLERS[name],
            setting,
            split,
            config,
            lambda trials, hops: trials >= max(budgets),
        )
        out["samplers"][name] = {
            "curve": curve,
            "cpu_seconds": cpu,
            "failed": sum(1 for r in records if r.state == "FAIL"),
            "at": {
                str(b): {
                    "hops": curve[b - 1]["hops"],
                    **(_tested(setting, split, _selected(records[:b]), cache) or {}),
                }
                for b in budgets
            },
        }
    if UNPRUNED in out["samplers"]:
        curve = out["samplers"][UNPRUNED]["curve"]
        out["samplers"][UNPRUNED]["replay"] = {
            f"{name}@{b}": _replayed(curve, b, variant.pruning.n_startup_trials)
            for name, variant in PRUNED.items()
            if variant.pruning is not None and not variant.per_hop  # the replay is per cycle
            for b in budgets
        }
    if config["pruning"] and UNPRUNED in out["samplers"]:
        reference = out["samplers"][UNPRUNED]["at"]
        compared = [b for b in budgets if b <= config["pruning_budget"]] or budgets[:1]
        targets = {b: reference[str(b)]["hops"] for b in compared}
        cap = 4 * max(compared)
        for name in config["pruning"]:
            records, curve, cpu = _search(
                name,
                PRUNED[name],
                setting,
                split,
                config,
                lambda trials, hops: hops >= max(targets.values()) or trials >= cap,
            )
            at: dict[str, Any] = {}
            for b in compared:
                n = trials_at_hops(curve, targets[b])
                at[str(b)] = {
                    "hops": curve[n - 1]["hops"],
                    "trials": n,
                    **(_tested(setting, split, _selected(records[:n]), cache) or {}),
                }
            out["samplers"][name] = {
                "curve": curve,
                "cpu_seconds": cpu,
                "failed": sum(1 for r in records if r.state == "FAIL"),
                "pruned": sum(1 for r in records if r.state == "PRUNED"),
                "at": at,
            }
    out["cpu_seconds"] = time.process_time() - started
    logger.info(
        "[%s] split %d in %.0f CPU s: %s",
        setting,
        split,
        out["cpu_seconds"],
        ", ".join(
            f"{n} {s['at'][max(s['at'], key=int)].get('test_avg', float('nan')):.3f}"
            for n, s in out["samplers"].items()
        ),
    )
    return out


def _cell_worker(args: tuple[str, int, Mapping[str, Any]]) -> dict[str, Any]:
    return run_cell(*args)


# ---- summary ------------------------------------------------------------------------------------


def summarise(cells: Sequence[Mapping[str, Any]], budgets: Sequence[int]) -> dict[str, Any]:
    """Per setting, sampler and budget: means, and paired differences against random search
    (pruned variants: against unpruned TPE at equal hops too)."""
    out: dict[str, Any] = {}
    for setting in SETTINGS:
        rows = sorted((c for c in cells if c["setting"] == setting), key=lambda c: c["split"])
        if not rows:
            continue
        names = list(dict.fromkeys(n for c in rows for n in c["samplers"]))
        table: dict[str, Any] = {}
        for name in names:
            per_budget: dict[str, Any] = {}
            for b in budgets:
                key = str(b)
                have = [
                    c
                    for c in rows
                    if name in c["samplers"]
                    and "test_avg" in c["samplers"][name]["at"].get(key, {})
                ]
                if not have:
                    continue
                entry: dict[str, Any] = {
                    "splits": len(have),
                    "test_avg": statistics.fmean(
                        c["samplers"][name]["at"][key]["test_avg"] for c in have
                    ),
                    "cv": statistics.fmean(c["samplers"][name]["at"][key]["cv"] for c in have),
                    "hops": statistics.fmean(c["samplers"][name]["at"][key]["hops"] for c in have),
                }
                for against in (BASELINE, UNPRUNED):
                    if name == against:
                        continue
                    pairs = [
                        c
                        for c in have
                        if against in c["samplers"]
                        and "test_avg" in c["samplers"][against]["at"].get(key, {})
                    ]
                    if len(pairs) < 2:
                        continue
                    for metric in ("test_avg", "cv"):
                        entry[f"{metric}_vs_{against}"] = paired_summary(
                            [
                                c["samplers"][name]["at"][key][metric]
                                - c["samplers"][against]["at"][key][metric]
                                for c in pairs
                            ]
                        )
                per_budget[key] = entry
            table[name] = {
                "budgets": per_budget,
                "cpu_seconds": statistics.fmean(
                    c["samplers"][name]["cpu_seconds"] for c in rows if name in c["samplers"]
                ),
                "failed": sum(c["samplers"][name]["failed"] for c in rows if name in c["samplers"]),
                "pruned": sum(
                    c["samplers"][name].get("pruned", 0) for c in rows if name in c["samplers"]
                ),
                "trials": statistics.fmean(
                    len(c["samplers"][name]["curve"]) for c in rows if name in c["samplers"]
                ),
            }
        replays = [c["samplers"][UNPRUNED]["replay"] for c in rows
                   if "replay" in c["samplers"].get(UNPRUNED, {})]  # fmt: skip
        if replays and UNPRUNED in table:
            table[UNPRUNED]["replay"] = {
                key: {
                    "splits": len(replays),
                    "pruned": statistics.fmean(r[key]["pruned"] for r in replays),
                    "hops_saved_share": statistics.fmean(
                        r[key]["hops_saved_share"] for r in replays
                    ),
                    "best_kept": sum(r[key]["best_kept"] for r in replays),
                }
                for key in replays[0]
            }
        out[setting] = table
    return out


def _interval(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "—"
    return (
        f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}], p={p['wilcoxon_p']:.2f}, "
        f"{p['wins']}/{p['ties']}/{p['losses']}"
    )


def markdown(report: Mapping[str, Any]) -> str:
    config = report["config"]
    budgets = config["budgets"]
    lines = [
        "# Samplers and pruning on the real objective: Fed-Heart-Disease, forgetting controls",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}; "
        f"wall {report['wall_seconds'] / 60:.1f} min, {report['cpu_seconds'] / 60:.1f} CPU min "
        f"(searches and test runs, all workers) with {config['jobs']} worker(s) at nice 19 on "
        f"a shared machine. Splits {report['splits']} (never the 0-9 of "
        f"heart_disease_paired.py), {config['folds']}-fold CV with per-fold normalisers, mean "
        "accuracy over centres as the objective, no seed order, no forgetting limit. At each "
        "budget the best CV trial so far is tested once: test Avg = unweighted mean of the "
        "centres' test accuracies. Differences are sampler minus random search at the same "
        "trial budget, paired by split: mean [95% t-interval over splits], Wilcoxon p, "
        "wins/ties/losses. Hops = fold x site visits trained, summed over the study's trials.",
        "",
    ]
    for setting, table in report["summary"].items():
        lines += [f"## Normalisation: {setting}", ""]
        for b in budgets:
            key = str(b)
            lines += [
                f"### {b} trials",
                "",
                "| sampler | splits | CV (selected) | CV - random | test Avg | test - random "
                "| test - tpe | hops | CPU s per study |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for name, s in table.items():
                if name in PRUNED or key not in s["budgets"]:
                    continue
                e = s["budgets"][key]
                lines.append(
                    f"| {name} | {e['splits']} | {e['cv']:.3f} | "
                    f"{_interval(e.get('cv_vs_' + BASELINE))} | {e['test_avg']:.3f} | "
                    f"{_interval(e.get('test_avg_vs_' + BASELINE))} | "
                    f"{_interval(e.get('test_avg_vs_' + UNPRUNED))} | {e['hops']:.0f} | "
                    f"{s['cpu_seconds']:.0f} |"
                )
            lines.append("")
        replay = table.get(UNPRUNED, {}).get("replay")
        if replay:
            lines += [
                "### Pruning replayed on unpruned TPE's own trials (counterfactual)",
                "",
                "Each pruner's decisions replayed on the per-cycle CV values TPE's trials "
                "reported (a trial is compared only with earlier completed trials of its own "
                "cycle count), at equal trials: how many it would stop, the share of hops it "
                "would save, and in how many splits the selected (best CV) trial survives.",
                "",
                "| pruner @ trials | splits | trials pruned (mean) | hops saved | best trial "
                "kept |",
                "|---|---|---|---|---|",
            ]
            for key, r in replay.items():
                lines.append(
                    f"| {key} | {r['splits']} | {r['pruned']:.1f} | "
                    f"{100 * r['hops_saved_share']:.0f}% | {r['best_kept']}/{r['splits']} |"
                )
            lines.append("")
        pruned = [n for n in table if n in PRUNED]
        if pruned:
            lines += [
                "### Pruning at equal compute (hops of unpruned TPE at each budget)",
                "",
                "| searcher | at tpe's hops of | splits | trials run | hops | CV (selected) "
                "| CV - tpe | test Avg | test - tpe | pruned trials (all splits) |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for name in [UNPRUNED, *pruned]:
                s = table[name]
                for b in budgets:
                    e = s["budgets"].get(str(b))
                    if e is None:
                        continue
                    trials = statistics.fmean(
                        c["samplers"][name]["at"].get(str(b), {}).get("trials", b)
                        for c in report["cells"]
                        if c["setting"] == setting and name in c["samplers"]
                    )
                    lines.append(
                        f"| {name} | {b} trials | {e['splits']} | {trials:.1f} | "
                        f"{e['hops']:.0f} | {e['cv']:.3f} | "
                        f"{_interval(e.get('cv_vs_' + UNPRUNED))} | {e['test_avg']:.3f} | "
                        f"{_interval(e.get('test_avg_vs_' + UNPRUNED))} | {s['pruned']} |"
                    )
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], out: Path) -> bool:
    """Best CV so far minus random search's, mean over splits, against trials (samplers) and
    against hops (pruned and unpruned TPE)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = list(report["summary"])
    if not settings:
        return False
    figure, axes = plt.subplots(2, len(settings), figsize=(6.5 * len(settings), 8), squeeze=False)
    for column, setting in enumerate(settings):
        cells = [c for c in report["cells"] if c["setting"] == setting]
        axis = axes[0][column]
        for name in SAMPLERS:
            runs = [c for c in cells if name in c["samplers"] and BASELINE in c["samplers"]]
            if not runs:
                continue
            n = min(len(c["samplers"][name]["curve"]) for c in runs)
            ys = []
            for t in range(n):
                diffs = [
                    (c["samplers"][name]["curve"][t]["best_cv"] or 0.0)
                    - (c["samplers"][BASELINE]["curve"][t]["best_cv"] or 0.0)
                    for c in runs
                ]
                ys.append(statistics.fmean(diffs))
            axis.plot(range(1, n + 1), ys, marker="o", markersize=3, label=name)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_title(f"{setting}: best CV so far - random search's (mean over splits)")
        axis.set_xlabel("trials")
        axis.legend(fontsize=8)
        axis = axes[1][column]
        for name in (UNPRUNED, *PRUNED):
            runs = [c for c in cells if name in c["samplers"]]
            for index, c in enumerate(runs):
                curve = c["samplers"][name]["curve"]
                axis.plot(
                    [p["hops"] for p in curve],
                    [p["best_cv"] or 0.0 for p in curve],
                    color=f"C{[UNPRUNED, *PRUNED].index(name)}",
                    alpha=0.35,
                    label=name if index == 0 else None,
                )
        axis.set_title(f"{setting}: best CV so far against hops trained, per split")
        axis.set_xlabel("hops (fold x visits)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return True


def _write(report: dict[str, Any], out: Path, name: str) -> None:
    _recompute_test_avg(report["cells"])
    report["summary"] = summarise(report["cells"], report["config"]["budgets"])
    report["cpu_seconds"] = sum(c["cpu_seconds"] for c in report["cells"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_HEART_DISEASE_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--first-split", type=int, default=200)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=2, help="the space has 1 to 2x cycles")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--pruning", nargs="*", default=list(PRUNED), choices=list(PRUNED))
    parser.add_argument(
        "--pruning-budget",
        type=int,
        default=None,
        help="run the pruned searches to unpruned TPE's hops at this trial budget (default: "
        "the largest budget)",
    )
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 split, budgets 3 and 5, 2 folds")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="heart_disease_samplers")
    parser.add_argument("--render", type=Path, help="re-render an existing JSON report")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        _write(report, args.render.parent, args.render.stem)
        print(markdown(report))
        return 0
    if args.quick:
        args.splits, args.budgets, args.folds, args.max_steps = 1, [3, 5], 2, 20
    if sorted(args.budgets) != args.budgets or args.budgets[0] < 1:
        parser.error("--budgets must be increasing positive trial counts")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="baton-heart-samplers-"))
    out = args.out or (work / "results" if args.quick else RESULTS_DIR)
    site_dirs = _register_sites(args.data, work)
    samplers = list(dict.fromkeys([BASELINE, UNPRUNED, *args.samplers]))
    config: dict[str, Any] = {
        "budgets": args.budgets,
        "folds": args.folds,
        "cycles": args.cycles,
        "max_steps": args.max_steps,
        "samplers": samplers,
        "pruning": args.pruning,
        "pruning_budget": args.pruning_budget or max(args.budgets),
        "jobs": args.jobs,
    }
    splits = list(range(args.first_split, args.first_split + args.splits))
    report: dict[str, Any] = {
        **report_head(argv, f"torch {torch.__version__}", f"optuna {optuna.__version__}"),
        "splits": splits,
        "config": config,
        "cells": [],
    }
    # Setting by setting (per-site first: there the order matters), so a run cut short still
    # leaves one setting's paired tables over every split.
    wanted = [(setting, split, config) for setting in args.settings for split in splits]
    if args.jobs > 1:
        with ProcessPoolExecutor(
            args.jobs, initializer=_init_worker, initargs=(site_dirs,)
        ) as pool:
            for cell in pool.map(_cell_worker, wanted):
                report["cells"].append(cell)
                report["wall_seconds"] = time.perf_counter() - started
                _write(report, out, args.name)
    else:
        _init_worker(site_dirs)
        for item in wanted:
            report["cells"].append(_cell_worker(item))
            report["wall_seconds"] = time.perf_counter() - started
            _write(report, out, args.name)
    report["wall_seconds"] = time.perf_counter() - started
    _write(report, out, args.name)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
