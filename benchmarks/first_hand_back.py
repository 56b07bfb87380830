"""A cold coordinator's first hand backs, call by call: an interleaved A/B of checkouts.

Per round and checkout (`--root`, repeatable, in turn): a fresh `baton coordinator serve` from
that checkout (its own state directory), two scripted sites (`hand_back_call.TimedSite`) and a
two-site sequential run; `--delay` seconds after the run starts (a real site loads its model and
trains meanwhile: the coordinator is idle, as before a cold cluster's first hand back), the
sites hand back `--hops` hops of `--kib` KiB one after the other with HandBackHopWhole, `--gap`
seconds apart. Per hop: the call's wall time at the site, the next site's task arrival from the
call's start (the coordinator's part of a handoff: check, store, commit, lease, push), and the
coordinator process's CPU time from the call's start to `--gap` s after its answer (what the
hand back costs it, bookkeeping after the answer included). The first hop is the cold one.
`--runs N`: N runs on each coordinator, one after the other (each then exactly `--hops` hops,
the next started once it has completed): the first hand back of runs 2..N is a new run's on a
warm coordinator, reported apart from their later ones (each run's last, which completes it,
left out).
`--postgres ADMIN_URL`: each coordinator's ledger is a new database on that server (dropped
after the run), not an SQLite file. Writes JSON + Markdown under benchmarks/results/.

    nice -n 10 .venv/bin/python benchmarks/first_hand_back.py --root /tmp/base --root . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import wait_for_completed_run
from benchmarks.hand_back_call import _hand_back, _spy, serve_two_site_run, two_site_plan
from benchmarks.ledger_commit import _label, scratch_database
from benchmarks.transfer import RESULTS, _tls
from coordinator.console.admin import AdminClient


def _cpu(pid: int) -> float:
    """The process's on-CPU seconds over its live threads (/proc schedstat: ns, not ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def one(root: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One cold coordinator from `root`: per hop, call ms, next task ms, coordinator CPU ms."""
    with scratch_database(args.postgres) as url:
        return _one_served(root, args, tmp, url)


def _one_served(root: Path, args: argparse.Namespace, tmp: Path, url: str | None) -> dict[str, Any]:
    # One run of `--hops` hops per `--runs`, one after the other: with more than one, each run
    # is exactly `--hops` hops long (it completes with its last hand back) and the next starts.
    cycles = (args.hops + 2) // 2 if args.runs == 1 else args.hops // 2
    proc, sites = serve_two_site_run(root, tmp, "first-hand-back", cycles, url)
    runs: list[dict[str, Any]] = []
    try:
        spy = None
        if args.profile is not None:
            # py-spy over the first `--profile-calls` calls (attached during the delay), its
            # stacks to a file.
            spy = _spy(proc.pid, args.profile / f"{tmp.name}.txt", args.profile_rate,
                       gil=args.profile_gil)  # fmt: skip
        calls = 0
        for number in range(args.runs):
            if number:
                _start_next_run(tmp, cycles, number)
            call_ms: list[float] = []
            next_task_ms: list[float] = []
            cpu_ms: list[float] = []
            time.sleep(args.delay)
            for index in range(args.hops):
                site = sites["site-a" if index % 2 == 0 else "site-b"]
                following = sites["site-b" if index % 2 == 0 else "site-a"]
                task = site.tasks.get(timeout=60)
                data = site.bundle(task, args.kib * 1024)
                cpu_from = _cpu(proc.pid)
                started, seconds = _hand_back(site, task, data, "whole")
                time.sleep(args.gap)
                cpu_ms.append((_cpu(proc.pid) - cpu_from) * 1e3)
                calls += 1
                if spy is not None and calls >= args.profile_calls:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its stacks and exits
                    spy.wait(60)
                    spy = None
                call_ms.append(seconds * 1e3)
                arrived = [at for hop_id, at in following.received.items() if at >= started]
                next_task_ms.append((min(arrived) - started) * 1e3 if arrived else float("nan"))
            runs.append({
                "call_ms": [round(v, 2) for v in call_ms],
                "next_task_ms": [round(v, 2) for v in next_task_ms],
                "coordinator_cpu_ms": [round(v, 1) for v in cpu_ms],
            })  # fmt: skip
            if number + 1 < args.runs:
                _wait_completed(tmp)
        for site in sites.values():
            site.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {**runs[0], "later_runs": runs[1:], "load_1min": round(os.getloadavg()[0], 2)}


def _admin(tmp: Path) -> AdminClient:
    port = int((tmp / "coordinator.port").read_text())
    return AdminClient(f"localhost:{port}", _tls(tmp / "pki", "admin"))


def _start_next_run(tmp: Path, cycles: int, number: int) -> None:
    """Starts the coordinator's next two-site run (the one before it has completed)."""
    with _admin(tmp) as admin:
        admin.start_run(two_site_plan(f"first-hand-back-{number}", cycles))


def _wait_completed(tmp: Path) -> None:
    """Waits until every run the coordinator holds has completed (raises if one failed)."""
    with _admin(tmp) as admin:
        for run in admin.runs():
            wait_for_completed_run(admin, run.run_id, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, action="append", help="checkout (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hops", type=int, default=4)
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="runs per coordinator, one after the other (each then exactly --hops hops, even)",
    )
    parser.add_argument("--kib", type=int, default=300)
    parser.add_argument("--delay", type=float, default=8.0, help="s from run start to 1st call")
    parser.add_argument("--gap", type=float, default=0.3, help="s after each answer")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder: py-spy's stacks of the coordinator over the first call(s)",
    )
    parser.add_argument(
        "--profile-calls", type=int, default=1, help="calls --profile covers, from the first"
    )
    parser.add_argument("--profile-rate", type=int, default=1000)
    parser.add_argument(
        "--profile-gil", action="store_true", help="--profile samples only the GIL's holder"
    )
    parser.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        help="a PostgreSQL server's admin URL: each coordinator's ledger a new database there",
    )
    parser.add_argument("--name", default="first-hand-back")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    roots = [r.resolve() for r in (args.root or [Path(__file__).resolve().parent.parent])]
    runs: dict[str, list[dict[str, Any]]] = {_label(r): [] for r in roots}
    for _ in range(args.rounds):
        for root, label in zip(roots, runs, strict=True):
            with tempfile.TemporaryDirectory(prefix="first-hand-back-") as tmp:
                found = one(root, args, Path(tmp))
            runs[label].append(found)
            print(label, json.dumps(found), flush=True)
    keys = ("call_ms", "next_task_ms", "coordinator_cpu_ms")
    # With --runs, a run's last hand back completes it (no next task, the export): left out.
    tail = slice(1, -1) if args.runs > 1 else slice(1, None)
    rows = []
    for label, results in runs.items():
        first = {key: [r[key][0] for r in results] for key in keys}
        later = {key: statistics.median(v for r in results for v in r[key][tail]) for key in keys}
        row: dict[str, Any] = {
            "checkout": label,
            "first": first,
            "later_median": later,
            "runs": results,
        }
        if args.runs > 1:
            warm = [w for r in results for w in r["later_runs"]]
            row["warm_first"] = {key: [w[key][0] for w in warm] for key in keys}
            row["warm_later_median"] = {
                key: statistics.median(v for w in warm for v in w[key][tail]) for key in keys
            }
        rows.append(row)
    shown = ["$ADMIN_URL" if a == args.postgres else a for a in sys.argv[1:]]  # no password
    command = " ".join(["benchmarks/first_hand_back.py", *shown])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# A cold coordinator's first hand backs (scripted sites)", "",
        f"Command: `{command}`  ", f"{args.rounds} rounds, checkouts interleaved, a fresh "
        f"coordinator per run; {args.hops} hops of {args.kib} KiB, the first {args.delay} s "
        f"after the run's start; ledger: "
        f"{'PostgreSQL, a new database per run' if args.postgres else 'SQLite'}; machine: "
        f"{os.cpu_count()} cores.", "",
        "| checkout | first call ms (per run) | later calls ms (median) | first: next task ms "
        "| later: next task ms | first: coordinator CPU ms | later: CPU ms | 1-min load |",
        "|---|---|---:|---|---:|---|---:|---|",
        *(f"| {r['checkout']} | {r['first']['call_ms']} | {r['later_median']['call_ms']:.2f} | "
          f"{r['first']['next_task_ms']} | {r['later_median']['next_task_ms']:.2f} | "
          f"{r['first']['coordinator_cpu_ms']} | {r['later_median']['coordinator_cpu_ms']:.1f} | "
          f"{[x['load_1min'] for x in r['runs']]} |" for r in rows),
    ]  # fmt: skip
    if args.runs > 1:
        lines += [
            "", f"Runs 2 to {args.runs} of each coordinator (warm: a run before it on the same "
            "coordinator), their first hand back against their later ones (each run's last, "
            "which completes it, left out):", "",
            "| checkout | first of a run: call ms | later: call ms (median) | first: next task "
            "ms | later: next task ms | first: CPU ms | later: CPU ms |",
            "|---|---|---:|---|---:|---|---:|",
            *(f"| {r['checkout']} | {r['warm_first']['call_ms']} | "
              f"{r['warm_later_median']['call_ms']:.2f} | {r['warm_first']['next_task_ms']} | "
              f"{r['warm_later_median']['next_task_ms']:.2f} | "
              f"{r['warm_first']['coordinator_cpu_ms']} | "
              f"{r['warm_later_median']['coordinator_cpu_ms']:.1f} |" for r in rows),
        ]  # fmt: skip
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
