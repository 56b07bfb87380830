"""Coordinator start to ready for two checkouts, interleaved (A B, then B A, ...): the A/B of a
start-up change on a machine whose load moves (`startup.py` measures one checkout).

Each arm restarts `baton coordinator serve` on a state directory of its own (its ledger made by
a first start that is not counted) until the gRPC port file is written, and reads the process's
CPU time (user + system) and the wall time. An arm is ``NAME=CHECKOUT``, optionally followed by
``,VARIABLE=VALUE`` environment settings (``off=.,PYDANTIC_DISABLE_PLUGINS=__all__``). Both arms'
project modules are compiled to bytecode first, as an installed wheel ships them.

    .venv/bin/python benchmarks/startup_ab.py --rounds 15 base=/tmp/main new=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _harness import project_bytecode, report_head  # noqa: E402
from startup import start_to_ready  # noqa: E402

from protocols.pki import Role, init_ca, issue_certificate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs=2, help="NAME=CHECKOUT[,VARIABLE=VALUE...], twice")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--name", default="startup_ab")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    arms: dict[str, tuple[Path, dict[str, str]]] = {}
    for arm in args.arms:
        name, _, rest = arm.partition("=")
        checkout, *settings = rest.split(",")
        arms[name] = (Path(checkout).resolve(), dict(s.split("=", 1) for s in settings))
    for checkout, _ in arms.values():
        bytecode = project_bytecode(checkout, compiled=True)
    load = [[round(x, 2) for x in os.getloadavg()]]
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = tmp / "pki"
        init_ca(pki)
        issue_certificate(pki, pki, Role.COORDINATOR, "coordinator")
        runs: dict[str, tuple[list[str], Path, dict[str, str], Path]] = {}
        for name, (checkout, settings) in arms.items():
            home = tmp / name
            home.mkdir()
            command = [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
                       "--port-file", str(home / "port"), "--state-dir", str(home / "state"),
                       "--ca", str(pki / "ca.crt"), "--cert", str(pki / "coordinator.crt"),
                       "--key", str(pki / "coordinator.key"), "--log-level", "WARNING",
                       "--dashboard-port", "0"]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(checkout), **settings}
            runs[name] = (command, home / "port", env, home)
            start_to_ready(*runs[name])  # the ledger created and migrated: not counted
        for index in range(args.rounds):
            for name in list(arms) if index % 2 == 0 else list(reversed(arms)):
                seconds, times = start_to_ready(*runs[name])
                wall[name].append(round(seconds, 3))
                cpu[name].append(round(times.user + times.system, 3))
    load.append([round(x, 2) for x in os.getloadavg()])
    first, second = list(arms)
    report = {
        **report_head(None),
        "arms": {name: [str(c), s] for name, (c, s) in arms.items()},
        "bytecode": bytecode,
        "load_average_before_after": load,
        "median_wall_s": {name: round(statistics.median(v), 3) for name, v in wall.items()},
        "median_cpu_s": {name: round(statistics.median(v), 3) for name, v in cpu.items()},
        # per round: the first arm's figure minus the second's (the same load for both)
        "median_paired_difference_s": {
            "wall": paired_difference(wall[first], wall[second]),
            "cpu": paired_difference(cpu[first], cpu[second]),
        },
        "wall_s": wall,
        "cpu_s": cpu,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    shown = ("load_average_before_after", "median_wall_s", "median_cpu_s")
    print(json.dumps({k: report[k] for k in (*shown, "median_paired_difference_s")}))


def paired_difference(first: list[float], second: list[float]) -> float:
    """The median over rounds of the first arm's figure minus the second's."""
    return round(statistics.median(x - y for x, y in zip(first, second, strict=True)), 3)


if __name__ == "__main__":
    main()
