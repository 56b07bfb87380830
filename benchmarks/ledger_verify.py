"""Time, CPU and peak memory of `baton ledger verify` (chain + state rows) on a large ledger.

Either builds a SQLite ledger through the repository's own append path (one run of H hops, each
hop leased and committed many times over so that every event carries a row snapshot), or takes
an existing one (`--database-url`, e.g. the 1M-event ledger of `benchmarks/scale.py`'s
`build_events`). Then runs `python -m coordinator ledger verify --database-url URL` in a fresh
process per checkout (`--root`, repeatable: an interleaved A/B, each round every checkout in
turn, so all see the same load) and reports per run its wall time, CPU time (user + sys of that
process alone) and peak RSS, with the load average, and per checkout the medians.

    nice -n 19 .venv/bin/python benchmarks/ledger_verify.py --events 100000
    nice -n 19 .venv/bin/python benchmarks/ledger_verify.py \
        --database-url sqlite:////tmp/v1m.sqlite3 --root /work/main --root . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from coordinator.ledger import HopRow, Ledger

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def build(url: str, events: int, hops: int) -> None:
    ledger = Ledger(url)
    ledger.migrate()
    run_id = uuid.uuid4().hex
    rows = [
        HopRow(
            id=uuid.uuid4().hex,
            run_id=run_id,
            index=i,
            site=f"site-{i % 5}",
            hyperparameters={"learning_rate": 1e-3, "steps": 30},
            status="pending",
            metrics={},
        )
        for i in range(hops)
    ]
    ledger.create_run(run_id, "bench", {"task": "tabular", "dataset": "d"}, rows, None)
    # One transaction per batch (the append path is the same; it spares a commit per event).
    written, batch = 1, 1000
    while written < events:
        with ledger.transaction() as session:
            for _ in range(min(batch, events - written)):
                hop = session.get(HopRow, rows[written % hops].id)
                assert hop is not None
                hop.attempts += 1
                hop.metrics = {"loss": 1.0 / written}
                ledger.append_event(
                    session,
                    "hop.bench",
                    run_id=run_id,
                    hop_id=hop.id,
                    payload={"attempts": hop.attempts},
                )
                written += 1
    ledger.close()


def _label(root: Path) -> str:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return f"{root} ({commit})" if commit else str(root)


def _tree_memory_mib(pid: int) -> tuple[float, float, float]:
    """The resident memory (RSS, and PSS: shared pages split between their processes) of
    process `pid` and all its descendants, and the largest one process's RSS; zeros once it is
    gone."""
    rss = pss = largest = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Rss:"):
                own = int(line.split()[1])
                rss, largest = rss + own, max(largest, own)
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
        pending += [int(child) for child in children]
    return rss / 1024, pss / 1024, largest / 1024


def _sample_tree_memory(pid: int, peak: list[float], done: threading.Event) -> None:
    while not done.wait(0.1):
        rss, pss, largest = _tree_memory_mib(pid)
        peak[0], peak[1], peak[2] = max(peak[0], rss), max(peak[1], pss), max(peak[2], largest)


def verify_once(url: str, root: Path) -> dict[str, Any]:
    """One `baton ledger verify` of `url` by checkout `root`, in a fresh process."""
    command = [sys.executable, "-m", "coordinator", "ledger", "verify", "--database-url", url]
    env = {**os.environ, "PYTHONPATH": str(root)}
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak, done = [0.0, 0.0, 0.0], threading.Event()
        sampler = threading.Thread(target=_sample_tree_memory, args=(process.pid, peak, done))
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    if process.returncode != 0:
        raise SystemExit(f"ledger verify by {root} failed ({process.returncode}): {output}")
    return {
        "wall_s": round(seconds, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        # Of the largest process, sampled 10/s. wait4's ru_maxrss does not measure the verify:
        # Linux carries the memory a child had before its exec (its parent's) into its
        # high-water mark (1134 MiB under a pytest worker, the size of a benchmark that built
        # the ledger in process).
        "peak_rss_mib": round(peak[2]),
        # of all its processes together, sampled 10/s
        "peak_tree_rss_mib": round(peak[0]),
        "peak_tree_pss_mib": round(peak[1]),
        "load_1min_before": round(load, 2),
        "output": output.strip().splitlines()[0] if output.strip() else "",
    }


def markdown(figures: dict[str, Any]) -> str:
    head = (
        f"Command: `{figures['command']}`  \nLedger: {figures['ledger']}, {figures['events']} "
        f"events; machine: {figures['machine']}"
    )
    lines = [
        "# `baton ledger verify` on a large ledger",
        "",
        head,
        "",
        "Medians over the rounds (each round runs every checkout once, in turn; CPU = user + sys "
        "of the verify process and the processes it started).",
        "",
        "| checkout | wall s | CPU s | peak MiB: RSS largest process / RSS all / PSS all | "
        "runs: wall s "
        "(CPU s) | 1-min load before each |",
        "|---|---|---|---|---|---|",
    ]
    for label, summary in figures["checkouts"].items():
        runs = summary["runs"]
        each = ", ".join(f"{r['wall_s']} ({r['cpu_s']})" for r in runs)
        lines.append(
            f"| {label} | {summary['median_wall_s']} | {summary['median_cpu_s']} | "
            f"{summary['max_peak_rss_mib']} / {summary['max_peak_tree_rss_mib']} / "
            f"{summary['max_peak_tree_pss_mib']} | "
            f"{each} | "
            f"{', '.join(str(r['load_1min_before']) for r in runs)} |"
        )
    lines += ["", f"Target: <= 30 s wall, <= 200 MB peak RSS on {figures['events']} events.", ""]
    return "\n".join(lines)


def measure(url: str, roots: list[Path], rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {_label(root): [] for root in roots}
    for _ in range(rounds):
        for root, label in zip(roots, runs, strict=True):
            runs[label].append(verify_once(url, root))
            print(label, json.dumps(runs[label][-1]), flush=True)
    return {
        label: {
            "median_wall_s": round(statistics.median(r["wall_s"] for r in found), 2),
            "median_cpu_s": round(statistics.median(r["cpu_s"] for r in found), 2),
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in found),
            "max_peak_tree_rss_mib": max(r["peak_tree_rss_mib"] for r in found),
            "max_peak_tree_pss_mib": max(r.get("peak_tree_pss_mib", 0) for r in found),
            "runs": found,
        }
        for label, found in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument("--database-url", help="verify this ledger instead of building one")
    parser.add_argument("--root", type=Path, action="append",
                        help="checkout that verifies (repeatable; default: this one)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--name", default="ledger_verify", help="results file stem")
    args = parser.parse_args()
    roots = [root.resolve() for root in args.root or [ROOT]]
    figures: dict[str, Any] = {
        "command": shlex.join(["benchmarks/ledger_verify.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} cores, python {sys.version.split()[0]}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url
        if url is None:
            url = f"sqlite:///{Path(tmp) / 'ledger.sqlite3'}"
            started = time.perf_counter()
            build(url, args.events, args.hops)
            figures["build_seconds"] = round(time.perf_counter() - started, 1)
            figures["hops"] = args.hops
        ledger = Ledger(url)
        try:
            last = ledger.last_event()
        finally:
            ledger.close()
        figures["ledger"] = args.database_url or "built here"
        figures["events"] = last.seq if last is not None else 0
        figures["checkouts"] = measure(url, roots, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(figures))
    print(markdown(figures))


if __name__ == "__main__":
    main()
