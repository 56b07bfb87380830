"""How much admin reads hold up the coordinator's event loop: its lag while an admin polls.

Builds a SQLite ledger with `--finished-runs` finished runs (benchmarks/scale.py's history: 4
hops and 2 evaluations each) and one running run of `--live-hops` hops (its `--live-sites`
sites taking turns) whose first
`--committed-hops` are committed and the next leased, then starts the
coordinator in a child process (`--coordinator-tree`: from another checkout, for an A/B) with a
probe task on its event loop: it sleeps `--probe-ms` and records how late it wakes (the wait a
site's heartbeat, hand back or connect would have had). The parent, an admin client in its own
process over mTLS gRPC, first leaves the coordinator alone for `--quiet-seconds`, then calls
GetRun of the running run every `--get-run-every` seconds and ListRuns every
`--list-runs-every` seconds (0: never) for `--seconds`. Reported: the loop's lag p50/p99/max
in both phases, the calls' latency, the coordinator's CPU, and its CPU per GetRun when no
ListRuns is polled (the polled phase's CPU less the quiet phase's rate, over the GetRun calls).

    nice -n 10 .venv/bin/python benchmarks/admin_reads.py --finished-runs 1000 --name admin-reads
    nice -n 19 .venv/bin/python benchmarks/admin_reads.py --finished-runs 0 --live-hops 8 \
        --live-sites 2 --committed-hops 6 --list-runs-every 0 --name get-run-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def _quantiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(ordered), "p50_ms": round(ordered[len(ordered) // 2] * 1000, 2),
            "p99_ms": round(p99 * 1000, 2), "max_ms": round(ordered[-1] * 1000, 2)}  # fmt: skip


# ---- the coordinator's process ------------------------------------------------------------------


async def _serve(state: Path, pki: Path, probe_seconds: float) -> None:
    from coordinator.server import build_server
    from coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings(
        port=0, state_dir=state, ca_certificate=pki / "ca.crt",
        certificate=pki / "coordinator.crt", private_key=pki / "coordinator.key", dashboard=False,
    )  # fmt: skip
    server = await build_server(settings)
    lags: list[tuple[float, float]] = []  # (monotonic time, lateness)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    (state / "port").write_text(str(server.port))
    while not stop.is_set():
        started = time.monotonic()
        await asyncio.sleep(probe_seconds)
        woke = time.monotonic()
        lags.append((woke, woke - started - probe_seconds))
    import coordinator

    (state / "lags.json").write_text(json.dumps({"lags": lags, "module": coordinator.__file__}))
    await server.stop(0)


# ---- the admin's process ------------------------------------------------------------------------


def _build(
    state: Path, pki: Path, runs: int, live_hops: int, live_sites: int, committed: int
) -> str:
    """The PKI, the finished history and one running run: `committed` hops committed, the
    next leased."""
    from scale import build_history

    from coordinator.ledger import HopRow, Ledger
    from coordinator.plan import parse_plan
    from protocols.pki import Role, init_ca, issue_certificate

    init_ca(pki)
    issue_certificate(pki, pki, Role.COORDINATOR, "coordinator")
    issue_certificate(pki, pki, Role.ADMIN, "admin")
    state.mkdir()
    ledger = Ledger(f"sqlite:///{(state / 'ledger.sqlite3').resolve()}")
    ledger.migrate()
    sites = [f"site-{i:02d}" for i in range(50)]
    build_history(ledger, runs, sites)
    order = [sites[i % live_sites] for i in range(live_hops)]  # the sites taking turns
    plan = json.loads(parse_plan({"name": "live", "dataset": "notes", "labels": ["x", "y"],
                                  "sites": order}).to_json())  # fmt: skip
    hops = [HopRow(id=uuid.uuid4().hex, index=i, site=site, hyperparameters={},
                   status="pending", metrics={}) for i, site in enumerate(order)]  # fmt: skip
    run_id = uuid.uuid4().hex
    ledger.create_run(run_id, "live", plan, hops, None)
    previous = None
    for hop in hops[:committed]:
        ledger.lease_hop(hop.id, "token", previous)
        previous = uuid.uuid4().hex * 2
        ledger.commit_hop(hop.id, lease_token="token", output_sha256=previous,
                          metrics={"accuracy": 0.7, "loss": 0.5}, train_started_at_ns=1,
                          train_finished_at_ns=2, base_model_sha256="ab" * 32)  # fmt: skip
    ledger.lease_hop(hops[committed].id, "token", previous)
    ledger.close()
    return run_id


def _poll(call: Any, samples: list[float], until: float, every: float) -> None:
    while time.monotonic() < until:
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
        time.sleep(max(0.0, every - (time.perf_counter() - started)))


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from coordinator.console.admin import AdminClient
    from protocols.transport import TlsFiles
    from protocols.v1 import baton_pb2 as pb

    state, pki = tmp / "state", tmp / "pki"
    t0 = time.perf_counter()
    run_id = _build(state, pki, args.finished_runs, args.live_hops, args.live_sites,
                    args.committed_hops)  # fmt: skip
    built = time.perf_counter() - t0
    tree = args.coordinator_tree or Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{Path(__file__).resolve().parent}"}
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(tmp),
               "--probe-ms", str(args.probe_ms)]  # fmt: skip
    child = subprocess.Popen(command, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (state / "port").exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the coordinator did not start")
            time.sleep(0.02)
        port = int((state / "port").read_text())
        tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        admin = AdminClient(f"localhost:{port}", tls)
        view = admin.run(run_id)  # connected, and the running run is held
        if view.status != "running" or view.hops[args.committed_hops].status != "leased":
            raise SystemExit(f"the live run is not as built: {view.status} {view.error}")
        coordinator = psutil.Process(child.pid)
        quiet_from = time.monotonic()
        cpu_quiet = coordinator.cpu_times()
        time.sleep(args.quiet_seconds)
        polled_from = time.monotonic()
        cpu_before = coordinator.cpu_times()
        until = polled_from + args.seconds
        get_run: list[float] = []
        list_runs: list[float] = []
        # Two threads of the admin's process, as a status watch and a dashboard would be.
        threads = [
            threading.Thread(target=_poll, args=(lambda: admin.run(run_id), get_run, until,
                                                 args.get_run_every)),
        ]  # fmt: skip
        if args.list_runs_every > 0:
            threads.append(threading.Thread(target=_poll, args=(
                lambda: admin._stub.ListRuns(pb.ListRunsRequest(), timeout=120), list_runs,
                until, args.list_runs_every)))  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        polled_to = time.monotonic()
        cpu_after = coordinator.cpu_times()
        admin.close()
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(60)
    probed = json.loads((state / "lags.json").read_text())
    lags = probed["lags"]
    quiet = [lag for at, lag in lags if quiet_from <= at < polled_from]
    polled = [lag for at, lag in lags if polled_from <= at < polled_to]
    cpu = cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system
    idle = (cpu_before.user + cpu_before.system - cpu_quiet.user - cpu_quiet.system) / (
        polled_from - quiet_from
    )  # the probe's and the coordinator's own background work, per second
    per_get_run = None
    if not list_runs and get_run:
        per_get_run = round((cpu - idle * (polled_to - polled_from)) / len(get_run) * 1000, 3)
    return {
        "finished_runs": args.finished_runs,
        "live_hops": args.live_hops,
        "committed_hops": args.committed_hops,
        "coordinator_tree": str(tree),
        "coordinator_module": probed["module"],  # the code the coordinator ran
        "probe_ms": args.probe_ms,
        "quiet_seconds": args.quiet_seconds,
        "seconds": args.seconds,
        "get_run_every": args.get_run_every,
        "list_runs_every": args.list_runs_every,
        "loop_lag_quiet": _quantiles(quiet),
        "loop_lag_polled": _quantiles(polled),
        "get_run_running": _quantiles(get_run),
        "list_runs": _quantiles(list_runs),
        "coordinator_cpu_cores_polled": round(cpu / (polled_to - polled_from), 2),
        "coordinator_cpu_cores_quiet": round(idle, 3),
        "coordinator_cpu_ms_per_get_run": per_get_run,
        "build_seconds": round(built, 1),
    }


def markdown(figures: dict[str, Any], command: str) -> str:
    def row(label: str, q: dict[str, float]) -> str:
        return f"| {label} | {q.get('p50_ms')} | {q.get('p99_ms')} | {q.get('max_ms')} | {q['n']} |"

    return "\n".join([
        "# Admin reads and the coordinator's event loop", "", f"Command: `{command}`", "",
        f"{figures['finished_runs']} finished runs and one running run of "
        f"{figures['live_hops']} hops ({figures['committed_hops']} committed, the next leased) "
        "in a SQLite ledger; "
        f"coordinator from `{figures['coordinator_tree']}`. Loop lag: how late a "
        f"{figures['probe_ms']} ms sleep on the coordinator's loop wakes.", "",
        "| figure (ms) | p50 | p99 | max | n |", "|---|---|---|---|---|",
        row(f"loop lag, no admin calls ({figures['quiet_seconds']} s)", figures["loop_lag_quiet"]),
        row(f"loop lag, admin polling ({figures['seconds']} s)", figures["loop_lag_polled"]),
        row(f"GetRun of the running run (every {figures['get_run_every']} s)",
            figures["get_run_running"]),
        row(f"ListRuns (every {figures['list_runs_every']} s)", figures["list_runs"]),
        "", f"Coordinator CPU while polled: {figures['coordinator_cpu_cores_polled']} cores "
        f"(quiet: {figures['coordinator_cpu_cores_quiet']}); per GetRun (no ListRuns polled): "
        f"{figures['coordinator_cpu_ms_per_get_run']} ms.", "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finished-runs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--quiet-seconds", type=float, default=5.0)
    parser.add_argument("--get-run-every", type=float, default=0.1)
    parser.add_argument("--list-runs-every", type=float, default=3.0, help="0: no ListRuns")
    parser.add_argument("--live-hops", type=int, default=4, help="hops of the running run")
    parser.add_argument("--live-sites", type=int, default=4, help="its sites, taking turns")
    parser.add_argument("--committed-hops", type=int, default=0,
                        help="of which committed (the next is leased)")  # fmt: skip
    parser.add_argument("--probe-ms", type=float, default=5.0)
    parser.add_argument(
        "--coordinator-tree",
        type=Path,
        default=None,
        help="run the coordinator from this checkout (default: this one)",
    )
    parser.add_argument("--name", default="admin-reads", help="results file stem")
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.live_sites <= 50:
        parser.error("--live-sites must be from 1 to 50")
    if not 0 <= args.committed_hops < args.live_hops:
        parser.error("--committed-hops must be at least 0 and below --live-hops")
    if args.serve is not None:
        asyncio.run(_serve(args.serve / "state", args.serve / "pki", args.probe_ms / 1000))
        return
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args, Path(tmp))
    print(json.dumps(figures), flush=True)
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/admin_reads.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(figures, command))


if __name__ == "__main__":
    main()
