"""The coordinator's CPU to build an admin's view of a running run (`RunViews.run`), alone.

Builds a SQLite ledger with one running run of `--hops` hops over two sites, the first
`--committed` committed and the next leased (benchmarks/admin_reads.py's live run), starts the
coordinator in a child process (`--coordinator-tree`: from another checkout, for an A/B) and
times on its event loop, in process CPU time, `--calls` calls of `engine.views.run` of that
run as GetRun makes them: with nothing changed between calls ("unchanged"), and with the run's
held rows written through before each call (a heartbeat's hop transition's worth: "changed",
the rows copied back with their values, which marks the run changed). Also the views of
`--finished-runs` finished runs (benchmarks/scale.py's history, 4 hops each) built from rows
read from SQL, as ListRuns builds them on the ledger reader's thread and the dashboard on its
own ("finished", per run; the rows read once, before timing). No gRPC, TLS or
serialisation: benchmarks/admin_reads.py measures the whole call.

    nice -n 19 .venv/bin/python benchmarks/run_view_cpu.py --name run-view-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


async def _time_views(
    state: Path, pki: Path, run_id: str, calls: int, rounds: int
) -> dict[str, Any]:
    from coordinator.server import build_server
    from coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings(
        port=0, state_dir=state, ca_certificate=pki / "ca.crt",
        certificate=pki / "coordinator.crt", private_key=pki / "coordinator.key", dashboard=False,
    )  # fmt: skip
    server = await build_server(settings)
    try:
        engine = server.engine
        view = await engine.views.run(run_id)
        if view.status != "running":
            raise SystemExit(f"the run is not running: {view.status} {view.error}")
        run = engine.runs.get(run_id)
        assert run is not None
        leased = next(h for h in run.hops if h.status == "leased")
        rows = engine.ledger.run(run_id).hops  # the same rows, as a commit writes them through
        written = next(h for h in rows if h.id == leased.id)
        finished = [r for r in engine.ledger.runs() if r.status != "running"]
        of_run = engine.ledger.rounds_of(None)
        figures: dict[str, list[float]] = {"unchanged": [], "changed": [], "finished": []}
        for _ in range(rounds):
            for kind in figures:
                started = time.process_time()
                if kind == "finished":
                    for row in finished:
                        engine.views.status(row, of_run.get(row.id, []))
                    figures[kind].append((time.process_time() - started) / len(finished) * 1e6)
                    continue
                for _ in range(calls):
                    if kind == "changed":
                        engine.runs._apply([written])
                    await engine.views.run(run_id)
                figures[kind].append((time.process_time() - started) / calls * 1e6)
        import coordinator

        return {
            "module": coordinator.__file__,
            "hops": len(view.hops),
            "view_bytes": view.ByteSize(),
            **{
                f"{kind}_us_per_call": round(statistics.median(us), 1)
                for kind, us in figures.items()
            },
            **{f"{kind}_us_rounds": [round(u, 1) for u in us] for kind, us in figures.items()},
        }
    finally:
        await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hops", type=int, default=8)
    parser.add_argument("--committed", type=int, default=6)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and kind")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--finished-runs", type=int, default=500)
    parser.add_argument(
        "--coordinator-tree",
        type=Path,
        default=None,
        help="run the coordinator from this checkout (default: this one)",
    )
    parser.add_argument("--name", default="run-view-cpu", help="results file stem")
    parser.add_argument("--child", nargs=2, type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        tmp, out = args.child
        run_id = (tmp / "run_id").read_text()
        figures = asyncio.run(
            _time_views(tmp / "state", tmp / "pki", run_id, args.calls, args.rounds)
        )
        out.write_text(json.dumps(figures))
        return
    if not 0 <= args.committed < args.hops:
        parser.error("--committed must be at least 0 and below --hops")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from admin_reads import _build

    tree = args.coordinator_tree or Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        run_id = _build(tmp / "state", tmp / "pki", max(args.finished_runs, 1), args.hops, 2,
                        args.committed)  # fmt: skip
        (tmp / "run_id").write_text(run_id)
        env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{Path(__file__).resolve().parent}"}
        out = tmp / "figures.json"
        child = [sys.executable, str(Path(__file__).resolve()), "--child", str(tmp), str(out),
                   "--calls", str(args.calls), "--rounds", str(args.rounds)]  # fmt: skip
        subprocess.run(child, env=env, check=True)
        figures = {"coordinator_tree": str(tree), "committed": args.committed, "calls": args.calls,
                   "rounds": args.rounds, "finished_runs": max(args.finished_runs, 1),
                   **json.loads(out.read_text())}  # fmt: skip
    print(json.dumps(figures), flush=True)
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/run_view_cpu.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join([
        "# CPU of an admin's view of a running run (RunViews.run, on the loop)", "",
        f"Command: `{command}`", "",
        f"One running run of {figures['hops']} hops ({args.committed} committed, the next "
        f"leased; its view {figures['view_bytes']} bytes); coordinator from "
        f"`{figures['module']}`. Process CPU per call, median of {args.rounds} rounds of "
        f"{args.calls} calls.", "",
        "| the run between calls | us per call | rounds |", "|---|---|---|",
        f"| unchanged | {figures['unchanged_us_per_call']} | {figures['unchanged_us_rounds']} |",
        f"| a hop row written through before each call | {figures['changed_us_per_call']} | "
        f"{figures['changed_us_rounds']} |",
        f"| a finished run's view from SQL rows (ListRuns, dashboard), of "
        f"{figures['finished_runs']} | {figures['finished_us_per_call']} | "
        f"{figures['finished_us_rounds']} |", "",
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
