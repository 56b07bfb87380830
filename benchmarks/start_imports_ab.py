"""CPU seconds of what a site imports up to its hello, and a coordinator up to ready, for two
checkouts, interleaved (A B, then B A, ...): an A/B of start-up import changes that a loaded
machine's wall figures cannot show.

Each probe is a fresh process importing the modules (`site_agent.cli`, `site_agent.agent`; the
coordinator's CLI, `coordinator.launch`, `coordinator.server`) and making the service's metrics
(`SiteMetrics`, `CoordinatorMetrics`); its CPU (user + system) is read from the children's
rusage. ``--site-python``: the interpreter of the sites' venv (cold_cluster.py's `baton-fl[site]`
venv, as a site is deployed); default this one.

    .venv/bin/python benchmarks/start_imports_ab.py --rounds 12 base=/tmp/main new=.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SITE = (
    "import site_agent.cli, site_agent.agent\n"
    "from site_agent.metrics import SiteMetrics\n"
    "SiteMetrics()\n"
)
COORDINATOR = (
    "import coordinator.console.cli, coordinator.launch, coordinator.server\n"
    "from coordinator.metrics import CoordinatorMetrics\n"
    "CoordinatorMetrics()\n"
)


def cpu_seconds(python: str, code: str, checkout: str) -> float:
    """CPU of ``python -c code`` importing from `checkout`: run in it, since ``-c`` puts the
    working directory before PYTHONPATH (from another checkout, both arms would import that one).
    """
    checkout = str(Path(checkout).resolve())
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": checkout}
    subprocess.run([python, "-c", code], env=env, cwd=checkout, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs=2, help="NAME=CHECKOUT, twice")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--site-python", default=sys.executable)
    parser.add_argument("--name", default="start_imports_ab")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    arms = dict(arm.split("=", 1) for arm in args.arms)
    probes = {"site": (args.site_python, SITE), "coordinator": (sys.executable, COORDINATOR)}
    cpu: dict[str, dict[str, list[float]]] = {p: {a: [] for a in arms} for p in probes}
    load = [[round(x, 2) for x in os.getloadavg()]]
    for index in range(args.rounds):
        order = list(arms) if index % 2 == 0 else list(reversed(arms))
        for probe, (python, code) in probes.items():
            for arm in order:
                cpu[probe][arm].append(round(cpu_seconds(python, code, arms[arm]), 3))
    load.append([round(x, 2) for x in os.getloadavg()])
    first, second = list(arms)
    report = {
        "command": " ".join(sys.argv),
        "arms": arms,
        "site_python": args.site_python,
        "load_average_before_after": load,
        "median_cpu_s": {
            p: {a: statistics.median(v) for a, v in by.items()} for p, by in cpu.items()
        },
        # per round: first arm's CPU minus the second's (the same load for both)
        "median_paired_difference_s": {
            p: round(
                statistics.median(x - y for x, y in zip(by[first], by[second], strict=True)), 3
            )
            for p, by in cpu.items()
        },
        "cpu_s": cpu,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["median_cpu_s"]), json.dumps(report["median_paired_difference_s"]))


if __name__ == "__main__":
    main()
