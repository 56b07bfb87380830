"""The hand back of a small adapter, call by call: one message (HandBackHopWhole) against the
stream (HandBackHop, the site agent's framed stub), interleaved in one run.

A coordinator (`baton coordinator serve`, its own process) runs a two-site sequential job; two
scripted sites hand each hop back with a bundle of `--kib` KiB (a MiniLM r=8 adapter is ~300 KB),
alternating the call per hop (A B B A ...), so both calls see the same load. Each figure is the
call's wall time at the site, from the call to its answer: the coordinator receives the bundle,
checks it (hash, format, values, lineage, signature), stores it durably, commits the hop and
leases the next one in one transaction, then answers. Also the coordinator process's CPU time
(user + system, psutil) over the counted hops, per hop: steady on a busy machine. The bundle's
hash and signature are made before the call, as the agent does. `--coordinator-root` runs the
coordinator from another checkout (an A/B of the coordinator's side; a checkout without
HandBackHopWhole gets the stream only). Writes JSON + Markdown under benchmarks/results/.

    nice -n 19 .venv/bin/python benchmarks/hand_back_call.py --hops 80
"""

from __future__ import annotations

import argparse
import hashlib
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

import grpc
import psutil

from benchmarks.handoff_phases import _event_ns
from benchmarks.transfer import RESULTS, Site, _start, _tls, _uptime
from coordinator.console.admin import AdminClient
from coordinator.ledger import Ledger
from coordinator.plan import parse_plan
from protocols.pki import Role, init_ca, issue_certificate
from protocols.signing import sign_digest
from protocols.v1 import baton_pb2 as pb
from site_agent.transfers import hand_back_frames

CALLS = ("whole", "stream")


class TimedSite(Site):
    """A scripted site that notes when each hop task reaches it (`received`, perf_counter)."""

    def __init__(self, port: int, pki: Path, name: str) -> None:
        self.received: dict[str, float] = {}
        self.received_ns: dict[str, int] = {}  # wall clock, beside the ledger's event times
        super().__init__(port, pki, name)

    def _pump(self) -> None:
        try:
            for task in self.stream:
                if task.WhichOneof("kind") == "hop":
                    self.received[task.hop.hop_id] = time.perf_counter()
                    self.received_ns[task.hop.hop_id] = time.time_ns()
                    self.tasks.put(task.hop)
        except grpc.RpcError:
            pass


def _hand_back(site: Site, task: pb.HopTask, data: bytes, call: str) -> tuple[float, float]:
    """Hands `task`'s hop back with `data` by `call`; when the call started and its seconds."""
    digest = hashlib.sha256(data).hexdigest()
    header = pb.UploadHeader(hop_id=task.hop_id, lease_token=task.lease_token,
                             total_size=len(data), sha256=digest,
                             signature=sign_digest(site.key_pem, digest))  # fmt: skip
    result = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=True,
                          metrics={"accuracy": 0.5}, train_started_at_ns=1,
                          train_finished_at_ns=2)  # fmt: skip
    started = time.perf_counter()
    if call == "whole":
        request = pb.HandBackWhole(header=header, bundle=data, result=result)
        status = site.stub.HandBackHopWhole(request, timeout=60).hop_status
    else:
        status = site.stub.HandBackHopFramed(
            hand_back_frames(header, data, result), timeout=60
        ).hop_status
    seconds = time.perf_counter() - started
    assert status == "committed", status
    return started, seconds


def _spy(
    pid: int, out: Path, rate: int = 250, native: bool = False, gil: bool = False
) -> subprocess.Popen[bytes]:
    """py-spy recording the coordinator's CPU (collapsed stacks, one line per stack) to `out`;
    `native` adds the C frames (and samples while blocking, which `--native` needs); `gil`
    samples only the thread holding the GIL (not threads waiting for it)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = ["--native"] if native else ["--nonblocking"]
    mode += ["--gil"] if gil else []
    process = subprocess.Popen([spy, "record", *mode, "--rate", str(rate), "--format", "raw",
                                "--output", str(out), "--pid", str(pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)  # attached before the counted hops
    return process


def _leased_ns(database: Path) -> dict[str, int]:
    """Each hop's `hop.leased` event time (ns since the epoch), from the coordinator's ledger."""
    ledger = Ledger(f"sqlite:///{database}")
    try:
        return {
            event.hop_id: _event_ns(event.at)
            for run in ledger.runs()
            for event in ledger.events(run.id)
            if event.kind == "hop.leased" and event.hop_id
        }
    finally:
        ledger.close()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def two_site_plan(name: str, cycles: int) -> Any:
    """The plan of the scripted sites' sequential run: site-a, then site-b, `cycles` times."""
    return parse_plan({
        "name": name, "dataset": "notes", "labels": ["x", "y"],
        "sites": ["site-a", "site-b"], "cycles": cycles,
    })  # fmt: skip


def serve_two_site_run(
    root: Path, tmp: Path, name: str, cycles: int, database_url: str | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, TimedSite]]:
    """`baton coordinator serve` from checkout `root` (PKI and state under `tmp`; its ledger at
    `database_url`, default an SQLite file in the state), two scripted sites connected to it
    and a two-site sequential run of `cycles` cycles started: the coordinator's process and
    the sites. The process is stopped if the rest fails."""
    pki = tmp / "pki"
    init_ca(pki)
    for role, cn in [(Role.COORDINATOR, "coordinator"), (Role.ADMIN, "admin"),
                     (Role.SITE, "site-a"), (Role.SITE, "site-b")]:  # fmt: skip
        issue_certificate(pki, pki, role, cn)
    command = [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
               "--port-file", str(tmp / "coordinator.port"), "--state-dir", str(tmp / "state"),
               "--ca", str(pki / "ca.crt"), "--cert", str(pki / "coordinator.crt"),
               "--key", str(pki / "coordinator.key"), "--log-level", "WARNING",
               "--no-dashboard"]  # fmt: skip
    command += ["--database-url", database_url] if database_url is not None else []
    here = Path.cwd()
    os.chdir(root)  # `python -m` puts the working directory first on the import path
    try:
        proc, port, _ = _start(command, tmp / "coordinator.port", PYTHONPATH=str(root))
    finally:
        os.chdir(here)
    try:
        sites = {cn: TimedSite(port, pki, cn) for cn in ("site-a", "site-b")}
        admin = AdminClient(f"localhost:{port}", _tls(pki, "admin"))
        admin.wait_for_sites(set(sites), timeout=30)
        admin.start_run(two_site_plan(name, cycles))
    except BaseException:
        proc.terminate()
        proc.wait(timeout=30)
        raise
    return proc, sites


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    root = args.coordinator_root or Path(__file__).resolve().parent.parent
    proc, sites = serve_two_site_run(root, tmp, "hand-back-call", args.hops // 2)
    samples: dict[str, list[float]] = {call: [] for call in CALLS}
    # The next site's task after each counted hand back: from the call's start to the task's
    # arrival there, and how long before the finishing site's answer it arrived.
    delivery: list[float] = []
    pushed: list[str] = []  # the hops whose task followed a counted hand back
    ahead_of_answer: list[float] = []
    calls = list(CALLS)
    try:
        coordinator = psutil.Process(proc.pid)
        cpu_from = 0.0
        previous: tuple[float, float] | None = None  # the last counted call: start, seconds
        spy: subprocess.Popen[bytes] | None = None
        for index in range(args.hops):
            if index == args.warmup:
                cpu_from = sum(coordinator.cpu_times()[:2])
                if args.profile is not None:
                    spy = _spy(proc.pid, args.profile, args.profile_rate, args.profile_native)
            site = sites["site-a" if index % 2 == 0 else "site-b"]
            task = site.tasks.get(timeout=60)
            if previous is not None:
                pushed.append(task.hop_id)
                arrived = site.received[task.hop_id] - previous[0]
                delivery.append(arrived)
                ahead_of_answer.append(previous[1] - arrived)
            data = site.bundle(task, args.kib * 1024)
            call = calls[(index // 2 + index) % len(calls)]  # A B B A ...: each call at each site
            try:
                started, seconds = _hand_back(site, task, data, call)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                calls = ["stream"]  # an older coordinator: the stream only
                started, seconds = _hand_back(site, task, data, "stream")
                call = "stream"
            previous = None
            if index >= args.warmup:
                samples[call].append(seconds)
                if index < args.hops - 1:
                    previous = (started, seconds)
        cpu_seconds = sum(coordinator.cpu_times()[:2]) - cpu_from
        # The ledger's `hop.leased` of each counted next hop to its task's arrival: the rest of
        # the commit's transaction, its COMMIT, the push and gRPC's delivery.
        leased_at = _leased_ns(tmp / "state" / "ledger.sqlite3")
        counted = [hop_id for hop_id in pushed if hop_id in leased_at]
        site_of = {h: s for s in sites.values() for h in s.received_ns}
        from_lease = [(site_of[h].received_ns[h] - leased_at[h]) / 1e9 for h in counted]
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its stacks and exits
            spy.wait(60)
        for site in sites.values():
            site.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "kib": args.kib,
        "hops": args.hops,
        "warmup": args.warmup,
        "coordinator_root": str(root),
        "uptime": _uptime(),
        "coordinator_cpu_ms_per_hop": round(cpu_seconds / (args.hops - args.warmup) * 1e3, 2),
        "next_task": {
            "n": len(delivery),
            "median_ms": round(statistics.median(delivery) * 1e3, 2),
            "p90_ms": round(_quantile(delivery, 0.9) * 1e3, 2),
            "p99_ms": round(_quantile(delivery, 0.99) * 1e3, 2),
            "ahead_of_answer_median_ms": round(statistics.median(ahead_of_answer) * 1e3, 2),
            "from_lease_median_ms": round(statistics.median(from_lease) * 1e3, 2),
            "from_lease_p90_ms": round(_quantile(from_lease, 0.9) * 1e3, 2),
            "from_lease_p99_ms": round(_quantile(from_lease, 0.99) * 1e3, 2),
            "from_lease_samples_ms": [round(v * 1e3, 2) for v in from_lease],
            "samples_ms": [round(v * 1e3, 2) for v in delivery],
        },
        "calls": {
            call: {
                "n": len(values),
                "median_ms": round(statistics.median(values) * 1e3, 2),
                "p90_ms": round(_quantile(values, 0.9) * 1e3, 2),
                "p99_ms": round(_quantile(values, 0.99) * 1e3, 2),
                "samples_ms": [round(v * 1e3, 2) for v in values],
            }
            for call, values in samples.items()
            if values
        },
    }


def markdown(figures: dict[str, Any], command: str) -> str:
    lines = [
        f"# Hand back of a {figures['kib']} KiB adapter, call by call",
        "",
        f"Command: `{command}`. Coordinator from `{figures['coordinator_root']}`. "
        f"{figures['hops']} hops, the first {figures['warmup']} not counted; calls alternate "
        f"per hop. Load: `{figures['uptime']}`. Coordinator CPU per counted hop: "
        f"{figures['coordinator_cpu_ms_per_hop']} ms.",
        "",
        "| call | n | median ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for call, row in figures["calls"].items():
        lines.append(f"| {call} | {row['n']} | {row['median_ms']} | {row['p90_ms']} | "
                     f"{row['p99_ms']} |")  # fmt: skip
    row = figures["next_task"]
    lines.append(f"| next site holds its task | {row['n']} | {row['median_ms']} | "
                 f"{row['p90_ms']} | {row['p99_ms']} |")  # fmt: skip
    lines.append(f"| next site holds its task, from `hop.leased` | {row['n']} | "
                 f"{row['from_lease_median_ms']} | {row['from_lease_p90_ms']} | "
                 f"{row['from_lease_p99_ms']} |")  # fmt: skip
    lines += [
        "",
        "The last rows: from the hand back's start (or from the next hop's `hop.leased` "
        "event, wall clock, in the commit's transaction) to the next hop's task arriving at "
        f"its site (median {row['ahead_of_answer_median_ms']} ms before the hand back's "
        "answer).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hops", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--kib", type=int, default=300)
    parser.add_argument("--coordinator-root", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the coordinator's CPU over the counted hops with py-spy "
                        "(collapsed stacks) to this file")  # fmt: skip
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples a second")
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: C frames too (sqlite3, OpenSSL, hashlib)",
    )
    parser.add_argument("--name", default="hand-back-call")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/hand_back_call.py " + " ".join(sys.argv[1:])
    (args.out / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(figures, command))
    print(markdown(figures, command))


if __name__ == "__main__":
    main()
