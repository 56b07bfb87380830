"""Sequential, federated and hybrid runs of Fed-Heart-Disease through real site processes.

Four hospitals (Cleveland, Hungary, Switzerland, VA) run as `baton-site` processes with their
registered UCI files (FLamby's split, per-site normalisation), a coordinator process aggregates
the federated and hybrid rounds with Flower's strategies. Every mode gets the same site compute
and moves the same bytes: 16 site visits of FLamby's 100 local updates (lr 1e-3, batch 4), each
visit one adapter down and one up.

* sequential: 4 cycles over the four sites (a fixed order);
* federated: 4 rounds in which all four sites train from the round's aggregate (FedAvg, or the
  `--strategy` given);
* hybrid: 4 rounds of two groups (Cleveland then Hungary; Switzerland then VA) chained within
  the group and averaged across the groups.

Each final model is scored by every site on its test split; the figure is FLamby's "Avg", the
unweighted mean of the four per-centre accuracies.

    .venv/bin/python benchmarks/federated_real.py                  # one seed (a few minutes)
    .venv/bin/python benchmarks/federated_real.py --seeds 42 43 44

Writes benchmarks/results/federated_real.{json,md}.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _harness import wait_for_completed_run

from coordinator.console.admin import AdminClient
from coordinator.console.demo import prepare_pki
from coordinator.console.processes import Cluster
from coordinator.plan import RunPlan, parse_plan
from protocols.transport import TlsFiles
from site_agent.registry import register_dataset

logger = logging.getLogger("benchmarks.federated_real")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "heart_disease"
SITE_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
SITES = tuple(SITE_FILES)
VISITS_PER_SITE = 4
LOCAL_UPDATES = 100
HYBRID_GROUPS = (("north", ("cleveland", "hungary")), ("south", ("switzerland", "va")))


def _plan(mode: str, seed: int, strategy: str) -> RunPlan:
    document: dict[str, Any] = {
        "name": f"heart-{mode}-{seed}", "task": "tabular", "dataset": "heart",
        "labels": ["0", "1"], "options": {"model": "logistic", "normalisation": "per-site"},
        "defaults": {"steps": LOCAL_UPDATES, "batch_size": 4, "learning_rate": 1e-3,
                     "max_grad_norm": 0.0, "seed": seed},
        "mode": mode,
    }  # fmt: skip
    if mode == "sequential":
        document.update(sites=list(SITES), cycles=VISITS_PER_SITE)
    elif mode == "federated":
        document.update(sites=list(SITES), federated={"strategy": strategy,
                                                      "rounds": VISITS_PER_SITE,
                                                      "min_sites": len(SITES)})  # fmt: skip
    else:
        document.update(
            groups=[{"name": name, "sites": list(sites)} for name, sites in HYBRID_GROUPS],
            federated={"strategy": strategy, "rounds": VISITS_PER_SITE, "min_sites": 2},
        )
    return parse_plan(document)


def _test_accuracy(admin: AdminClient, run_id: str) -> dict[str, float]:
    wanted = set(admin.evaluate_run(run_id, "test"))
    run = admin.wait_for_evaluations(run_id, timeout=600)
    scores = {}
    for evaluation in run.evaluations:
        if evaluation.evaluation_id in wanted:
            if evaluation.status != "done":
                raise RuntimeError(f"test evaluation at {evaluation.site}: {evaluation.error}")
            scores[evaluation.site] = float(evaluation.metrics["accuracy"])
    return {site: scores[site] for site in SITES}


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Sequential, federated and hybrid runs through real sites (Fed-Heart-Disease)",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}; "
        f"{report['wall_seconds']:.0f} s.",
        "",
        f"Equal site compute and bytes moved: {VISITS_PER_SITE * len(SITES)} site visits of "
        f"{LOCAL_UPDATES} local updates each; federated/hybrid aggregate with "
        f"{report['strategy']} (Flower's strategy on the coordinator).",
        "",
        "| mode | Avg test accuracy (mean over seeds) | per seed | "
        + " | ".join(SITES)
        + " | wall s (mean) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in SITES) + " | --- |",
    ]
    for mode, rows in report["modes"].items():
        avgs = [row["avg"] for row in rows]
        per_site = {s: statistics.fmean(row["per_site"][s] for row in rows) for s in SITES}
        wall = statistics.fmean(row["wall_seconds"] for row in rows)
        lines.append(
            f"| {mode} | {statistics.fmean(avgs):.4f} | "
            + ", ".join(f"{a:.4f}" for a in avgs)
            + " | "
            + " | ".join(f"{per_site[s]:.4f}" for s in SITES)
            + f" | {wall:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_HEART_DISEASE_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--modes", nargs="+", default=["sequential", "federated", "hybrid"])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="federated_real")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="baton-federated-"))
    site_dirs = {}
    for site, file in SITE_FILES.items():
        source = args.data / file
        if not source.is_file():
            raise SystemExit(f"missing {source}: set --data or BATON_HEART_DISEASE_DIR")
        site_dirs[site] = work / "sites" / site
        register_dataset(site_dirs[site], "heart", source, task_type="tabular",
                         fmt="heart-disease", validation_fraction=0.0, seed=0)  # fmt: skip
    pki = work / "pki"
    prepare_pki(pki, list(SITES))
    plans = {(m, s): _plan(m, s, args.strategy) for m in args.modes for s in args.seeds}
    approved = sorted({plan.approval_bundle().sha256 for plan in plans.values()})
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}",
        "strategy": args.strategy,
        "seeds": args.seeds,
        "modes": {mode: [] for mode in args.modes},
    }
    cluster = Cluster(log_dir=work / "logs")
    with cluster.running():
        port = cluster.start_coordinator(state_dir=work / "coordinator", pki_dir=pki,
                                         port_file=work / "port")  # fmt: skip
        for site in SITES:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki,
                               data_dir=site_dirs[site], threads=1, approve=approved)  # fmt: skip
        tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        with AdminClient(f"localhost:{port}", tls) as admin:
            admin.wait_for_sites(set(SITES), timeout=600)
            for (mode, seed), plan in plans.items():
                began = time.perf_counter()
                run = wait_for_completed_run(admin, admin.start_run(plan), timeout=3600)
                wall = time.perf_counter() - began
                per_site = _test_accuracy(admin, run.run_id)
                avg = statistics.fmean(per_site.values())
                logger.info("%s seed %d: Avg test accuracy %.4f (%.0f s)", mode, seed, avg, wall)
                report["modes"][mode].append({"seed": seed, "run_id": run.run_id, "avg": avg,
                                              "per_site": per_site,
                                              "wall_seconds": wall})  # fmt: skip
    report["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
