"""How long the coordinator's ledger writer waits for the interpreter while the event loop
works: the interpreter's switch interval (`sys.setswitchinterval`), CPython's default against
the one `coordinator serve` and the site agent set (`protocols.interpreter`), in one run.

A hand back's commit runs on the ledger writer's thread (`LedgerWriter`) while the event loop
builds and sends the next hop's task. Both need the interpreter lock; a thread that wants it
waits until the holder lets go on its own (a blocking call) or the switch interval has passed.
This reproduces that in one process: the loop works in bursts of `--burst-ms` of Python (a
task's fields built, a message parsed), each followed by an idle wait of `--idle-ms` (0: the
loop never idles, the worst case), and every `--every-ms` hands a transaction-shaped job to a
`LedgerWriter`: Python work with short waits that let go of the interpreter, as SQLite's
statements and its COMMIT's fsync do. Per job: from the hand-over to the job's first line
("wake"), and the job's wall time against its own CPU time. Settings alternate job by job, so
both see the same machine.

    .venv/bin/python benchmarks/switch_interval.py --name switch-interval
    .venv/bin/python benchmarks/switch_interval.py --idle-ms 0 --name switch-interval-busy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _harness import report_head

RESULTS = Path(__file__).resolve().parent / "results"


def _python_work(ms: float) -> None:
    """Pure-Python work (dicts and strings, as a message's fields) for about `ms` of CPU."""
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        fields = {f"k{i}": str(i) for i in range(50)}
        "".join(fields.values())


def _transaction(statements: int, statement_ms: float, wait_ms: float) -> tuple[float, float]:
    """A commit's shape: `statements` times Python work then a wait that lets go of the
    interpreter (SQLite's C code), then the COMMIT's wait. Returns (started, CPU ms)."""
    started = time.perf_counter()
    cpu = time.thread_time()
    for _ in range(statements):
        _python_work(statement_ms)
        time.sleep(wait_ms / 1000)
    time.sleep(wait_ms / 1000)  # the COMMIT's fsync
    return started, (time.thread_time() - cpu) * 1000


async def _measure(args: argparse.Namespace, intervals: list[float]) -> dict[str, Any]:
    from coordinator.engine.ledger_writer import LedgerWriter

    writer = LedgerWriter()
    stop = asyncio.Event()

    async def busy_loop() -> None:
        while not stop.is_set():
            _python_work(args.burst_ms)
            await asyncio.sleep(args.idle_ms / 1000)  # 0: a yield, the loop never idles

    samples: dict[float, list[dict[str, float]]] = {interval: [] for interval in intervals}
    busy = asyncio.create_task(busy_loop())
    try:
        for job in range(args.jobs * len(intervals)):
            interval = intervals[job % len(intervals)]
            sys.setswitchinterval(interval)
            await asyncio.sleep(args.every_ms / 1000)
            handed = time.perf_counter()
            started, cpu_ms = await writer.run(
                _transaction, args.statements, args.statement_ms, args.wait_ms
            )
            ended = time.perf_counter()
            wake_ms, wall_ms = (started - handed) * 1000, (ended - started) * 1000
            samples[interval].append({"wake_ms": wake_ms, "wall_ms": wall_ms, "cpu_ms": cpu_ms})
    finally:
        stop.set()
        await busy
        writer.close()
    return {str(interval): _summary(rows) for interval, rows in samples.items()}


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {"jobs": len(rows)}
    for key in ("wake_ms", "wall_ms", "cpu_ms"):
        values = [row[key] for row in rows]
        out[f"{key}_p50"] = round(statistics.median(values), 3)
        # The nearest sample, not an interpolation: as the session-27 results were made.
        out[f"{key}_p99"] = round(float(np.percentile(values, 99, method="nearest")), 3)
    return out


def main() -> None:
    from protocols.interpreter import CPYTHON_SWITCH_INTERVAL_SECONDS, SWITCH_INTERVAL_SECONDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs per switch interval")
    parser.add_argument("--burst-ms", type=float, default=1.0,
                        help="the loop's Python work between yields")  # fmt: skip
    parser.add_argument("--idle-ms", type=float, default=1.0,
                        help="the loop's idle wait after a burst (0: never idle)")  # fmt: skip
    parser.add_argument("--every-ms", type=float, default=5.0)
    parser.add_argument("--statements", type=int, default=12)
    parser.add_argument("--statement-ms", type=float, default=0.15)
    parser.add_argument("--wait-ms", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="switch-interval")
    args = parser.parse_args()

    intervals = [CPYTHON_SWITCH_INTERVAL_SECONDS, SWITCH_INTERVAL_SECONDS]
    load_before = os.getloadavg()
    figures = asyncio.run(_measure(args, intervals))
    result: dict[str, Any] = {
        **report_head(None),
        "load_average_before": [round(x, 2) for x in load_before],
        "options": {k: v for k, v in vars(args).items() if k not in ("out", "name")},
        "switch_intervals_s": intervals,
        "figures": figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# The ledger writer's wait for the interpreter while the event loop works",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; 1-min load before: {load_before[0]:.2f}.",
        "",
        f"The loop works in bursts of {args.burst_ms} ms of Python, each followed by an idle "
        f"wait of {args.idle_ms} ms (0: a yield only); every {args.every_ms} ms a "
        f"transaction-shaped job ({args.statements} statements of {args.statement_ms} ms of "
        f"Python, each followed by a {args.wait_ms} ms wait that lets go of the interpreter, "
        f"then the COMMIT's wait) goes to a `LedgerWriter`. {args.jobs} jobs per setting, "
        "alternating.",
        "",
        "| switch interval | wake: p50 / p99 ms | job wall: p50 / p99 ms | job CPU: p50 ms |",
        "|---|---|---|---|",
    ]
    for interval in intervals:
        f = figures[str(interval)]
        default = " (CPython's default)" if interval == CPYTHON_SWITCH_INTERVAL_SECONDS else ""
        label = f"{interval * 1000:g} ms{default}"
        lines.append(
            f"| {label} | {f['wake_ms_p50']} / {f['wake_ms_p99']} | "
            f"{f['wall_ms_p50']} / {f['wall_ms_p99']} | {f['cpu_ms_p50']} |"
        )
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
