"""Sequential vs federated vs hybrid on heart disease at equal site compute and equal bytes
moved, through the simulator ``baton simulate`` uses (Flower's simulation engine, Ray).

    nice -n 19 .venv/bin/python benchmarks/simulation_modes.py                # 3 seeds
    nice -n 19 .venv/bin/python benchmarks/simulation_modes.py --seeds 0 --quick
    BATON_HEART_DISEASE_DIR=/path/to/heart_disease ...                         # data elsewhere

The four UCI heart-disease centres are four sites, each its own registered file (FLamby's test
split; natural partition: each centre is one virtual site). Every mode trains R rounds (cycles)
of the same local work: each site trains ``--steps`` steps (FLamby: 100 updates, batch 4,
learning rate 1e-3, logistic model) once per round. So every site computes R x steps steps in
every mode, and every mode runs 4R hops, each one adapter down and one adapter up: equal site
compute and equal bytes moved.

* sequential: the four sites in a cycle, R cycles (cyclic weight transfer);
* hybrid: two regional chains (cleveland -> hungary, switzerland -> va) averaged every round;
* federated: FedAvg over the four sites every round, on Flower's ``run_simulation`` (Flower's
  own runtime and strategy: the peer).

Reported: each site's test accuracy of the final model, their unweighted mean (FLamby's
"Avg") and the pooled accuracy over all test rows, mean and spread over seeds (the hops' seed);
wall time. Writes benchmarks/results/simulation_modes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from coordinator.plan import parse_plan
from coordinator.simulation import simulation_job
from protocols.simulation import DataSource
from site_agent.ray_simulation import simulate
from site_agent.registry import register_dataset
from site_agent.tasks import TabularTrainer, TaskSpec

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(
    os.environ.get(
        "BATON_HEART_DISEASE_DIR",
        Path(__file__).resolve().parents[2] / "shared" / "datasets" / "heart_disease",
    )
)
SITE_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
GROUPS = [
    {"name": "north", "sites": ["cleveland", "hungary"]},
    {"name": "south", "sites": ["switzerland", "va"]},
]
OPTIONS = {"model": "logistic"}
logger = logging.getLogger("benchmarks.simulation_modes")


def plans(rounds: int, steps: int, seed: int) -> dict[str, dict[str, Any]]:
    base = {
        "task": "tabular",
        "dataset": "heart",
        "labels": ["0", "1"],
        "options": OPTIONS,
        "defaults": {"steps": steps, "batch_size": 4, "learning_rate": 1e-3, "seed": seed,
                     "max_grad_norm": 0.0},
    }  # fmt: skip
    sites = list(SITE_FILES)
    return {
        "sequential": {**base, "sites": sites, "cycles": rounds},
        "hybrid": {**base, "mode": "hybrid", "groups": GROUPS,
                   "federated": {"strategy": "fedavg", "rounds": rounds}},
        "federated (FedAvg)": {**base, "mode": "federated", "sites": sites,
                               "federated": {"strategy": "fedavg", "rounds": rounds,
                                             "min_sites": len(sites)}},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ray-cpus", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 round of 10 steps")
    parser.add_argument("--name", default="simulation_modes")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.name = 1, 10, args.name + "_quick"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("site_agent").setLevel(logging.WARNING)
    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="baton-modes-") as scratch:
        sources = []
        for site, file in SITE_FILES.items():
            if not (args.data / file).is_file():
                raise SystemExit(f"missing {args.data / file}: set --data")
            register_dataset(Path(scratch) / site, "heart", args.data / file,
                             task_type="tabular", fmt="heart-disease",
                             validation_fraction=0.0, seed=0)  # fmt: skip
            sources.append(DataSource(site, str(Path(scratch) / site)))
        registered = register_dataset(Path(scratch) / "probe", "heart",
                                      args.data / SITE_FILES["cleveland"], task_type="tabular",
                                      fmt="heart-disease", validation_fraction=0.0)  # fmt: skip
        adapter_bytes = sum(
            4 * _numel(t.shape)
            for t in TabularTrainer().trainable_state(
                TaskSpec("tabular", ("0", "1"), options=OPTIONS), registered
            )
        )
        for seed in args.seeds:
            for mode, document in plans(args.rounds, args.steps, seed).items():
                logger.info("seed %d: %s", seed, mode)
                report = simulate(
                    simulation_job(parse_plan(document), sources, ray_cpus=args.ray_cpus)
                )
                accuracy = {s: m["accuracy"] for s, m in report.evaluation.items()}
                examples = {s: m["examples"] for s, m in report.evaluation.items()}
                rows.setdefault(mode, []).append(
                    {
                        "seed": seed,
                        "hops": len(report.hops),
                        "site_steps": {
                            s: sum(h.metrics["train_steps"] for h in report.hops if h.site == s)
                            for s in SITE_FILES
                        },
                        "bytes_moved": 2 * len(report.hops) * adapter_bytes,
                        "accuracy": accuracy,
                        "mean_site_accuracy": statistics.fmean(accuracy.values()),
                        "pooled_accuracy": sum(accuracy[s] * examples[s] for s in accuracy)
                        / sum(examples.values()),
                        "wall_seconds": round(report.wall_seconds, 1),
                    }
                )
                logger.info("%s", rows[mode][-1])
                write(args, rows, adapter_bytes)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def write(args: argparse.Namespace, rows: dict[str, list[dict[str, Any]]], size: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    command = "nice -n 19 .venv/bin/python benchmarks/simulation_modes.py " + " ".join(sys.argv[1:])
    document = {"command": command, "rounds": args.rounds, "steps": args.steps,
                "adapter_bytes": size, "modes": rows}  # fmt: skip
    (RESULTS / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")

    def spread(values: list[float]) -> str:
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.3f} ± {sd:.3f}"

    lines = [
        "# Sequential vs federated vs hybrid on heart disease (simulated, equal compute and bytes)",
        "",
        f"Command: `{command}`",
        "",
        f"{args.rounds} rounds (cycles) x {args.steps} steps per site per round, batch 4, "
        f"learning rate 1e-3, logistic model ({size} bytes of tensors); every mode runs "
        f"{4 * args.rounds} hops, each moving the adapter down and up. Four centres, FLamby's "
        "test split; the final model scored at every site. Mean ± standard deviation over "
        f"{len(next(iter(rows.values())))} seed(s).",
        "",
        "| mode | hops | steps per site | bytes moved | mean site accuracy | pooled accuracy "
        "| " + " | ".join(SITE_FILES) + " | wall (s) |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(SITE_FILES) + "---:|",
    ]
    for mode, runs in rows.items():
        steps = sorted({v for r in runs for v in r["site_steps"].values()})
        lines.append(
            f"| {mode} | {runs[0]['hops']} | {'/'.join(f'{s:g}' for s in steps)} "
            f"| {runs[0]['bytes_moved']} | {spread([r['mean_site_accuracy'] for r in runs])} "
            f"| {spread([r['pooled_accuracy'] for r in runs])} | "
            + " | ".join(spread([r["accuracy"][s] for r in runs]) for s in SITE_FILES)
            + f" | {statistics.fmean(r['wall_seconds'] for r in runs):.0f} |"
        )
    lines.append("")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
