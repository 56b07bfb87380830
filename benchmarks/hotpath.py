"""The coordinator's per-call cost with a long history, in CPU time (steady on a busy machine).

Builds a SQLite ledger with `--finished-runs` finished runs (scale.py's history), starts a
`RunEngine` in this process with one running run whose first hop is leased, then calls the engine
as the servicer does and reads, per call: the CPU time of this thread (`time.thread_time`), the
wall time, and the SQL statements the ledger ran. Calls: a heartbeat of an idle agent (no hop), a
heartbeat of the live hop, a connect of `--agents` new sites (each connect dispatches every
running run), and a watchdog pass. Then `--handoffs` hop commits with the next hop's lease, once as
two transactions and once as one (where the ledger can join them), on the same ledger.

Runs against any checkout with the same engine calls (the interleaved before/after of
benchmarks/results/hotpath.md):

    nice -n 19 python benchmarks/hotpath.py --label after
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import build_history  # noqa: E402

from coordinator.engine import RunEngine  # noqa: E402
from coordinator.errors import NotFound  # noqa: E402
from coordinator.ledger import HopRow, Ledger  # noqa: E402
from coordinator.plan import parse_plan  # noqa: E402
from coordinator.store import CheckpointStore  # noqa: E402
from protocols.v1 import baton_pb2 as pb  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _figures(cpu: list[float], wall: list[float], statements: int) -> dict[str, Any]:
    ordered = sorted(wall)
    return {
        "calls": len(cpu),
        "cpu_ms_mean": round(statistics.fmean(cpu) * 1000, 3),
        "wall_ms_p50": round(statistics.median(wall) * 1000, 3),
        "wall_ms_p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 3),
        "sql_statements_per_call": round(statements / len(cpu), 2),
    }


class _Statements:
    def __init__(self, ledger: Ledger) -> None:
        self.count = 0
        event.listen(ledger.engine, "before_cursor_execute", self._seen)

    def _seen(self, *_args: Any) -> None:
        self.count += 1


async def _measure(
    call: Callable[[], Awaitable[None]], times: int, statements: _Statements
) -> dict[str, Any]:
    cpu: list[float] = []
    wall: list[float] = []
    before = statements.count
    for _ in range(times):
        c0, w0 = time.thread_time(), time.perf_counter()
        await call()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return _figures(cpu, wall, statements.count - before)


async def _engine_calls(engine: RunEngine, args: argparse.Namespace) -> dict[str, Any]:
    statements = _Statements(engine.ledger)
    plan = parse_plan({"name": "live", "dataset": "notes", "labels": ["x", "y"],
                       "sites": ["site-a", "site-b"]})  # fmt: skip
    await engine.start_run(plan)
    session = await engine.connect("site-a")
    task = session.queue.get_nowait()
    while task.WhichOneof("kind") != "hop":
        task = session.queue.get_nowait()
    live = pb.Heartbeat(hop_id=task.hop.hop_id, lease_token=task.hop.lease_token,
                        phase="training")  # fmt: skip
    await engine.heartbeat("site-a", live)  # leased -> training (one write)
    idle = pb.Heartbeat(phase="idle")

    async def idle_beat() -> None:
        with contextlib.suppress(NotFound):  # what an agent without a hop gets ("cancel")
            await engine.heartbeat("site-b", idle)

    async def live_beat() -> None:
        await engine.heartbeat("site-a", live)

    names = iter(f"agent-{n:04d}" for n in range(args.agents))

    async def connect() -> None:
        await engine.connect(next(names))

    figures = {
        "heartbeat_idle_agent": await _measure(idle_beat, args.beats, statements),
        "heartbeat_live_hop": await _measure(live_beat, args.beats, statements),
        "connect": await _measure(connect, args.agents, statements),
        "watchdog_pass": await _measure(engine.check_deadlines, args.passes, statements),
    }
    return figures


def _handoffs(ledger: Ledger, count: int, joined: bool) -> dict[str, Any]:
    """`count` commit + next-lease pairs on one run; one transaction each pair if `joined`."""
    run_id = uuid.uuid4().hex
    plan = json.loads(parse_plan({"name": "h", "dataset": "notes", "labels": ["x", "y"],
                                  "sites": ["site-a", "site-b"]}).to_json())  # fmt: skip
    hops = [HopRow(id=uuid.uuid4().hex, index=i, site=("site-a", "site-b")[i % 2],
                   hyperparameters={}, status="pending", metrics={})
            for i in range(count + 1)]  # fmt: skip
    ledger.create_run(run_id, "handoffs", plan, hops, None)
    token = secrets.token_hex(16)
    ledger.lease_hop(hops[0].id, token, None)
    commits = 0

    def on_commit(_connection: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(ledger.engine, "commit", on_commit)
    cpu: list[float] = []
    wall: list[float] = []
    for i in range(count):
        output = uuid.uuid4().hex * 2
        following = secrets.token_hex(16)
        c0, w0 = time.thread_time(), time.perf_counter()
        if joined:
            with ledger.transaction():
                _commit(ledger, hops[i].id, token, output)
                ledger.lease_hop(hops[i + 1].id, following, output)
        else:
            _commit(ledger, hops[i].id, token, output)
            ledger.lease_hop(hops[i + 1].id, following, output)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
        token = following
    event.remove(ledger.engine, "commit", on_commit)
    figures = _figures(cpu, wall, 0)
    del figures["sql_statements_per_call"]
    figures["commits_per_handoff"] = commits / count
    return figures


def _commit(ledger: Ledger, hop_id: str, token: str, output: str) -> None:
    ledger.commit_hop(hop_id, lease_token=token, output_sha256=output, metrics={"loss": 0.5},
                      train_started_at_ns=1, train_finished_at_ns=2,
                      base_model_sha256="ab" * 32)  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
        ledger.migrate()
        sites = ["site-a", "site-b", "site-c", "site-d"]
        for site in sites:
            ledger.register_site(site, agent_version="bench", capabilities=[], base_models=[],
                                 datasets=[], certificate_serial="1")  # fmt: skip
        build_history(ledger, args.finished_runs, sites)
        engine = RunEngine(ledger, CheckpointStore(state / "checkpoints"), state / "runs",
                           ca_pem=b"", max_checkpoint_bytes=1 << 20)  # fmt: skip
        figures: dict[str, Any] = asyncio.run(_engine_calls(engine, args))
        figures["handoff_two_transactions"] = _handoffs(ledger, args.handoffs, joined=False)
        if hasattr(ledger, "row_observers"):  # a ledger whose transactions can be joined
            figures["handoff_one_transaction"] = _handoffs(ledger, args.handoffs, joined=True)
        ledger.close()
    return figures


def markdown(label: str, figures: dict[str, Any], command: str, load: str) -> str:
    lines = [
        f"# Coordinator per-call cost ({label})",
        "",
        f"Command: `{command}`; load average at the start: {load}",
        "",
        "| call | calls | CPU ms (mean) | wall p50 / p99 ms | SQL statements per call |",
        "|---|---|---|---|---|",
    ]
    for name, row in figures.items():
        if name.startswith("handoff"):
            continue
        lines.append(f"| {name} | {row['calls']} | {row['cpu_ms_mean']} | {row['wall_ms_p50']} "
                     f"/ {row['wall_ms_p99']} | {row['sql_statements_per_call']} |")  # fmt: skip
    lines += ["", "| hop commit + next lease | handoffs | CPU ms (mean) | wall p50 / p99 ms "
              "| commits per handoff |", "|---|---|---|---|---|"]  # fmt: skip
    for name, row in figures.items():
        if name.startswith("handoff"):
            lines.append(f"| {name} | {row['calls']} | {row['cpu_ms_mean']} | {row['wall_ms_p50']}"
                         f" / {row['wall_ms_p99']} | {row['commits_per_handoff']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finished-runs", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--beats", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--handoffs", type=int, default=100)
    parser.add_argument("--label", default="after", help="names the result files")
    args = parser.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    figures = run(args)
    command = "python benchmarks/hotpath.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"hotpath-{args.label}"
    stem.with_suffix(".json").write_text(
        json.dumps({"command": command, "uptime": load, **figures}, indent=2) + "\n"
    )
    stem.with_suffix(".md").write_text(markdown(args.label, figures, command, load))
    print(markdown(args.label, figures, command, load))


if __name__ == "__main__":
    main()
