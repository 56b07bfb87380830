"""Fed-Heart-Disease: how much of the selected schedule's worst-site forgetting is real, and
does a final aggregation step reduce it (issue 17 item 3, session 9)?

For each (setting, split) this runs Baton's search exactly as ``heart_disease_paired.py`` does
(TPE, the size-ordered seed, the hd8 space with ``--controls``, k-fold CV inside the training
rows) and then, on the split's test rows:

1. **The estimator.** For the selected schedule (best CV, and the rule
   ``accuracy-within:0.03``) every post-visit model and the final model are scored row by row.
   Worst-site forgetting is reported on accuracy (the target's scale), on the mean probability
   of the true class (points, smooth) and on log-loss (nats), and the drop expected from test
   noise alone: a paired bootstrap of each site's test rows under the null "every post-visit
   model is as good as the final one" (each visit's per-row difference to the final model
   centred on its mean), whose statistic is the same max over visits and sites. Its mean is
   the upward bias of a peak over a few noisy scores on the same rows; ``p`` is the share of
   null draws at or above the observed value.
2. **Final aggregation** (the mechanisms), each both applied to the default selection
   (post hoc) and searched (the CV objective scores the mechanism's final model, so the
   selection sees it):

   * ``avg``: the final model is the examples-weighted average of the last cycle's post-visit
     adapters (the consolidation cycle's, with ``--controls``): no step trained beyond the plan;
   * ``fed``: one FedAvg round from the sequential model (Flower's FedAvg via
     ``site_agent.simulation.train_fedavg``), each site training the last cycle's hop
     hyperparameters in parallel: one extra round of the last cycle's steps.

   Forgetting of a mechanism's final model is measured from the same post-visit peaks (for
   ``fed``, the round's local updates are visits too and count in the peaks).
   ``(c)`` is the searched mechanism selected by a CV forgetting rule.

Development splits only (500 onwards by default); the reported splits of sessions 7-8 (0-29)
are never run here.

    nice -n 19 .venv/bin/python benchmarks/heart_disease_forgetting.py --first-split 500 \
        --splits 12 --jobs 2 --name forget9-dev
    .venv/bin/python benchmarks/heart_disease_forgetting.py --quick      # smoke run
    .venv/bin/python benchmarks/heart_disease_forgetting.py --render results/forget9-dev.json

Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from heart_disease import SITES, _register_sites
from heart_disease_paired import (
    _WORKER,
    RESULTS_DIR,
    TwinExecutor,
    _base_spec,
    _init_worker,
    _spec_for,
    choose,
    loss_forgetting,
    paired_summary,
    plan_cycles,
    plan_key,
    resample_split,
    search_space,
)

from ordering import CandidatePlan, OrderingStudy, PlanFailed, Reporter, TrialOutcome
from ordering import SiteScore as _SiteScore
from site_agent.registry import RegisteredDataset
from site_agent.simulation import (
    CrossValidationResult,
    HopRecord,
    SequentialResult,
    cross_validate,
    evaluate_sites,
    train_fedavg,
    train_sequential,
)
from site_agent.tasks import HopHyperparameters as SiteHyperparameters
from site_agent.tasks import TabularTrainer, TaskSpec, _tabular

logger = logging.getLogger("benchmarks.heart_disease_forgetting")

FINALS = ("seq", "avg", "fed")
SELECTIONS = {"best": "best", "rule": "accuracy-within:0.03", "penalty": "accuracy-penalty:0.5"}
BOOTSTRAP = 1000
TARGET = 0.02
Cycles = list[list[tuple[str, SiteHyperparameters]]]
Tensors = dict[str, torch.Tensor]


# ---- the mechanisms ---------------------------------------------------------------------------


def weighted_average(
    models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Tensors:
    """The examples-weighted average of `models` (FedAvg's aggregate of those updates)."""
    if not models or len(models) != len(weights) or sum(weights) <= 0:
        raise ValueError("need as many positive weights as models, at least one")
    total = float(sum(weights))
    return {
        key: sum((w / total) * m[key].double() for m, w in zip(models, weights, strict=True)).to(
            models[0][key].dtype
        )
        for key in models[0]
    }


@dataclasses.dataclass
class Trained:
    """A plan trained under one final mechanism: the final tensors and every visit's model."""

    tensors: Tensors
    visits: list[tuple[str, Tensors, HopRecord]]  # (site, model after the visit, its record)


def train_plan(
    trainer: TabularTrainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    cycles: Cycles,
    final: str,
) -> Trained:
    """`cycles` trained sequentially, then the final mechanism (``seq``: none)."""
    by_name = {d.name: d for d in datasets}
    tensors: Tensors | None = None
    visits: list[tuple[str, Tensors, HopRecord]] = []
    for cycle in cycles:
        for site, hp in cycle:
            result = train_sequential(trainer, spec, [(by_name[site], hp)], incoming=tensors)
            tensors = result.tensors
            visits.append((site, tensors, result.visits[0]))
    assert tensors is not None
    last = cycles[-1]
    if final == "seq":
        return Trained(tensors, visits)
    if final == "avg":
        models = [v[1] for v in visits[-len(last) :]]
        weights = [float(len(by_name[site].train)) for site, _ in last]
        return Trained(weighted_average(models, weights), visits)
    if final == "fed":
        hps = dict(last)
        members = [by_name[site] for site, _ in last]
        sequential = tensors
        fed = train_fedavg(trainer, spec, members, rounds=1, initial=sequential,
                           hyperparameters=lambda round_, site: hps[site])  # fmt: skip
        # The round's local updates are visits too (their peaks count): trained again the
        # way a client does, from the same sequential model with the same settings.
        for site, hp in last:
            outcome = trainer.run_hop(spec, by_name[site], hp, sequential)
            visits.append((site, outcome.tensors, HopRecord(site, dict(outcome.metrics))))
        return Trained(fed.tensors, visits)
    raise ValueError(f"unknown final mechanism {final!r}: use one of {', '.join(FINALS)}")


class FinalExecutor(TwinExecutor):
    """`TwinExecutor` whose CV scores the plan's final model under a final mechanism."""

    def __init__(self, *args: Any, final: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.final = final

    def execute(self, plan: CandidatePlan, *, budget: float, report: Reporter) -> TrialOutcome:
        started = time.perf_counter()
        cycles = plan_cycles(plan)
        spec_for = _spec_for(self.setting)

        def train(views: Sequence[RegisteredDataset]) -> SequentialResult:
            trained = train_plan(self.trainer, spec_for(views), views, cycles, self.final)
            self.steps_run += sum(hp.steps for cycle in cycles for _, hp in cycle)
            # CV forgetting counts the sequential visits (the peaks a search sees per hop).
            sequential = [v[2] for v in trained.visits[: sum(len(c) for c in cycles)]]
            return SequentialResult(trained.tensors, tuple(sequential))

        try:
            cv = cross_validate(self.trainer, _base_spec(self.setting),
                                list(self.datasets),
                                self.folds, train, evaluation_spec=spec_for)  # fmt: skip
        except ValueError as exc:
            if "diverged" in str(exc):
                raise PlanFailed(f"diverged: {exc}") from exc
            raise
        self.audit[plan_key(plan)] = {
            "repeat_cv": [cv.mean["accuracy"]],
            "repeat_forgetting": [max(cv.forgetting().values(), default=0.0)],
            "loss_forgetting": loss_forgetting(cv),
        }
        report(len(cycles) - 1, cv.mean["accuracy"])
        return _outcome(cv, time.perf_counter() - started)


def _outcome(cv: CrossValidationResult, seconds: float) -> TrialOutcome:
    return TrialOutcome(
        tuple(
            _SiteScore(s, m["accuracy"], int(m["examples"]), cv.folds) for s, m in cv.sites.items()
        ),
        {"in-process": seconds},
        visit_scores=cv.visit_scores(),
        failure_reason=cv.failure_reason,
    )


# ---- row-level test scores and the estimator ---------------------------------------------------


def row_scores(
    trainer: TabularTrainer,
    spec: TaskSpec,
    tensors: Mapping[str, torch.Tensor],
    dataset: RegisteredDataset,
) -> list[tuple[float, float]]:
    """(correct, log-loss) of every test row: the trainer's own evaluation (model, normaliser
    from the site's training rows, loss, 0.5 threshold) kept row by row. `test_report` checks
    the rows' means against ``Trainer.evaluate``."""
    n_features = _tabular._feature_count(dataset)
    model = trainer._model(spec, n_features, seed=0)
    _tabular._load(model, tensors)
    train_rows = _tabular._tabular_examples(dataset, "train", n_features)
    normaliser = trainer._normaliser(spec, train_rows, n_features)
    rows = _tabular._tabular_examples(dataset, "test", n_features)
    targets = _tabular._targets(rows, spec.labels)
    with torch.inference_mode():
        logit = model(normaliser(_tabular._matrix(rows)))[:, 0]
        losses = torch.nn.functional.softplus(logit) - targets.to(logit.dtype) * logit
        correct = ((torch.sigmoid(logit) > 0.5).long() == targets).double()
    return list(zip(correct.tolist(), losses.double().tolist(), strict=True))


def forgetting_figures(
    visits: Sequence[tuple[str, list[tuple[float, float]]]],
    final: Mapping[str, list[tuple[float, float]]],
    seed: int,
    draws: int = BOOTSTRAP,
) -> dict[str, Any]:
    """Worst-site forgetting on accuracy, on the mean probability of the true class and on
    log-loss, with the accuracy drop expected from test noise alone (see the module doc)."""

    def mean(values: Sequence[float]) -> float:
        return statistics.fmean(values)

    per_site: dict[str, dict[str, float]] = {}
    diffs: dict[str, list[list[float]]] = {}  # site -> per visit, per row: visit - final correct
    for site, rows in visits:
        fin = final[site]
        entry = per_site.setdefault(site, {"acc": -math.inf, "p": -math.inf, "loss": math.inf})
        entry["acc"] = max(entry["acc"], mean([c for c, _ in rows]))
        entry["p"] = max(entry["p"], mean([math.exp(-x) for _, x in rows]))
        entry["loss"] = min(entry["loss"], mean([x for _, x in rows]))
        diffs.setdefault(site, []).append([c - f for (c, _), (f, _) in zip(rows, fin, strict=True)])
    by_site = {
        site: {
            "acc": e["acc"] - mean([c for c, _ in final[site]]),
            "p": e["p"] - mean([math.exp(-x) for _, x in final[site]]),
            "loss": mean([x for _, x in final[site]]) - e["loss"],
        }
        for site, e in per_site.items()
    }
    worst = max(by_site, key=lambda s: by_site[s]["acc"])
    observed = by_site[worst]["acc"]
    rng = random.Random(seed)
    null, boot = [], []
    for _ in range(draws):
        stat, raw = -math.inf, -math.inf
        for per_visit in diffs.values():
            n = len(per_visit[0])
            idx = [rng.randrange(n) for _ in range(n)]
            for d in per_visit:
                resampled = sum(d[i] for i in idx) / n
                stat = max(stat, resampled - sum(d) / n)  # under the null: centred
                raw = max(raw, resampled)
        null.append(stat)
        boot.append(raw)
    bias = mean(boot) - observed  # the bootstrap's estimate of the peak's upward bias
    return {
        "acc": observed,
        "worst_site": worst,
        "rows_lost": round(observed * len(final[worst])),
        "p_true": max(e["p"] for e in by_site.values()),
        "loss": max(e["loss"] for e in by_site.values()),
        "noise_mean": mean(null),
        "bias": bias,
        "corrected": observed - bias,
        "noise_p": sum(1 for v in null if v >= observed - 1e-12) / draws,
        "by_site": by_site,
    }


def test_report(
    trainer: TabularTrainer,
    setting: str,
    datasets: Sequence[RegisteredDataset],
    plan: CandidatePlan,
    final: str,
    seed: int,
) -> dict[str, Any]:
    """The plan trained on the split's training rows under `final`, scored on test."""
    spec = _spec_for(setting)(datasets)
    by_name = {d.name: d for d in datasets}
    trained = train_plan(trainer, spec, datasets, plan_cycles(plan), final)
    final_rows = {d.name: row_scores(trainer, spec, trained.tensors, d) for d in datasets}
    scores = evaluate_sites(trainer, spec, trained.tensors, datasets, "test")
    for site, rows in final_rows.items():  # the row-by-row scores agree with evaluate
        # Loss to float32 precision: per-site normalisation gives a few extreme logits.
        loss = statistics.fmean(x for _, x in rows)
        if abs(statistics.fmean(c for c, _ in rows) - scores[site]["accuracy"]) > 1e-9 or (
            not math.isclose(loss, scores[site]["loss"], rel_tol=1e-4, abs_tol=1e-5)
        ):
            raise RuntimeError(f"row scores disagree with evaluate at {site}")
    visit_rows = [
        (site, row_scores(trainer, spec, t, by_name[site])) for site, t, _ in trained.visits
    ]
    return {
        "test_avg": statistics.fmean(m["accuracy"] for m in scores.values()),
        "test": {s: m["accuracy"] for s, m in scores.items()},
        "forgetting": forgetting_figures(visit_rows, final_rows, seed),
    }


# ---- one cell -----------------------------------------------------------------------------------


def run_cell(setting: str, split: int, config: Mapping[str, Any]) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer: TabularTrainer = _WORKER["trainer"]
    datasets = resample_split(_WORKER["datasets"], split)
    space = search_space(split, config["cycles"], config["max_steps"], True)
    sizes = {d.name: len(d.train) for d in datasets}
    out: dict[str, Any] = {"setting": setting, "split": split,
                           "test_rows": {d.name: len(d.test) for d in datasets}}  # fmt: skip
    reports: dict[tuple[str, str], dict[str, Any]] = {}
    for study_final in config["finals"]:
        executor: TwinExecutor
        if study_final == "seq":  # exactly the paired benchmark's searched study
            executor = TwinExecutor(trainer, setting, datasets, config["folds"])
        else:
            executor = FinalExecutor(trainer, setting, datasets, config["folds"], final=study_final)
        study = OrderingStudy.create(None, f"{study_final}-{split}", space, "auto", "mean",
                                     seed=split, pruning=None, sampler="tpe")  # fmt: skip
        study.enqueue(tuple(sorted(SITES, key=lambda s: (sizes[s], s))), note="seed: sizes")
        t0 = time.perf_counter()
        records = study.optimize(executor, config["trials"], catch=(PlanFailed,))
        search_seconds = time.perf_counter() - t0
        for selection, rule in SELECTIONS.items():
            chosen = choose(records, executor, rule)
            assert chosen.plan is not None and chosen.value is not None
            # The default study's selection also gets every mechanism post hoc.
            finals = config["post_hoc"] if study_final == "seq" else (study_final,)
            for final in finals:
                key = f"{study_final}-study/{selection}/{final}"
                cached = (plan_key(chosen.plan), final)
                if cached not in reports:
                    reports[cached] = test_report(trainer, setting, datasets, chosen.plan, final,
                                                  split)  # fmt: skip
                out[key] = {
                    "plan": chosen.plan.describe(),
                    "cv": chosen.value,
                    "cv_forgetting": chosen.worst_forgetting,
                    "search_seconds": search_seconds,
                    **reports[cached],
                }
    out["seconds"] = time.perf_counter() - started
    out["cpu_seconds"] = time.process_time() - cpu_started
    logger.info("[%s] split %d in %.0f s", setting, split, out["seconds"])
    return out


# ---- report -------------------------------------------------------------------------------------


def variants(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for cell in cells:
        keys += [k for k in cell if "/" in k and k not in keys]
    return keys


def summarise(
    cells: Sequence[Mapping[str, Any]], default: str = "seq-study/best/seq"
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setting in sorted({c["setting"] for c in cells}):
        mine = sorted((c for c in cells if c["setting"] == setting), key=lambda c: c["split"])
        rows = {}
        for key in variants(mine):
            have = [c for c in mine if key in c and default in c]
            if not have:
                continue
            f = [c[key]["forgetting"] for c in have]
            rows[key] = {
                "n": len(have),
                "test_avg": statistics.fmean(c[key]["test_avg"] for c in have),
                "vs_default": paired_summary(
                    [c[key]["test_avg"] - c[default]["test_avg"] for c in have]
                ),
                "acc_mean": statistics.fmean(x["acc"] for x in f),
                "acc_max": max(x["acc"] for x in f),
                "within_target": sum(1 for x in f if x["acc"] <= TARGET + 1e-9),
                "rows_lost": [sum(1 for x in f if min(x["rows_lost"], 3) == r) for r in range(4)],
                "noise_mean": statistics.fmean(x["noise_mean"] for x in f),
                "bias_mean": statistics.fmean(x["bias"] for x in f),
                "corrected_mean": statistics.fmean(x["corrected"] for x in f),
                "corrected_within": sum(1 for x in f if x["corrected"] <= TARGET + 1e-9),
                "noise_p_below_05": sum(1 for x in f if x["noise_p"] < 0.05),
                "p_true_mean": statistics.fmean(x["p_true"] for x in f),
                "p_true_max": max(x["p_true"] for x in f),
                "loss_median": statistics.median(x["loss"] for x in f),
                "cv_forgetting_mean": statistics.fmean(
                    c[key]["cv_forgetting"] or 0.0 for c in have
                ),
            }
        out[setting] = rows
    return out


_LEGEND = (
    "Variant = `study/selection/final`: the study's CV scores `seq` (plain), `avg` or `fed` "
    "final models; selection best CV, `rule` (accuracy-within:0.03) or `penalty` "
    "(accuracy-penalty:0.5); the final mechanism applied to the selected plan on test. Default "
    "= `seq-study/best/seq` (the current product). Forgetting: the worst site's drop of test "
    "accuracy from its post-visit peak to the final model. null = its mean under the null "
    "bootstrap (every post-visit model as good as the final one); bias = bootstrap estimate of "
    "the peak's upward bias; corrected = observed - bias; p<.05 = splits whose drop the null "
    "reaches in < 5% of draws; p(true) = drop of the mean probability of the true class; "
    "loss = rise of log-loss (nats)."
)
_HEADER = (
    "| variant | n | test Avg | - default: mean [95% CI], W/T/L | forgetting mean (max) "
    "| <= 2 pts | rows lost 0/1/2/3+ | null | bias | corrected (<= 2 pts) | p<.05 "
    "| p(true) mean (max) | loss median | CV forgetting |"
)


def _row(key: str, r: Mapping[str, Any]) -> str:
    d = r["vs_default"]
    diff = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], "
    diff += f"{d['wins']}/{d['ties']}/{d['losses']}"
    cells = [
        key, str(r["n"]), f"{r['test_avg']:.3f}", diff,
        f"{r['acc_mean']:.3f} ({r['acc_max']:.3f})", f"{r['within_target']}/{r['n']}",
        "/".join(map(str, r["rows_lost"])), f"{r['noise_mean']:.3f}", f"{r['bias_mean']:.3f}",
        f"{r['corrected_mean']:+.3f} ({r['corrected_within']}/{r['n']})",
        str(r["noise_p_below_05"]), f"{r['p_true_mean']:.3f} ({r['p_true_max']:.3f})",
        f"{r['loss_median']:.3f}", f"{r['cv_forgetting_mean']:.3f}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def markdown(report: Mapping[str, Any]) -> str:
    splits = report["splits"]
    lines = [
        f"# {report['name']}",
        "",
        f"Generated {report['generated']}. Command: `{report['command']}`.",
        f"Splits {splits[0]}-{splits[-1]}; compute: {report.get('cpu_seconds', 0):.0f} worker "
        f"CPU s, {report.get('wall_seconds', 0):.0f} s wall. Failed cells: "
        f"{report.get('failed') or 'none'}.",
        "",
        _LEGEND,
        "",
    ]
    for setting, rows in report["summary"].items():
        lines += [f"## {setting}", "", _HEADER, "|---" * 14 + "|"]
        lines += [_row(key, r) for key, r in rows.items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: Path, name: str) -> None:
    report["name"] = name
    report["summary"] = summarise(report["cells"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/datasets/heart_disease"))
    parser.add_argument("--first-split", type=int, default=500)
    parser.add_argument("--splits", type=int, default=12)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--settings", nargs="+", default=["per-site", "global"])
    parser.add_argument("--finals", nargs="+", default=list(FINALS), choices=FINALS,
                        help="The studies to run (each CV-scores its final)")  # fmt: skip
    parser.add_argument(
        "--estimator-only", action="store_true",
        help="Only the default study and final model (item 1's estimator figures); the only "
        "mode allowed on reported splits (< 500): no mechanism is ever tried on them",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="forget9-dev")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--render", type=Path, help="Only rewrite the report from this JSON")
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        _write(report, args.render.parent, args.render.stem)
        print(markdown(report))
        return 0
    if args.quick:
        args.splits, args.trials, args.folds = 1, 3, 2
    if args.first_split < 500 and not (args.quick or args.estimator_only):
        parser.error("mechanisms run on development splits only (500 onwards): on reported "
                     "splits use --estimator-only")  # fmt: skip
    post_hoc = list(FINALS)
    if args.estimator_only:
        args.finals, post_hoc = ["seq"], ["seq"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="baton-heart-forget-"))
    out = args.out or (work / "results" if args.quick else RESULTS_DIR)
    site_dirs = _register_sites(args.data, work)
    config = {"trials": args.trials, "folds": args.folds, "cycles": args.cycles,
              "max_steps": args.max_steps, "finals": args.finals, "post_hoc": post_hoc}  # fmt: skip
    splits = list(range(args.first_split, args.first_split + args.splits))
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "config": config, "splits": splits, "cells": [],
    }  # fmt: skip
    wanted = [(s, split) for split in splits for s in args.settings]
    cpu = 0.0
    with ProcessPoolExecutor(
        max(1, args.jobs), initializer=_init_worker, initargs=(site_dirs,)
    ) as pool:
        futures = {pool.submit(run_cell, s, split, config): (s, split) for s, split in wanted}
        for future in as_completed(futures):
            try:
                cell = future.result()
            except Exception as exc:  # one failed cell is reported, the others kept
                logger.error("[%s] split %d failed: %s", *futures[future], exc)
                report.setdefault("failed", []).append([*futures[future], str(exc)])
                continue
            cpu += cell["cpu_seconds"]
            report["cells"].append(cell)
            report["cpu_seconds"], report["wall_seconds"] = cpu, time.perf_counter() - started
            _write(report, out, args.name)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
