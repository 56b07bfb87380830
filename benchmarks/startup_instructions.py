"""Coordinator start to ready in instructions: `baton coordinator serve` under valgrind's
callgrind until its gRPC port file is written, for one or more checkouts.

The count of instructions executed (callgrind's Ir, every thread of the process) barely moves
with the machine's load, where CPU seconds do (`startup_ab.py` on a shared 2-core machine: the
same code measured 0.86-1.38 s in one run). A start takes one to three minutes under valgrind.
Each arm restarts on one state directory whose ledger a plain first start made (not counted);
the counts are dumped when the port file appears (`callgrind_control -d`), then the process is
killed. An arm is ``NAME=CHECKOUT``. Writes ``results/NAME.json`` and ``.md``.

    nice -n 19 .venv/bin/python benchmarks/startup_instructions.py base=/tmp/main new=.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _harness import project_bytecode, report_head  # noqa: E402
from startup import start_to_ready  # noqa: E402

from protocols.pki import Role, init_ca, issue_certificate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs="+", help="NAME=CHECKOUT")
    parser.add_argument("--name", default="startup_instructions")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    arms = {name: Path(path).resolve() for name, _, path in (a.partition("=") for a in args.arms)}
    for checkout in arms.values():
        bytecode = project_bytecode(checkout, compiled=True)
    load = [[round(x, 2) for x in os.getloadavg()]]
    instructions: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = tmp / "pki"
        init_ca(pki)
        issue_certificate(pki, pki, Role.COORDINATOR, "coordinator")
        for name, checkout in arms.items():
            home = tmp / name
            home.mkdir()
            serve = ["-m", "coordinator", "coordinator", "serve", "--port", "0",
                     "--port-file", str(home / "port"), "--state-dir", str(home / "state"),
                     "--ca", str(pki / "ca.crt"), "--cert", str(pki / "coordinator.crt"),
                     "--key", str(pki / "coordinator.key"), "--log-level", "WARNING",
                     "--dashboard-port", "0"]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(checkout)}
            start_to_ready([sys.executable, *serve], home / "port", env, home)  # the ledger
            instructions[name] = instructions_to_ready(serve, home, env)
    load.append([round(x, 2) for x in os.getloadavg()])
    report = {
        **report_head(None),
        "arms": {name: str(checkout) for name, checkout in arms.items()},
        "bytecode": bytecode,
        "load_average_before_after": load,
        "instructions_to_ready": instructions,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(
        json.dumps({k: report[k] for k in ("load_average_before_after", "instructions_to_ready")})
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table, each arm beside the first."""
    counts: dict[str, int] = report["instructions_to_ready"]
    first = next(iter(counts.values()))
    rows = [f"| {name} | `{report['arms'][name]}` | {count:,} | {(count - first) / first:+.1%} |"
            for name, count in counts.items()]  # fmt: skip
    return "\n".join(
        [
            "# Coordinator restart to ready, in instructions",
            "",
            f"Generated {report['generated']} by `{report['command']}` on {report['machine']}.",
            "Instructions executed until the gRPC port file appeared (valgrind callgrind, every "
            f"thread); {report['bytecode']}. Load average before, after: "
            f"{report['load_average_before_after']}.",
            "",
            "| arm | checkout | instructions to ready | against the first arm |",
            "|---|---|---:|---:|",
            *rows,
            "",
        ]
    )


def instructions_to_ready(serve: list[str], home: Path, env: dict[str, str]) -> int:
    """Instructions `python *serve` executed until its port file appeared (callgrind's Ir)."""
    port_file, out = home / "port", home / "callgrind.out"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *serve],
        env=env, cwd=home, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not port_file.exists():
            if process.poll() is not None:
                raise SystemExit(f"coordinator exited with {process.returncode}")
            time.sleep(0.01)
        subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    dumps = sorted(home.glob("callgrind.out.*"))
    summary = re.search(r"^summary: (\d+)$", dumps[-1].read_text(), re.MULTILINE)
    assert summary is not None, f"no summary line in {dumps[-1]}"
    return int(summary.group(1))


if __name__ == "__main__":
    main()
