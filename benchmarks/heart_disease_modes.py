"""Fed-Heart-Disease: a search that chooses the run mode vs each mode searched alone (issue 16).

On each resampled per-centre train/test split (split 0 is FLamby's), four studies of equal trial
budget search the same train-only objective (k-fold CV inside each centre's training rows, mean
accuracy over the four centres, per-site normalisation):

* ``modes``: `ordering.ModeSearchSpace` over sequential, federated and hybrid trials (TPE);
* ``sequential``, ``federated``, ``hybrid``: the same space restricted to one mode.

Equal compute: every trial of every study trains each site for the same total optimiser steps
(``steps x cycles`` of the sequential schedule; federated and hybrid rounds split them,
``ceil(total / rounds)`` local steps per round) at the same batch size. Each study's best
trial by CV is retrained on the split's full training rows and scored once on its test rows.

Runs are the in-process twin (``site_agent.simulation``, the sites' own trainer code):
sequential schedules through ``train_sequential``; each federated or hybrid round trains every
member (a site, or a group's chain of sites) from the round's global model with the same
``train_sequential`` and aggregates the members with the coordinator's own
``coordinator.aggregation.aggregate_round`` (Flower's strategy code, example-weighted, FedAdam /
FedYogi server state carried across rounds), as the engine does.

    nice -n 19 .venv/bin/python benchmarks/heart_disease_modes.py --splits 5 --trials 16
    .venv/bin/python benchmarks/heart_disease_modes.py --quick            # smoke run, seconds
    .venv/bin/python benchmarks/heart_disease_modes.py --render results/heart_disease_modes.json

Writes benchmarks/results/heart_disease_modes.{json,md} after every split (a run cut short
leaves its partial report).
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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from heart_disease import DEFAULT_DATA, FLAMBY_BATCH, SITES, _register_sites
from heart_disease_paired import (
    _WORKER,
    _best,
    _init_worker,
    _outcome,
    _run_cv,
    _site_hp,
    _spec_for,
    _test_accuracy,
    paired_summary,
    resample_split,
)

from coordinator.aggregation import Contribution, aggregate_round
from coordinator.plan import FederatedSpec
from ordering import (
    MODES,
    STRATEGIES,
    CandidatePlan,
    FloatRange,
    IntRange,
    ModeSearchSpace,
    OrderingStudy,
    TrialOutcome,
    TrialRecord,
)
from site_agent.registry import RegisteredDataset
from site_agent.simulation import train_sequential
from site_agent.tasks import TabularTrainer, TaskSpec

logger = logging.getLogger("heart_disease_modes")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SETTING = "per-site"
STUDIES = ("modes", *MODES)


# ---- the twin of a federated or hybrid run ------------------------------------------------------


def train_rounds(
    trainer: TabularTrainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    plan: CandidatePlan,
) -> dict[str, torch.Tensor]:
    """A federated or hybrid plan's rounds: each member trains from the round's global model
    (a chain of `train_sequential` hops), the coordinator's Flower aggregation combines them."""
    federation = plan.federation
    assert federation is not None
    by_name = {d.name: d for d in datasets}
    members = (
        [list(group) for group in federation.groups]
        if federation.groups
        else [[site] for site in plan.order]
    )
    hp = plan.hops[0].hyperparameters
    fed_spec = FederatedSpec(
        strategy=federation.strategy,  # type: ignore[arg-type]
        rounds=federation.rounds,
        local_steps=federation.local_steps,
        proximal_mu=federation.proximal_mu,
    )
    current: dict[str, np.ndarray] | None = None
    state: bytes | None = None
    for round_number in range(1, federation.rounds + 1):
        # Every hop of a round trains with the round's settings, seeds varying by round.
        round_hp = _site_hp({**hp.model_dump(), "seed": hp.seed + round_number - 1})
        incoming = None if current is None else {k: torch.from_numpy(v) for k, v in current.items()}
        contributions = []
        for index, chain in enumerate(members):
            result = train_sequential(
                trainer, spec, [(by_name[site], round_hp) for site in chain], incoming=incoming
            )
            contributions.append(
                Contribution(
                    name=f"member{index}",
                    sha256=f"{round_number}:{index}",
                    tensors={k: v.detach().cpu().numpy() for k, v in result.tensors.items()},
                    examples=sum(v.metrics["train_examples"] for v in result.visits),
                )
            )
        aggregate = aggregate_round(
            fed_spec, round_number, contributions, current=current, server_state=state
        )
        current, state = aggregate.tensors, aggregate.server_state
    assert current is not None
    return {k: torch.from_numpy(np.array(v)) for k, v in current.items()}


class ModeExecutor:
    """Runs any mode's plan as the in-process twin under k-fold CV (a ``PlanExecutor``)."""

    def __init__(
        self, trainer: TabularTrainer, datasets: Sequence[RegisteredDataset], folds: int
    ) -> None:
        self.trainer, self.datasets, self.folds = trainer, datasets, folds

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        started = time.perf_counter()

        def train(views: Sequence[RegisteredDataset], spec: TaskSpec) -> Any:
            if plan.federation is not None:
                return train_rounds(self.trainer, spec, views, plan)
            by_name = {view.name: view for view in views}
            visits = [
                (by_name[hop.site], _site_hp(hop.hyperparameters.model_dump())) for hop in plan.hops
            ]
            return train_sequential(self.trainer, spec, visits)

        cv = _run_cv(self.trainer, SETTING, self.datasets, self.folds, train)
        return _outcome(cv, time.perf_counter() - started)


def final_tensors(
    trainer: TabularTrainer, datasets: Sequence[RegisteredDataset], plan: CandidatePlan
) -> tuple[TaskSpec, dict[str, torch.Tensor]]:
    """The plan trained on the split's full training rows."""
    spec = _spec_for(SETTING)(datasets)
    if plan.federation is not None:
        return spec, train_rounds(trainer, spec, datasets, plan)
    by_name = {d.name: d for d in datasets}
    visits = [(by_name[hop.site], _site_hp(hop.hyperparameters.model_dump())) for hop in plan.hops]
    return spec, dict(train_sequential(trainer, spec, visits).tensors)


# ---- one split ----------------------------------------------------------------------------------


def search_space(split: int, modes: Sequence[str], config: Mapping[str, Any]) -> ModeSearchSpace:
    """The shared space: 2 cycles of 10..max steps per visit for sequential trials, 1..max
    rounds for federated and hybrid ones, 2..3 groups, every strategy."""
    return ModeSearchSpace(
        sites=SITES,
        cycles=config["cycles"],
        learning_rate=FloatRange(3e-4, 3e-2, log=True),
        steps=IntRange(10, config["max_steps"]),
        batch_size=FLAMBY_BATCH,
        max_grad_norm=0.0,
        seed=split,
        modes=tuple(modes),
        strategies=tuple(config["strategies"]),
        rounds=IntRange(1, config["max_rounds"]),
        max_groups=3,
        fedprox_mu=FloatRange(1e-3, 1.0, log=True),
    )


def _study(
    name: str, split: int, datasets: Sequence[RegisteredDataset], config: Mapping[str, Any]
) -> dict[str, Any]:
    trainer: TabularTrainer = _WORKER["trainer"]
    modes = MODES if name == "modes" else (name,)
    space = search_space(split, modes, config)
    study = OrderingStudy.create(None, f"{name}-{split}", space, seed=split)
    started = time.process_time()
    records: list[TrialRecord] = study.optimize(
        ModeExecutor(trainer, datasets, config["folds"]), config["trials"]
    )
    chosen = _best(study)
    assert chosen.plan is not None
    spec, tensors = final_tensors(trainer, datasets, chosen.plan)
    scores = _test_accuracy(trainer, spec, tensors, datasets)
    collapsed = scores.pop("collapsed", None)
    return {
        "chosen_mode": chosen.plan.mode,
        "chosen_plan": chosen.plan.describe(),
        "cv_accuracy": chosen.value,
        "test_avg": statistics.fmean(scores.values()),
        "site_test_accuracy": scores,
        "final_collapsed": collapsed,
        "trial_modes": [r.plan.mode if r.plan else None for r in records],
        "trial_values": [r.value for r in records],
        "failed": sum(r.state == "FAIL" for r in records),
        "cpu_seconds": time.process_time() - started,
    }


def run_split(split: int, config: Mapping[str, Any]) -> dict[str, Any]:
    datasets = resample_split(_WORKER["datasets"], split)
    started = time.perf_counter()
    studies = {name: _study(name, split, datasets, config) for name in STUDIES}
    logger.info("split %d in %.0f s: %s", split, time.perf_counter() - started, ", ".join(
        f"{n} {s['test_avg']:.3f} ({s['chosen_mode']})" for n, s in studies.items()))  # fmt: skip
    return {"split": split, "seconds": time.perf_counter() - started, "studies": studies}


# ---- report -------------------------------------------------------------------------------------


def summarise(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not cells:
        return {}
    summary: dict[str, Any] = {"test_avg": {}, "paired_modes_minus": {}, "chosen_modes": {}}
    for name in STUDIES:
        values = [c["studies"][name]["test_avg"] for c in cells]
        summary["test_avg"][name] = {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
        summary["chosen_modes"][name] = [c["studies"][name]["chosen_mode"] for c in cells]
    for name in MODES:
        differences = [
            c["studies"]["modes"]["test_avg"] - c["studies"][name]["test_avg"] for c in cells
        ]
        summary["paired_modes_minus"][name] = paired_summary(differences)
    trials = [m for c in cells for m in c["studies"]["modes"]["trial_modes"]]
    summary["modes_study_trials_by_mode"] = {m: trials.count(m) for m in MODES}
    return summary


def markdown(report: Mapping[str, Any]) -> str:
    config, summary = report["config"], report.get("summary") or {}
    lines = [
        "# Fed-Heart-Disease: searching the run mode vs each mode alone",
        "",
        f"Generated {report['generated']} by `{report['command']}`; "
        f"{len(report['cells'])} split(s) of {config['splits']} done, {config['trials']} trials "
        f"per study, {config['folds']}-fold CV, per-site normalisation, strategies "
        f"{', '.join(config['strategies'])}. Load at start: {report['load']}. "
        f"CPU {report.get('cpu_seconds', 0):.0f} s, wall {report.get('wall_seconds', 0):.0f} s.",
        "",
        "Equal compute: every trial trains each site for the same total steps (sequential "
        "`steps x cycles`; federated/hybrid `ceil(total / rounds)` per round).",
        "",
    ]
    if not summary:
        return "\n".join([*lines, "No split finished yet.", ""])
    lines += ["| study | test accuracy (mean ± sd over splits) | chosen mode per split |",
              "|---|---|---|"]  # fmt: skip
    for name in STUDIES:
        stats = summary["test_avg"][name]
        lines.append(f"| {name} | {stats['mean']:.3f} ± {stats['sd']:.3f} | "
                     f"{', '.join(summary['chosen_modes'][name])} |")  # fmt: skip
    lines += ["", "Paired per split, `modes` study minus each single-mode study (test accuracy):",
              "", "| minus | mean | 95% interval | Wilcoxon p | wins / ties / losses |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name in MODES:
        p = summary["paired_modes_minus"][name]
        interval = f"[{p['low']:+.3f}, {p['high']:+.3f}]"
        record = f"{p['wins']} / {p['ties']} / {p['losses']}"
        lines.append(f"| {name} | {p['mean']:+.3f} | {interval} | {p['wilcoxon_p']:.2f} | "
                     f"{record} |")  # fmt: skip
    verdicts = []
    for name in MODES:
        p = summary["paired_modes_minus"][name]
        if p["low"] > 0:
            verdicts.append(f"better than {name} alone")
        elif p["high"] < 0:
            verdicts.append(f"worse than {name} alone")
        else:
            verdicts.append(f"not distinguishable from {name} alone")
    lines += ["", "Verdict (95% interval over splits): searching the mode is "
              + "; ".join(verdicts) + ". At an equal trial budget each mode of the `modes` "
              "study gets about a third of the trials to tune its own settings.",
              "", "Cut to fit a small budget: splits, trials and folds as above (issue 17's "
              "design uses >= 10 splits), per-site normalisation only, sequential schedules of "
              f"{config['cycles']} cycles x 10-{config['max_steps']} steps, 1-"
              f"{config['max_rounds']} rounds, FedAdam/FedYogi server options at Flower's "
              "defaults, every member trains every round (fraction_train 1)."]  # fmt: skip
    by_mode = summary["modes_study_trials_by_mode"]
    lines += ["", "Trials of the `modes` study by mode: "
              + ", ".join(f"{m} {n}" for m, n in by_mode.items()) + ".", "",
              "Per split (test accuracy of each study's CV-best plan):", "",
              "| split | " + " | ".join(STUDIES) + " | modes' chosen plan |",
              "|---|" + "---|" * (len(STUDIES) + 1)]  # fmt: skip
    for cell in report["cells"]:
        studies = cell["studies"]
        lines.append(f"| {cell['split']} | "
                     + " | ".join(f"{studies[n]['test_avg']:.3f}" for n in STUDIES)
                     + f" | {studies['modes']['chosen_plan'].replace('|', '/')} |")  # fmt: skip
    return "\n".join([*lines, ""])


def _write(report: dict[str, Any], out: Path, name: str) -> None:
    report["summary"] = summarise(report["cells"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_HEART_DISEASE_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--splits", type=int, default=5, help="Splits 0 .. N-1 (0 = FLamby's)")
    parser.add_argument("--trials", type=int, default=16, help="Trial budget of every study")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=2, help="Sequential cycles (fixed)")
    parser.add_argument("--max-steps", type=int, default=40, help="Largest steps per visit")
    parser.add_argument("--max-rounds", type=int, default=6)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--quick", action="store_true", help="1 split, 4 trials, 2 folds")
    parser.add_argument("--out", type=Path, help=f"Results directory (default {RESULTS_DIR})")
    parser.add_argument("--name", default="heart_disease_modes")
    parser.add_argument("--render", type=Path, help="Only rewrite the report from this JSON")
    args = parser.parse_args(argv)
    if args.render is not None:
        rendered: dict[str, Any] = json.loads(args.render.read_text())
        _write(rendered, args.render.parent, args.render.stem)
        return 0
    if args.quick:
        args.splits, args.trials, args.folds, args.max_steps, args.max_rounds = 1, 4, 2, 12, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="baton-heart-modes-"))
    if args.out is None:
        args.out = work / "results" if args.quick else RESULTS_DIR
    _init_worker(_register_sites(args.data, work))
    config = {
        "splits": args.splits,
        "trials": args.trials,
        "folds": args.folds,
        "cycles": args.cycles,
        "max_steps": args.max_steps,
        "max_rounds": args.max_rounds,
        "strategies": [s for s in args.strategies.split(",") if s],
    }
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "load": os.getloadavg(),
        "machine": platform.platform(),
        "config": config,
        "cells": [],
    }
    wall, cpu = time.perf_counter(), time.process_time()
    for split in range(args.splits):
        report["cells"].append(run_split(split, config))
        report["wall_seconds"] = time.perf_counter() - wall
        report["cpu_seconds"] = time.process_time() - cpu
        _write(report, args.out, args.name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
