"""The coordinator with a long history: idle agents at scale, and ledger verify on 1M events.

Part 1 builds a SQLite ledger with `--finished-runs` finished runs through the ledger API, as the
engine writes them (each hop leased, its checkpoint recorded, committed and validated; the run
completed; evaluations requested and answered: 22 chained events per run, a checkpoint row per hop),
starts `baton coordinator serve` in its own process (start-to-ready = until the bound port is
written), then connects `--agents` idle agents: real mTLS gRPC clients (one certificate each, in
this process) that say Hello as a site that saw the history does (the last ledger hash it
acknowledged and its kept ledger head, both looked up by the coordinator), open their task stream
(connected once the stream delivers its first message, the signed ledger head) and send a
heartbeat every `--beat-seconds`. One of them holds a live lease of a running run and heartbeats
it (the path a training site uses). Reported: Hello and heartbeat p50/p99, time to connect all,
the coordinator's RSS.

With `--admin-poll`, an admin client polls GetRun of the running run every
`--get-run-every` seconds and ListRuns every `--list-runs-every` seconds while the agents beat
(the load `baton run status --watch` and a dashboard put on a coordinator): the admin calls'
latency is reported beside the heartbeats'. `--coordinator-tree` runs the coordinator from another
checkout (an A/B of the coordinator's code with this driver and ledger builder).

Part 2 writes `--events` events with the real hash chain (each carries a hop row's snapshot, as
the append path does) straight into a SQLite ledger, then times `baton ledger verify` in a fresh
process (`ledger_verify.verify_once`) and samples the peak RSS and PSS of that process and the
processes it starts.

    nice -n 10 .venv/bin/python benchmarks/scale.py --agents 500 --finished-runs 1000 \
        --events 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil
from sqlalchemy import insert, update

from coordinator.ledger import CheckpointRow, EvaluationRow, EventRow, HopRow, Ledger
from coordinator.ledger._integrity import STATE_ROWS_KEY, row_entry
from coordinator.ledger._repository import GENESIS_HASH, event_hash
from protocols.pki import Role, init_ca, issue_certificate
from protocols.transport import MAX_MESSAGE_BYTES, TlsFiles
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc

RESULTS = Path(__file__).resolve().parent / "results"
HOPS_PER_RUN = 4
EVALUATIONS_PER_RUN = 2


def _quantiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(p99 * 1000, 2), "max_ms": round(ordered[-1] * 1000, 2)}  # fmt: skip


# ---- part 1: history + idle agents --------------------------------------------------------------


def _plan(sites: list[str]) -> dict[str, Any]:
    return {"name": "history", "task": "seq-classification", "dataset": "notes",
            "labels": ["x", "y"], "sites": sites}  # fmt: skip


# A MiniLM LoRA adapter's tensor list, as a hand back records it in its checkpoint's row.
TENSORS = [{"name": f"layer.{k}.lora_{ab}", "shape": [8, 384], "dtype": "F32"}
           for k in range(12) for ab in "AB"]  # fmt: skip


def build_history(ledger: Ledger, runs: int, sites: list[str]) -> None:
    """Finished runs written through the ledger API, as the engine writes them: each run created,
    each hop leased, its checkpoint recorded, committed and validated, the run completed, then
    evaluations of its final checkpoint requested and answered (one durable transaction each, every
    event chained and carrying its rows' snapshots)."""
    for n in range(runs):
        run_id = uuid.uuid4().hex
        order = [sites[(n + i) % len(sites)] for i in range(HOPS_PER_RUN)]
        hops = [
            HopRow(
                id=uuid.uuid4().hex,
                index=i,
                site=site,
                status="pending",
                hyperparameters={"learning_rate": 1e-3, "steps": 30},
                metrics={},
            )
            for i, site in enumerate(order)
        ]
        ledger.create_run(run_id, f"history-{n}", _plan(order), hops, None)
        parent: str | None = None
        for hop in hops:
            token = uuid.uuid4().hex
            ledger.lease_hop(hop.id, token, parent)
            sha = uuid.uuid4().hex * 2
            ledger.record_checkpoint(
                CheckpointRow(
                    sha256=sha,
                    size=300_000,
                    run_id=run_id,
                    hop_id=hop.id,
                    producer_site=hop.site,
                    parent_sha256=parent,
                    manifest={"format": "peft", "base_model_sha256": "ab" * 32},
                    tensors=TENSORS,
                    signature="5" * 142,
                    producer_certificate="c" * 900,
                    stored_at=datetime.now(UTC),
                    status="stored",
                )
            )
            ledger.commit_hop(
                hop.id,
                lease_token=token,
                output_sha256=sha,
                metrics={"train_loss": 0.5},
                train_started_at_ns=1,
                train_finished_at_ns=2,
                base_model_sha256="ab" * 32,
            )
            ledger.record_hop_validation(
                hop.id, site=hop.site, ok=True, metrics={"accuracy": 0.7, "loss": 0.5}, error=""
            )
            parent = sha
        ledger.transition_run(
            run_id,
            expected=("running",),
            status="completed",
            payload={"final_sha256": parent},
            final_sha256=parent,
        )
        evaluations = [
            EvaluationRow(
                id=uuid.uuid4().hex,
                run_id=run_id,
                checkpoint_sha256=parent,
                site=site,
                split="validation",
                status="pending",
                lease_token=uuid.uuid4().hex,
                metrics={},
                created_at=datetime.now(UTC),
            )
            for site in order[:EVALUATIONS_PER_RUN]
        ]
        ledger.create_evaluations(evaluations)
        for evaluation in evaluations:
            ledger.finish_evaluation(evaluation.id, metrics={"accuracy": 0.7})


def _aio_channel(port: int, tls: TlsFiles) -> grpc.aio.Channel:
    ca, cert, key = tls.read()
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]  # fmt: skip
    return grpc.aio.secure_channel(f"localhost:{port}", credentials, options=options)


class IdleAgent:
    """A site that connects and then only keeps its stream open and its heartbeats going."""

    def __init__(self, name: str, port: int, tls: TlsFiles, head: tuple[int, str]) -> None:
        self.name = name
        self.head = head  # (seq, hash): the ledger head this site last saw
        self.channel = _aio_channel(port, tls)
        self.stub = pb_grpc.SiteServiceStub(self.channel)
        self.stream: Any = None
        self.hop: pb.HopTask | None = None
        self.got_hop = asyncio.Event()
        self.pump: asyncio.Task[None] | None = None

    async def connect(self, hello_ms: list[float]) -> None:
        request = pb.HelloRequest(agent_version="bench", protocol_version=1,
                                  capabilities=["seq-classification"])  # fmt: skip
        request.base_models.add(name="tiny", sha256="ab" * 32)
        # What a real site reports, so that the run's preflight passes: the dataset (with the
        # plan's labels) and no approval needed.
        request.datasets.add(name="notes", task="seq-classification", train_examples=100,
                             validation_examples=20, labels=["x", "y"])  # fmt: skip
        request.approval_not_required = True
        if self.head[0]:
            request.last_ledger_hash = self.head[1]
            request.kept_head.seq, request.kept_head.hash = self.head
        started = time.perf_counter()
        await self.stub.Hello(request, timeout=120)
        hello_ms.append(time.perf_counter() - started)
        self.stream = self.stub.StreamTasks(pb.TaskStreamRequest())
        first = await self.stream.read()  # the signed ledger head: the stream is registered
        assert first is not grpc.aio.EOF, f"{self.name}: stream closed"
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while (task := await self.stream.read()) is not grpc.aio.EOF:
                if task.WhichOneof("kind") == "hop":
                    self.hop = task.hop
                    self.got_hop.set()
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass

    async def beat(self, samples: list[float], until: float, every: float, phase: str) -> None:
        await asyncio.sleep(every * (hash(self.name) % 1000) / 1000)  # spread like real agents
        while time.monotonic() < until:
            hop = self.hop
            beat = pb.Heartbeat(
                hop_id=hop.hop_id if hop else "",
                lease_token=hop.lease_token if hop else "",
                phase=phase,
            )
            started = time.perf_counter()
            await self.stub.SendHeartbeat(beat, timeout=60)
            samples.append(time.perf_counter() - started)
            await asyncio.sleep(every)

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        await self.channel.close()


async def _poll(call: Any, samples: list[float], until: float, every: float) -> None:
    """An admin call every `every` seconds until `until` (monotonic), each one's latency kept."""
    while time.monotonic() < until:
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
        await asyncio.sleep(max(0.0, every - (time.perf_counter() - started)))


def _make_pki(root: Path, agents: int) -> list[str]:
    init_ca(root)
    issue_certificate(root, root, Role.COORDINATOR, "coordinator")
    issue_certificate(root, root, Role.ADMIN, "admin")
    names = [f"site-{i:04d}" for i in range(agents)]
    for name in names:
        issue_certificate(root, root, Role.SITE, name)
    return names


def _tls(root: Path, name: str) -> TlsFiles:
    return TlsFiles(root / "ca.crt", root / f"{name}.crt", root / f"{name}.key")


async def _agents_phase(port: int, pki: Path, names: list[str], args: argparse.Namespace,
                        coordinator: psutil.Process,
                        head: tuple[int, str]) -> dict[str, Any]:  # fmt: skip
    from coordinator.console.admin import AdminClient
    from coordinator.plan import parse_plan

    agents = [IdleAgent(name, port, _tls(pki, name), head) for name in names]
    hello: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*(agent.connect(hello) for agent in agents))
    connect_all = time.perf_counter() - started
    rss_connected = coordinator.memory_info().rss
    # One running run: its first site holds a live lease and heartbeats it while all are idle.
    admin = AdminClient(f"localhost:{port}", _tls(pki, "admin"))
    plan = parse_plan({"name": "live", "dataset": "notes", "labels": ["x", "y"],
                       "sites": names[:2]})  # fmt: skip
    run_id = await asyncio.to_thread(admin.start_run, plan)
    await asyncio.wait_for(agents[0].got_hop.wait(), 30)
    # 500 sites in one process: keep the set-up's objects out of this process's full garbage
    # collections, or their pauses (hundreds of ms) show up as coordinator latency.
    gc.collect()
    gc.freeze()
    idle: list[float] = []
    live: list[float] = []
    until = time.monotonic() + args.idle_seconds
    own = psutil.Process()
    cpu_before = (coordinator.cpu_times(), own.cpu_times(), time.monotonic())
    get_run: list[float] = []
    list_runs: list[float] = []
    polls = []
    if args.admin_poll:
        channel = _aio_channel(port, _tls(pki, "admin"))
        stub = pb_grpc.AdminServiceStub(channel)
        polls = [
            _poll(lambda: stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=120), get_run,
                  until, args.get_run_every),
            _poll(lambda: stub.ListRuns(pb.ListRunsRequest(), timeout=120), list_runs, until,
                  args.list_runs_every),
        ]  # fmt: skip
    await asyncio.gather(
        agents[0].beat(live, until, 0.2, "training"),
        *(agent.beat(idle, until, args.beat_seconds, "idle") for agent in agents[1:]),
        *polls,
    )
    if args.admin_poll:
        await channel.close()
    rss_idle = coordinator.memory_info().rss
    wall = time.monotonic() - cpu_before[2]
    busy = [
        (after.user + after.system - before.user - before.system) / wall
        for before, after in zip(
            cpu_before[:2], (coordinator.cpu_times(), own.cpu_times()), strict=True
        )
    ]
    admin.close()
    await asyncio.gather(*(agent.close() for agent in agents))
    return {
        "connect_all_seconds": round(connect_all, 2),
        "hello": _quantiles(hello),
        "heartbeat_idle_agents": _quantiles(idle),
        "heartbeat_live_lease": _quantiles(live),
        "heartbeat_live_lease_ms_in_order": [round(s * 1e3, 2) for s in live],
        **(
            {"get_run_running": _quantiles(get_run), "list_runs": _quantiles(list_runs)}
            if args.admin_poll
            else {}
        ),
        # CPU used while idle, in cores: saturation shows in the heartbeat tail.
        "coordinator_cpu_cores_idle_phase": round(busy[0], 2),
        "agents_process_cpu_cores_idle_phase": round(busy[1], 2),
        "coordinator_rss_mib_connected": round(rss_connected / 2**20),
        "coordinator_rss_mib_after_idle": round(rss_idle / 2**20),
    }


def agents_benchmark(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pki = tmp / "pki"
    t0 = time.perf_counter()
    names = _make_pki(pki, args.agents)
    pki_seconds = time.perf_counter() - t0
    state = tmp / "state"
    state.mkdir()
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    ledger.migrate()
    t0 = time.perf_counter()
    build_history(ledger, args.finished_runs, names[: max(4, min(len(names), 50))])
    history_seconds = time.perf_counter() - t0
    last = ledger.last_event()
    head = (last.seq, last.hash) if last is not None else (0, "")  # seq = the events written
    ledger.close()
    port_file = tmp / "port"
    tree = args.coordinator_tree or Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
               "--port-file", str(port_file), "--state-dir", str(state),
               "--ca", str(pki / "ca.crt"), "--cert", str(pki / "coordinator.crt"),
               "--key", str(pki / "coordinator.key"), "--log-level", "WARNING",
               "--dashboard-port", "0"]  # fmt: skip
    started = time.perf_counter()
    # In the tree's directory: `python -m` puts the working directory first on sys.path.
    proc = subprocess.Popen(command, env=env, cwd=tree)
    try:
        while not port_file.exists():
            if proc.poll() is not None:
                raise SystemExit(f"coordinator exited with {proc.returncode}")
            time.sleep(0.01)
        ready = time.perf_counter() - started
        coordinator = psutil.Process(proc.pid)
        rss_ready = coordinator.memory_info().rss
        figures = asyncio.run(
            _agents_phase(int(port_file.read_text()), pki, names, args, coordinator, head)
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {
        "agents": args.agents,
        "finished_runs": args.finished_runs,
        "hops_per_run": HOPS_PER_RUN,
        "evaluations_per_run": EVALUATIONS_PER_RUN,
        "history_events": head[0],
        "agents_present_ledger_head": bool(head[0]),
        "beat_seconds": args.beat_seconds,
        "idle_seconds": args.idle_seconds,
        "coordinator_tree": str(tree),
        **(
            {"get_run_every": args.get_run_every, "list_runs_every": args.list_runs_every}
            if args.admin_poll
            else {}
        ),
        "coordinator_start_to_ready_seconds": round(ready, 2),
        "coordinator_rss_mib_ready": round(rss_ready / 2**20),
        **figures,
        "pki_seconds": round(pki_seconds, 1),
        "history_build_seconds": round(history_seconds, 1),
    }


# ---- part 2: ledger verify on many events -------------------------------------------------------


def build_events(url: str, events: int, hops: int) -> None:
    """`events` chained events, each snapshotting the hop row it changed (as append_event does)."""
    ledger = Ledger(url)
    ledger.migrate()
    run_id = uuid.uuid4().hex
    rows = [HopRow(id=uuid.uuid4().hex, index=i, site=f"site-{i % 5}",
                   hyperparameters={"learning_rate": 1e-3, "steps": 30}, status="pending",
                   metrics={}) for i in range(hops)]  # fmt: skip
    ledger.create_run(run_id, "bench", _plan(["site-0"]), rows, None)
    hop_rows = ledger.run(run_id).hops
    last = ledger.last_event()
    assert last is not None
    prev, seq = last.hash, last.seq
    table = EventRow.__table__
    batch: list[dict[str, Any]] = []
    at0 = datetime.now(UTC)
    with ledger.engine.begin() as connection:
        for n in range(events - seq):
            hop = hop_rows[n % hops]
            hop.attempts += 1
            hop.metrics = {"loss": 1.0 / (n + 1)}
            seq += 1
            hop.ledger_seq = seq
            payload = {"attempts": hop.attempts, STATE_ROWS_KEY: [row_entry(hop)]}
            at = (at0 + timedelta(microseconds=n)).isoformat(timespec="microseconds")
            digest = event_hash(prev, at, "hop.bench", run_id, hop.id, None, payload)
            batch.append({"seq": seq, "at": at, "kind": "hop.bench", "run_id": run_id,
                          "hop_id": hop.id, "site": None, "payload": payload,
                          "prev_hash": prev, "hash": digest})  # fmt: skip
            prev = digest
            if len(batch) == 20_000:
                connection.execute(insert(table), batch)
                batch.clear()
        if batch:
            connection.execute(insert(table), batch)
        for hop in hop_rows:
            connection.execute(
                update(HopRow.__table__)
                .where(HopRow.__table__.c.id == hop.id)
                .values(attempts=hop.attempts, metrics=hop.metrics, ledger_seq=hop.ledger_seq)
            )
    ledger.close()
    assert GENESIS_HASH  # the chain starts at genesis through create_run's event


def verify_benchmark(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Builds the ledger, then `baton ledger verify` as `ledger_verify.py` runs it: in a fresh
    process whose memory is that process tree's alone, sampled (the sum over its processes and
    the largest of them), not the largest of every process this benchmark started (the
    coordinator of the agents' phase among them, whose peak it reported before session 34)."""
    from ledger_verify import verify_once  # a sibling script: this directory is on sys.path

    url = f"sqlite:///{tmp / 'verify.sqlite3'}"
    t0 = time.perf_counter()
    build_events(url, args.events, args.hops)
    built = time.perf_counter() - t0
    run = verify_once(url, Path(__file__).resolve().parent.parent)
    return {"events": args.events, "hop_rows": args.hops, "verify_seconds": round(run["wall_s"], 1),
            "verify_cpu_seconds": run["cpu_s"],
            "verify_peak_rss_mib": run["peak_rss_mib"],  # its largest process
            "verify_peak_tree_rss_mib": run["peak_tree_rss_mib"],  # all its processes, summed
            "verify_peak_tree_pss_mib": run["peak_tree_pss_mib"],
            "build_seconds": round(built, 1),
            "database_mib": round((tmp / "verify.sqlite3").stat().st_size / 2**20),
            "verify_output": [run["output"]]}  # fmt: skip


# ---- report -------------------------------------------------------------------------------------


def markdown(figures: dict[str, Any], command: str) -> str:
    lines = ["# Scale: a coordinator with a long history", "", f"Command: `{command}`", ""]
    agents = figures.get("agents_phase")
    if agents:
        lines += [
            f"{agents['agents']} idle agents (real mTLS gRPC clients in one process), "
            f"{agents['finished_runs']} finished runs ({agents['hops_per_run']} hops, "
            f"{agents['evaluations_per_run']} evaluations each, written through the ledger API: "
            f"{agents.get('history_events', '?')} events, a checkpoint row per hop) in a SQLite "
            "ledger; each agent's Hello names the last ledger head it saw"
            f"{'' if agents.get('agents_present_ledger_head') else ' (none: empty history)'}.",
            "",
            "| figure | value | target |",
            "|---|---|---|",
            f"| coordinator start to ready | {agents['coordinator_start_to_ready_seconds']} s "
            "| <= 1 s |",
            f"| connect all agents (Hello + stream) | {agents['connect_all_seconds']} s "
            "| <= 15 s |",
            f"| Hello p50 / p99 | {agents['hello'].get('p50_ms')} / "
            f"{agents['hello'].get('p99_ms')} ms | |",
            f"| heartbeat of the live lease p50 / p99 | "
            f"{agents['heartbeat_live_lease'].get('p50_ms')} / "
            f"{agents['heartbeat_live_lease'].get('p99_ms')} ms | p99 <= 50 ms |",
            f"| heartbeat from idle agents p50 / p99 (every {agents['beat_seconds']} s each) | "
            f"{agents['heartbeat_idle_agents'].get('p50_ms')} / "
            f"{agents['heartbeat_idle_agents'].get('p99_ms')} ms | p99 <= 50 ms |",
            *(
                [
                    f"| GetRun of the running run p50 / p99 (every {agents['get_run_every']} s) | "
                    f"{agents['get_run_running'].get('p50_ms')} / "
                    f"{agents['get_run_running'].get('p99_ms')} ms | |",
                    f"| ListRuns of every run p50 / max (every {agents['list_runs_every']} s) | "
                    f"{agents['list_runs'].get('p50_ms')} / {agents['list_runs'].get('max_ms')} ms "
                    f"({agents['list_runs'].get('n')} calls) | |",
                ]
                if "get_run_running" in agents
                else []
            ),
            f"| CPU in the idle phase, coordinator / agents' process | "
            f"{agents.get('coordinator_cpu_cores_idle_phase')} / "
            f"{agents.get('agents_process_cpu_cores_idle_phase')} cores | |",
            f"| coordinator RSS ready / all connected / after idle | "
            f"{agents['coordinator_rss_mib_ready']} / {agents['coordinator_rss_mib_connected']} / "
            f"{agents['coordinator_rss_mib_after_idle']} MiB | |",
            "",
        ]
    verify = figures.get("verify_phase")
    if verify:
        lines += [
            "| ledger verify | value | target |",
            "|---|---|---|",
            f"| events | {verify['events']} | 1,000,000 |",
            f"| wall time | {verify['verify_seconds']} s | <= 30 s |",
            f"| peak RSS: largest process / all its processes (PSS) | "
            f"{verify['verify_peak_rss_mib']} / {verify.get('verify_peak_tree_rss_mib', '?')} "
            f"({verify.get('verify_peak_tree_pss_mib', '?')}) MiB | <= 200 MB |",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--finished-runs", type=int, default=1000)
    parser.add_argument("--beat-seconds", type=float, default=2.0)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--events", type=int, default=1_000_000, help="0 skips ledger verify")
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument("--skip-agents", action="store_true")
    parser.add_argument(
        "--admin-poll",
        action="store_true",
        help="poll GetRun and ListRuns from an admin client while agents beat",
    )
    parser.add_argument("--get-run-every", type=float, default=0.1)
    parser.add_argument("--list-runs-every", type=float, default=3.0)
    parser.add_argument(
        "--coordinator-tree",
        type=Path,
        default=None,
        help="run the coordinator from this checkout (default: this one)",
    )
    parser.add_argument("--name", default="scale", help="results file stem")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_agents:
            (Path(tmp) / "a").mkdir()
            figures["agents_phase"] = agents_benchmark(args, Path(tmp) / "a")
            print(json.dumps(figures["agents_phase"]), flush=True)
        if args.events:
            (Path(tmp) / "v").mkdir()
            figures["verify_phase"] = verify_benchmark(args, Path(tmp) / "v")
            print(json.dumps(figures["verify_phase"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(figures, command))
    print(markdown(figures, command))


if __name__ == "__main__":
    main()
