"""Coordinator start to ready: `baton coordinator serve` until its gRPC port file is written.

Starts the coordinator `--starts` times on one state directory (the ledger exists after the
first start, as on a restart) and reports wall time and the process's CPU time to ready; the
CPU figure is the steadier one on a busy machine. ``--fresh``: every start on a new state
directory (a first start: the ledger is created, from the models since fresh19; a ledger to
upgrade is migrated by a child process, which ``cpu_seconds_with_children`` counts).
``PYTHONPATH`` names the checkout started. The project's modules are compiled to bytecode
first, as an installed wheel and the images ship them; ``--from-source`` removes that bytecode
so that every start compiles the source (as an editable checkout under PYTHONDONTWRITEBYTECODE
does). Writes ``results/NAME.json`` and ``.md``.

    .venv/bin/python benchmarks/startup.py --starts 5
    PYTHONPATH=/tmp/other-checkout .venv/bin/python benchmarks/startup.py --fresh --starts 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _harness import project_bytecode, report_head  # noqa: E402

from protocols.pki import Role, init_ca, issue_certificate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="a new state directory each start")
    parser.add_argument("--from-source", action="store_true",
                        help="no project bytecode: every start compiles the source")  # fmt: skip
    parser.add_argument("--name", default="startup", help="results file stem")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    checkout = Path(os.environ.get("PYTHONPATH", str(ROOT)).split(os.pathsep)[0])
    bytecode = project_bytecode(checkout, compiled=not args.from_source)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        pki = tmp / "pki"
        init_ca(pki)
        issue_certificate(pki, pki, Role.COORDINATOR, "coordinator")
        port_file = tmp / "port"
        state = tmp / "state"
        command = [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
                   "--port-file", str(port_file), "--state-dir", str(state),
                   "--ca", str(pki / "ca.crt"), "--cert", str(pki / "coordinator.crt"),
                   "--key", str(pki / "coordinator.key"), "--log-level", "WARNING",
                   "--dashboard-port", "0"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
        walls: list[float] = []
        cpus: list[float] = []
        with_children: list[float] = []
        for _ in range(args.starts):
            if args.fresh:
                shutil.rmtree(state, ignore_errors=True)
            wall, times = start_to_ready(command, port_file, env, tmp)
            walls.append(wall)
            cpus.append(times.user + times.system)
            with_children.append(cpus[-1] + times.children_user + times.children_system)
    report = {
        **report_head(None),
        "starts": args.starts,
        "wall_seconds": [round(x, 2) for x in walls],
        "fresh": args.fresh,
        "bytecode": bytecode,
        "pythonpath": env["PYTHONPATH"],
        "cpu_seconds": [round(x, 2) for x in cpus],
        "cpu_seconds_with_children": [round(x, 2) for x in with_children],
        "wall_median": round(statistics.median(walls), 2),
        "cpu_median": round(statistics.median(cpus), 2),
        "cpu_with_children_median": round(statistics.median(with_children), 2),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(json.dumps(report))


def start_to_ready(
    command: list[str], port_file: Path, env: dict[str, str], cwd: Path
) -> tuple[float, Any]:
    """Starts `command` and waits until it writes `port_file`: the wall seconds and the process's
    CPU times (psutil's, its children's included) at that moment; then stops it (SIGTERM)."""
    port_file.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd)
    try:
        while not port_file.exists():
            if proc.poll() is not None:
                raise SystemExit(f"coordinator exited with {proc.returncode}")
            time.sleep(0.005)
        wall = time.perf_counter() - started
        return wall, psutil.Process(proc.pid).cpu_times()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def markdown(report: dict[str, object]) -> str:
    ledger = (
        "a new state directory each start (first start: ledger created and migrated)"
        if (report["fresh"])
        else "one state directory (the ledger exists after the first start)"
    )
    return "\n".join([
        "# Coordinator start to ready",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}.",
        f"`baton coordinator serve` until its gRPC port file is written; {ledger}; "
        f"{report['bytecode']}. Load average before {report['load_average_before']}, after "
        f"{report['load_average_after']}.",
        "",
        "| figure | median | every start | target |",
        "|---|---:|---|---:|",
        f"| wall (s) | {report['wall_median']} | {report['wall_seconds']} | 1 |",
        f"| CPU of the coordinator (s) | {report['cpu_median']} | {report['cpu_seconds']} | |",
        f"| CPU with its children (s) | {report['cpu_with_children_median']} | "
        f"{report['cpu_seconds_with_children']} | |",
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
