"""Simulation at scale (issue 16 item 5): a sequential chain or federated (FedAvg) rounds over
100 and 1,000 virtual sites on Flower's simulation engine (Ray), with wall time, CPU seconds and
peak memory.

    nice -n 19 .venv/bin/python benchmarks/simulation_scale.py                  # 100 and 1000
    nice -n 19 .venv/bin/python benchmarks/simulation_scale.py --mode federated \
        --name simulation_scale_federated                                           # 1 round
    nice -n 19 .venv/bin/python benchmarks/simulation_scale.py --sites 10 --quick
    .venv/bin/python benchmarks/simulation_scale.py --ray-cpus 2 --partitioner dirichlet

Data: a synthetic tabular CSV (``--rows-per-site`` rows per virtual site, two features and a
noisy linear label), registered in memory and cut IID (or Dirichlet over the label) by Flower
Datasets; or ``--data`` a heart-disease file / site folder. The plan is ``sites`` x 1 cycle of a
logistic model, every hop ``--steps`` steps: each virtual site trains once, in order (or, with
``--mode federated``, every site trains from the round's model and FedAvg averages them), and
every site scores the final model on its test rows. The simulator batches the work into a few
Flower messages (``site_agent.ray_simulation``); the hops are the same as one message a hop.
Memory is sampled every 0.2 s: the summed RSS of every process this one started (Ray's GCS,
raylet and workers) and of this driver; CPU seconds are this driver's and every Ray process's.

Writes benchmarks/results/simulation_scale.{json,md} and simulation_scale.png (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from coordinator.plan import parse_plan
from coordinator.simulation import simulation_job
from protocols.simulation import DataSource
from site_agent.ray_simulation import simulate

SETTINGS = (
    "mode", "rounds", "rows_per_site", "steps", "partitioner", "alpha", "ray_cpus",
    "cpus_per_site", "address",
)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("benchmarks.simulation_scale")


@dataclass
class MemoryPeak:
    """Peak summed RSS of this process's descendants (Ray) and of this process, in bytes."""

    ray: int = 0
    driver: int = 0
    ray_processes: int = 0
    samples: list[float] = field(default_factory=list)
    cpu_seconds: dict[int, float] = field(default_factory=dict)  # pid -> user + system, last seen


@contextmanager
def sampled_memory(every: float = 0.2) -> Iterator[MemoryPeak]:
    peak = MemoryPeak()
    stop = threading.Event()
    me = psutil.Process()

    def sample() -> None:
        while not stop.is_set():
            total, count = 0, 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                    times = child.cpu_times()
                    peak.cpu_seconds[child.pid] = times.user + times.system
                    count += 1
                except psutil.Error:
                    continue
            peak.ray = max(peak.ray, total)
            peak.ray_processes = max(peak.ray_processes, count)
            peak.driver = max(peak.driver, me.memory_info().rss)
            peak.samples.append(total / 2**20)
            stop.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def synthetic_csv(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(rows):
        age, chol = rng.gauss(55, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.2f},{chol:.2f},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_one(sites: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if args.data:
        sources = [DataSource(Path(p).stem, str(Path(p).resolve())) for p in args.data]
    else:
        source = synthetic_csv(work / f"synthetic-{sites}.csv", sites * args.rows_per_site, 0)
        sources = [DataSource("synthetic", str(source))]
    plan = parse_plan(
        {
            "name": f"scale-{sites}",
            "task": "tabular",
            "dataset": "scale",
            "labels": ["0", "1"],
            "options": {"model": "logistic"},
            "sites": ["placeholder"],
            "defaults": {"steps": args.steps, "batch_size": 8, "learning_rate": 0.05},
            **(
                {"mode": "federated", "federated": {"strategy": "fedavg", "rounds": args.rounds}}
                if args.mode == "federated"
                else {}
            ),
        }
    )
    job = simulation_job(
        plan,
        sources,
        sites=sites,
        partitioner=args.partitioner,
        alpha=args.alpha,
        seed=0,
        address=args.address,
        ray_cpus=None if args.address else args.ray_cpus,
        cpus_per_site=args.cpus_per_site,
    )
    started = time.monotonic()
    driver_cpu = sum(psutil.Process().cpu_times()[:2])
    with sampled_memory() as memory:
        report = simulate(job)
    wall = time.monotonic() - started
    driver_cpu = sum(psutil.Process().cpu_times()[:2]) - driver_cpu
    accuracy = [m["accuracy"] for m in report.evaluation.values() if "accuracy" in m]
    return {
        "sites": sites,
        "hops": len(report.hops),
        "rows": sum(sum(r.values()) for r in report.site_rows.values()),
        "wall_seconds": round(wall, 1),
        "simulation_seconds": round(report.wall_seconds, 1),
        "seconds_per_hop": round(wall / len(report.hops), 3),
        "peak_ray_rss_mib": round(memory.ray / 2**20, 1),
        "peak_driver_rss_mib": round(memory.driver / 2**20, 1),
        "peak_ray_processes": memory.ray_processes,
        "driver_cpu_seconds": round(driver_cpu, 1),
        "ray_cpu_seconds": round(sum(memory.cpu_seconds.values()), 1),
        "load_average_after": round(os.getloadavg()[0], 1),
        "evaluated_sites": len(report.evaluation),
        "mean_site_test_accuracy": round(statistics.fmean(accuracy), 4) if accuracy else None,
        "final_train_loss": round(report.hops[-1].metrics["train_loss"], 4),
        "tensors_sha256": report.tensors_sha256,
    }


def write_results(results: dict[str, Any], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    settings = results["settings"]
    lines = [
        "# Simulation at scale: virtual sites on Flower's simulation engine (Ray)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. Ray CPUs: {settings['ray_cpus']}, "
        f"{settings['cpus_per_site']} CPU per virtual site (so "
        f"{int(settings['ray_cpus'] / settings['cpus_per_site'])} Ray actor(s) train at once). "
        + (
            "Sequential plan, sites x 1 cycle"
            if settings["mode"] == "sequential"
            else f"Federated plan (FedAvg), every site every round, {settings['rounds']} round(s)"
        )
        + f", logistic model, {settings['steps']} steps per hop, "
        f"{settings['rows_per_site']} synthetic rows per site cut {settings['partitioner']}; "
        "then every site scores the final model on its test rows.",
        "",
        "| virtual sites | hops | rows | wall (s) | s / hop | CPU s (driver + Ray) "
        "| peak Ray RSS (MiB) | Ray processes | driver RSS (MiB) | load after "
        "| mean site test accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["runs"]:
        if "error" in row:
            lines.append(f"| {row['sites']} | failed: {row['error']} |||||||||")
            continue
        lines.append(
            f"| {row['sites']} | {row['hops']} | {row['rows']} | {row['wall_seconds']} "
            f"| {row['seconds_per_hop']} "
            f"| {row['driver_cpu_seconds']} + {row['ray_cpu_seconds']} "
            f"| {row['peak_ray_rss_mib']} "
            f"| {row['peak_ray_processes']} | {row['peak_driver_rss_mib']} "
            f"| {row['load_average_after']} | {row['mean_site_test_accuracy']} |"
        )
    lines += [
        "",
        "Wall time includes starting and stopping Ray (10-20 s here) and the partitioning. "
        "Peak Ray RSS sums the resident memory of every Ray process (GCS, raylet, workers) at "
        "the sampled moment of largest total; shared pages count once per process, so it "
        "overstates the physical memory. CPU seconds: this driver's, and every Ray process's "
        "user + system time as last sampled (0.2 s before it exited at the latest).",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [row for row in results["runs"] if "error" not in row]
    if not done:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot([r["sites"] for r in done], [r["wall_seconds"] for r in done], "o-")
    left.set(xscale="log", xlabel="virtual sites", ylabel="wall time (s)", title="Wall time")
    right.plot([r["sites"] for r in done], [r["peak_ray_rss_mib"] for r in done], "o-")
    right.set(xscale="log", xlabel="virtual sites", ylabel="MiB", title="Peak Ray RSS")
    figure.tight_layout()
    figure.savefig(RESULTS / f"{name}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rows-per-site", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--partitioner", choices=["iid", "dirichlet"], default="iid")
    parser.add_argument(
        "--mode", choices=["sequential", "federated"], default="sequential",
        help="federated: every site trains every round (FedAvg), --rounds rounds",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--ray-cpus", type=int, default=1)
    parser.add_argument("--cpus-per-site", type=float, default=1.0)
    parser.add_argument("--address", default=None, help="an existing Ray cluster")
    parser.add_argument("--data", nargs="*", default=[], help="source files instead of synthetic")
    parser.add_argument("--quick", action="store_true", help="few steps; writes *_quick files")
    parser.add_argument("--name", default="simulation_scale")
    args = parser.parse_args()
    if args.quick:
        args.steps = 2
        args.name += "_quick"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("site_agent").setLevel(logging.WARNING)
    results: dict[str, Any] = {
        "command": "nice -n 19 .venv/bin/python benchmarks/simulation_scale.py "
        + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, load average "
        f"{os.getloadavg()[0]:.1f} at start",
        "settings": {key: getattr(args, key) for key in SETTINGS},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="baton-scale-") as scratch:
        for sites in args.sites:
            logger.info("simulating %d virtual sites", sites)
            try:
                row = run_one(sites, args, Path(scratch))
            except (ValueError, MemoryError) as exc:
                row = {"sites": sites, "error": str(exc).splitlines()[0]}
            logger.info("%s", row)
            results["runs"].append(row)
            write_results(results, args.name)


if __name__ == "__main__":
    main()
