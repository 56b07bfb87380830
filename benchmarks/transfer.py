"""Checkpoint transfers through the coordinator against raw gRPC over the same mTLS settings.

For each size: a raw grpcio upload and download (a minimal servicer in its own process, built with
Baton's own server and channel helpers, so the same mTLS and message-size options; sha256 on both
sides) and Baton's upload and download of a real checkpoint bundle through `baton coordinator
serve` in its own process (hash, format, values, lineage and signature checked; stored durably).
Raw and Baton runs are interleaved; each figure is the median of `--repeat`. The coordinator's
RSS is sampled every 10 ms (psutil) while the bundles move.

"Through the coordinator" is, for an upload, the HandBackHop call from its first message to
its answer: the bundle and the hop's result in one call, the coordinator hashing and checking
the values while the bytes stream into the spool file, making the file durable (fsync),
renaming it into the store and committing the hop (`--legacy` times the older UploadCheckpoint
call instead, without the commit); for a download, DownloadCheckpoint from the request to the
last chunk, read from the store. The raw comparator does the same transfers with no protocol:
bytes messages of the same chunk size, over a channel and a server built by the same helpers
(`protocols.transport`: the same mTLS, message-size, window and keep-alive options), its server
hashing what it receives (sha256) and writing nothing (and once more hashing nothing: the floor
of the floor), serving downloads from memory unhashed (as the coordinator serves its store).
Baton's client is the site agent's own stub (`SiteStub`, hand-framed chunks). On both sides the
client hashes before the call (a site signs its bundle's digest when it makes it; reported apart
as `site_hash_sign_s`); `sha256_cpu_s` is what hashing the size alone costs on one core. The
coordinator's CPU seconds per transfer and the load (`uptime`) before, after and with every row
are recorded; results are written after every row. The coordinator's RSS is also read 6 s after
each size's last transfer (`after`): what it keeps once transfers are over. The raw server runs
with glibc's default allocator settings, the coordinator with the deployed ones (MALLOC_ARENA_MAX,
MALLOC_MMAP_THRESHOLD_); given the coordinator's, the raw server's CPU per 100 MiB upload was no
higher (0.175 s against 0.20 s, session 8), so the comparator is not favoured by them.
The coordinator's CPU per Baton transfer is also split by thread (`coordinator_cpu_ms_*_by_thread`
in the JSON: named as Python names them, via `py-spy dump`), to tell what runs beside a transfer.
`--profile` samples the coordinator with py-spy (collapsed stacks in `results/NAME_profile.txt`).

    nice -n 19 .venv/bin/python benchmarks/transfer.py --sizes 1,10,100
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import psutil
import safetensors.numpy

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from protocols.checkpoint import CheckpointManifest, bundle_metadata
from protocols.pki import Role, init_ca, issue_certificate
from protocols.signing import sign_digest
from protocols.transport import CHUNK_BYTES, TlsFiles, aio_server, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc

try:
    from site_agent.transfers import SiteStub, hand_back_frames, upload_frames
except ImportError:  # an older checkout measured with this script (A/B): protobuf per chunk
    SiteStub = None  # type: ignore[assignment,misc]

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024
_TICK = os.sysconf("SC_CLK_TCK")
_UPLOAD = "/bench.Raw/Upload"
_UPLOAD_UNHASHED = "/bench.Raw/UploadUnhashed"
_DOWNLOAD = "/bench.Raw/Download"


def _tls(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / "ca.crt", pki / f"{name}.crt", pki / f"{name}.key")


# ---- the raw servicer (own process) -------------------------------------------------------------


async def _raw_server(pki: Path, port_file: Path) -> None:
    async def upload(requests: Any, _context: Any) -> bytes:
        digest = hashlib.sha256()
        async for chunk in requests:
            digest.update(chunk)
        return digest.hexdigest().encode()

    async def upload_unhashed(requests: Any, _context: Any) -> bytes:
        received = 0
        async for chunk in requests:
            received += len(chunk)
        return str(received).encode()

    payloads: dict[int, bytes] = {}

    async def download(request: bytes, _context: Any) -> Any:
        size, chunk = (int(x) for x in request.decode().split(","))
        if size not in payloads:  # made once, outside the timed calls that follow
            payloads[size] = np.random.default_rng(1).bytes(size)
        payload = payloads[size]
        # Served as they are, unhashed: the coordinator serves a download from its store
        # without hashing it (it hashed the bundle when it came in).
        for start in range(0, size, chunk):
            yield payload[start : start + chunk]

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "UploadUnhashed": grpc.stream_unary_rpc_method_handler(upload_unhashed),
            "Download": grpc.unary_stream_rpc_method_handler(download),
        },
    )
    server, port = aio_server(_tls(pki, "coordinator"), "localhost:0")
    server.add_generic_rpc_handlers((handler,))
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


# ---- measurements -------------------------------------------------------------------------------


def _chunks(data: bytes, chunk: int) -> Iterator[bytes]:
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]


def raw_upload(channel: grpc.Channel, data: bytes, chunk: int) -> float:
    """As Baton's site, the client hashes before the call (a site signs its bundle's digest in
    the upload header); the server hashes what it receives, as the coordinator does."""
    call = channel.stream_unary(_UPLOAD)
    digest = hashlib.sha256(data).hexdigest()
    started = time.perf_counter()
    answer = call(_chunks(data, chunk), timeout=300)
    seconds = time.perf_counter() - started
    assert answer.decode() == digest
    return seconds


def raw_upload_unhashed(channel: grpc.Channel, data: bytes, chunk: int) -> float:
    """The floor of the floor: the same upload, the server hashing nothing."""
    call = channel.stream_unary(_UPLOAD_UNHASHED)
    started = time.perf_counter()
    answer = call(_chunks(data, chunk), timeout=300)
    seconds = time.perf_counter() - started
    assert int(answer.decode()) == len(data)
    return seconds


def raw_download(channel: grpc.Channel, size: int, chunk: int) -> float:
    call = channel.unary_stream(_DOWNLOAD)
    digest = hashlib.sha256()
    started = time.perf_counter()
    received = 0
    for part in call(f"{size},{chunk}".encode(), timeout=300):
        digest.update(part)
        received += len(part)
    seconds = time.perf_counter() - started
    assert received == size
    return seconds


class Site:
    """A site client following the protocol by hand: its task stream read on a thread."""

    def __init__(self, port: int, pki: Path, name: str) -> None:
        tls = _tls(pki, name)
        self.name = name
        self.key_pem = tls.private_key.read_bytes()
        self.channel = secure_channel(f"localhost:{port}", tls)
        # The site agent's own stub (hand-framed chunks), or the generated one of older code.
        self.framed = SiteStub is not None
        self.stub = SiteStub(self.channel) if self.framed else pb_grpc.SiteServiceStub(self.channel)
        hello = pb.HelloRequest(agent_version="bench", protocol_version=1,
                                capabilities=["seq-classification"])  # fmt: skip
        hello.base_models.add(name="tiny", sha256="ab" * 32)
        # What a real site reports, so that the run's preflight passes.
        hello.datasets.add(name="notes", task="seq-classification", train_examples=100,
                           validation_examples=20, labels=["x", "y"])  # fmt: skip
        hello.approval_not_required = True
        self.stub.Hello(hello, timeout=30)
        self.tasks: queue.Queue[pb.HopTask] = queue.Queue()
        self.stream = self.stub.StreamTasks(pb.TaskStreamRequest())
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for task in self.stream:
                if task.WhichOneof("kind") == "hop":
                    self.tasks.put(task.hop)
        except grpc.RpcError:
            pass

    def bundle(self, task: pb.HopTask, size: int) -> bytes:
        manifest = CheckpointManifest(task_type=task.task_type, base_model_sha256="ab" * 32,
                                      run_id=task.run_id, hop_id=task.hop_id,
                                      producer_site=self.name,
                                      parent_sha256=task.input_checkpoint.sha256)  # fmt: skip
        values = np.random.default_rng(0).standard_normal(max(1, (size - 512) // 4), np.float32)
        return safetensors.numpy.save(
            {"lora_A": values}, metadata=bundle_metadata(manifest, {"r": 8})
        )

    def upload(
        self, task: pb.HopTask, data: bytes, chunk: int, *, legacy: bool
    ) -> tuple[float, float, str]:
        """Hands the hop back (one call: bundle, result, commit), or with `legacy` times only
        the older UploadCheckpoint call (its ReportHopResult follows, untimed)."""
        started = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        signature = sign_digest(self.key_pem, digest)
        prepared = time.perf_counter() - started
        header = pb.UploadHeader(hop_id=task.hop_id, lease_token=task.lease_token,
                                 total_size=len(data), sha256=digest,
                                 signature=signature)  # fmt: skip
        result = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=True,
                              metrics={"accuracy": 0.5}, train_started_at_ns=1,
                              train_finished_at_ns=2)  # fmt: skip
        if not self.framed:
            return self._upload_messages(header, result, data, chunk, legacy), prepared, digest
        if legacy:
            started = time.perf_counter()
            ref = self.stub.UploadCheckpointFramed(
                upload_frames(header, data, chunk), timeout=300
            ).checkpoint
            seconds = time.perf_counter() - started
            result.output_checkpoint.CopyFrom(ref)
            assert self.stub.ReportHopResult(result, timeout=60).hop_status == "committed"
            return seconds, prepared, digest

        started = time.perf_counter()
        frames = hand_back_frames(header, data, result, chunk)
        status = self.stub.HandBackHopFramed(frames, timeout=300).hop_status
        seconds = time.perf_counter() - started
        assert status == "committed", status
        return seconds, prepared, digest

    def _upload_messages(
        self, header: pb.UploadHeader, result: pb.HopResult, data: bytes, chunk: int, legacy: bool
    ) -> float:
        """`upload` as older site agents did it: a protobuf message built per chunk."""
        view = memoryview(data)
        if legacy:

            def uploads() -> Iterator[pb.UploadRequest]:
                yield pb.UploadRequest(header=header)
                for start in range(0, len(data), chunk):
                    yield pb.UploadRequest(data=bytes(view[start : start + chunk]))

            started = time.perf_counter()
            ref = self.stub.UploadCheckpoint(uploads(), timeout=300).checkpoint
            seconds = time.perf_counter() - started
            result.output_checkpoint.CopyFrom(ref)
            assert self.stub.ReportHopResult(result, timeout=60).hop_status == "committed"
            return seconds

        def messages() -> Iterator[pb.HandBackRequest]:
            yield pb.HandBackRequest(header=header)
            for start in range(0, len(data), chunk):
                yield pb.HandBackRequest(data=bytes(view[start : start + chunk]))
            yield pb.HandBackRequest(result=result)

        started = time.perf_counter()
        status = self.stub.HandBackHop(messages(), timeout=300).hop_status
        seconds = time.perf_counter() - started
        assert status == "committed", status
        return seconds

    def download(self, sha256: str, size: int) -> float:
        digest = hashlib.sha256()
        started = time.perf_counter()
        received = 0
        request = pb.DownloadRequest(sha256=sha256)
        if self.framed:
            chunks = self.stub.DownloadCheckpointFramed(request, timeout=300)
        else:
            chunks = ((c.data, c.offset, c.total_size)
                      for c in self.stub.DownloadCheckpoint(request, timeout=300))  # fmt: skip
        for data, offset, _ in chunks:
            assert offset == received
            digest.update(data)
            received += len(data)
        seconds = time.perf_counter() - started
        assert received == size and digest.hexdigest() == sha256
        return seconds

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


class RssSampler:
    """Samples a process's RSS every 10 ms on a thread; `peak()` since the last `reset()`."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self._peak = 0
        # A sample read before a reset must not land after it (the coordinator's start-up
        # transient was once reported as the first transfer's peak).
        self._lock = threading.Lock()
        self._generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            generation = self._generation
            rss = self.process.memory_info().rss
            with self._lock:
                if generation == self._generation:
                    self._peak = max(self._peak, rss)
            time.sleep(0.01)

    def reset(self) -> int:
        """Starts a new peak from the current RSS, which it returns."""
        with self._lock:
            self._generation += 1
            self._peak = self.process.memory_info().rss
            return self._peak

    def peak(self) -> int:
        return max(self._peak, self.process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _start(
    command: list[str], port_file: Path, **extra_env: str
) -> tuple[subprocess.Popen[bytes], int, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **extra_env}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env)
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"{command[2:5]} exited with {proc.returncode}")
        time.sleep(0.01)
    return proc, int(port_file.read_text()), time.perf_counter() - started


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each of a process's threads (tid -> user + system), from /proc (Linux)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _thread_names(pid: int) -> dict[int, str]:
    """tid -> the Python thread's name (py-spy dump), else the OS thread name (comm)."""
    names = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
    spy = Path(sys.executable).with_name("py-spy")
    try:
        command = [str(spy), "dump", "--pid", str(pid), "--json"]
        dump = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30)
        for thread in json.loads(dump.stdout):
            if thread.get("os_thread_id") in names and thread.get("thread_name"):
                names[thread["os_thread_id"]] = thread["thread_name"]
    except (OSError, subprocess.SubprocessError, ValueError):
        pass  # no py-spy here: the OS names
    return names


def _spent(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    return {tid: seconds - before.get(tid, 0.0) for tid, seconds in after.items()}


def _by_name(spent: list[dict[int, float]], names: dict[int, str]) -> dict[str, float]:
    """Median ms per transfer of each named thread (threads of one name summed), largest first."""
    per_name: list[dict[str, float]] = []
    for one in spent:
        summed: dict[str, float] = {}
        for tid, seconds in one.items():
            name = names.get(tid, "(exited)")
            summed[name] = summed.get(name, 0.0) + seconds
        per_name.append(summed)
    medians = {name: round(statistics.median(s.get(name, 0.0) for s in per_name) * 1000)
               for name in {n for s in per_name for n in s}}  # fmt: skip
    return dict(sorted(((n, ms) for n, ms in medians.items() if ms), key=lambda x: -x[1]))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def run(
    args: argparse.Namespace, tmp: Path, report: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    pki = tmp / "pki"
    init_ca(pki)
    for role, name in [(Role.COORDINATOR, "coordinator"), (Role.ADMIN, "admin"),
                       (Role.SITE, "site-a"), (Role.SITE, "site-b")]:  # fmt: skip
        issue_certificate(pki, pki, role, name)
    raw_proc, raw_port, _ = _start(
        [sys.executable, __file__, "--raw-server", str(pki), str(tmp / "raw.port")],
        tmp / "raw.port",
    )
    coordinator_cmd = [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
                       "--port-file", str(tmp / "coordinator.port"), "--state-dir",
                       str(tmp / "state"), "--ca", str(pki / "ca.crt"), "--cert",
                       str(pki / "coordinator.crt"), "--key", str(pki / "coordinator.key"),
                       "--log-level", "WARNING"]  # fmt: skip
    # As the systemd unit and the container image run it (0: glibc's default): a fixed mmap
    # threshold hands each freed 1 MiB message buffer back to the kernel instead of letting
    # glibc's sliding threshold keep them in fragmented arenas.
    malloc = {"MALLOC_ARENA_MAX": str(args.malloc_arena_max)} if args.malloc_arena_max else {}
    if args.malloc_mmap_threshold:
        malloc["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.malloc_trim_threshold:
        malloc["MALLOC_TRIM_THRESHOLD_"] = str(args.malloc_trim_threshold)
    profile_out = RESULTS / f"{args.name}_profile.txt" if args.profile else None
    if profile_out is not None:
        # py-spy samples the coordinator (all its threads) from start to end; the upload's
        # stacks dominate the samples of a run of large transfers (idle time is not sampled).
        spy = Path(sys.executable).with_name("py-spy")
        native = ["--native"] if args.profile == "native" else []
        coordinator_cmd = [str(spy), "record", "--rate", "200", "--threads", *native, "--format",
                           "raw", "--output", str(profile_out), "--", *coordinator_cmd]  # fmt: skip
    coord_proc, port, ready = _start(coordinator_cmd, tmp / "coordinator.port", **malloc)
    coordinator = psutil.Process(coord_proc.pid)
    if profile_out is not None:
        coordinator = coordinator.children()[0]
    raw_server = psutil.Process(raw_proc.pid)
    client = psutil.Process()  # this process: the site's side of both (hashing before the call)
    sampler = RssSampler(coordinator)
    raw_sampler = RssSampler(raw_server)
    time.sleep(2)  # start-up's own transient (ledger checks) settles first
    rss_idle = coordinator.memory_info().rss
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {
        "coordinator_start_to_ready_s": round(ready, 2),
        "coordinator_idle_rss_mib": round(rss_idle / MiB),
        "coordinator_chunk_bytes": CHUNK_BYTES,
        "repeat": args.repeat,
        "malloc_arena_max": args.malloc_arena_max,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "malloc_trim_threshold": args.malloc_trim_threshold,
        "baton_call": "UploadCheckpoint" if args.legacy else "HandBackHop",
        "uptime_before": _uptime(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    try:
        raw_channel = secure_channel(f"localhost:{raw_port}", _tls(pki, "site-a"))
        sites = {name: Site(port, pki, name) for name in ("site-a", "site-b")}
        admin = AdminClient(f"localhost:{port}", _tls(pki, "admin"))
        admin.wait_for_sites({"site-a", "site-b"}, timeout=30)
        for mib in args.sizes:
            size = mib * MiB
            for chunk_kib in args.chunk_kib:
                chunk = chunk_kib * 1024
                samples: dict[str, list[float]] = {k: [] for k in
                                                   ("raw_up", "raw_up_unhashed",
                                                    "raw_down", "baton_up",
                                                    "baton_down", "prepare", "cpu_up",
                                                    "cpu_down", "raw_cpu_up",
                                                    "raw_cpu_down", "client_cpu_up",
                                                    "client_cpu_down", "raw_client_cpu_up",
                                                    "raw_client_cpu_down")}  # fmt: skip
                peak_up = peak_down = growth_up = raw_growth_up = 0
                by_thread: dict[str, list[dict[int, float]]] = {"up": [], "down": []}
                before = coordinator.memory_info().rss
                raw_download(raw_channel, size, chunk)  # the raw server makes its payload
                for _ in range(args.repeat):
                    payload = np.random.default_rng(2).bytes(size)
                    cpu = _cpu_seconds(raw_server)
                    mine = _cpu_seconds(client)
                    base = raw_sampler.reset()
                    samples["raw_up"].append(raw_upload(raw_channel, payload, chunk))
                    raw_growth_up = max(raw_growth_up, raw_sampler.peak() - base)
                    samples["raw_cpu_up"].append(_cpu_seconds(raw_server) - cpu)
                    samples["raw_client_cpu_up"].append(_cpu_seconds(client) - mine)
                    samples["raw_up_unhashed"].append(
                        raw_upload_unhashed(raw_channel, payload, chunk)
                    )
                    cpu = _cpu_seconds(raw_server)
                    mine = _cpu_seconds(client)
                    samples["raw_down"].append(raw_download(raw_channel, size, chunk))
                    samples["raw_cpu_down"].append(_cpu_seconds(raw_server) - cpu)
                    samples["raw_client_cpu_down"].append(_cpu_seconds(client) - mine)
                    del payload
                    plan = parse_plan({
                        "name": f"transfer-{mib}", "dataset": "notes", "labels": ["x", "y"],
                        "sites": ["site-a", "site-b"],
                    })  # fmt: skip
                    run_id = admin.start_run(plan)
                    task = sites["site-a"].tasks.get(timeout=30)
                    data = sites["site-a"].bundle(task, size)
                    base = sampler.reset()
                    cpu = _cpu_seconds(coordinator)
                    mine = _cpu_seconds(client)
                    threads = _thread_cpu(coordinator.pid)
                    up, prepared, sha = sites["site-a"].upload(task, data, chunk,
                                                               legacy=args.legacy)  # fmt: skip
                    samples["cpu_up"].append(_cpu_seconds(coordinator) - cpu)
                    by_thread["up"].append(_spent(threads, _thread_cpu(coordinator.pid)))
                    samples["client_cpu_up"].append(_cpu_seconds(client) - mine)
                    peak_up = max(peak_up, sampler.peak())
                    growth_up = max(growth_up, sampler.peak() - base)
                    nxt = sites["site-b"].tasks.get(timeout=30)
                    assert nxt.input_checkpoint.sha256 == sha
                    sampler.reset()
                    cpu = _cpu_seconds(coordinator)
                    mine = _cpu_seconds(client)
                    threads = _thread_cpu(coordinator.pid)
                    down = sites["site-b"].download(sha, len(data))
                    samples["cpu_down"].append(_cpu_seconds(coordinator) - cpu)
                    by_thread["down"].append(_spent(threads, _thread_cpu(coordinator.pid)))
                    samples["client_cpu_down"].append(_cpu_seconds(client) - mine)
                    peak_down = max(peak_down, sampler.peak())
                    admin.control(run_id, "abort", "benchmark")
                    samples["baton_up"].append(up)
                    samples["baton_down"].append(down)
                    samples["prepare"].append(prepared)
                    del data
                # What hashing alone costs (both servers hash what they receive): sha256 of the
                # size on one core of this process, best of 3 (CPU seconds, not wall time).
                hash_payload = np.random.default_rng(3).bytes(size)
                hash_cpu = []
                for _ in range(3):
                    cpu_started = time.thread_time()
                    hashlib.sha256(hash_payload).digest()
                    hash_cpu.append(time.thread_time() - cpu_started)
                del hash_payload
                # What the coordinator keeps once its transfers of this size are over: retained
                # heap shows here (it frees its heap once no transfer has moved for 5 s).
                time.sleep(6.0)
                settled = coordinator.memory_info().rss
                med = {k: statistics.median(v) for k, v in samples.items()}
                names = _thread_names(coordinator.pid)
                row = {
                    "size_mib": mib,
                    "chunk_kib": chunk_kib,
                    "raw_upload_mb_s": round(size / med["raw_up"] / 1e6, 1),
                    "baton_upload_mb_s": round(size / med["baton_up"] / 1e6, 1),
                    "upload_ratio": round(med["raw_up"] / med["baton_up"], 2),
                    "raw_upload_unhashed_mb_s": round(size / med["raw_up_unhashed"] / 1e6, 1),
                    "upload_ratio_unhashed": round(med["raw_up_unhashed"] / med["baton_up"], 2),
                    "raw_download_mb_s": round(size / med["raw_down"] / 1e6, 1),
                    "baton_download_mb_s": round(size / med["baton_down"] / 1e6, 1),
                    "download_ratio": round(med["raw_down"] / med["baton_down"], 2),
                    # Each Baton transfer against the raw one just before it (the same
                    # moment's host): the spread the ratio of medians hides.
                    "upload_ratio_pairs": _pair_ratios(samples["raw_up"], samples["baton_up"]),
                    "download_ratio_pairs": _pair_ratios(
                        samples["raw_down"], samples["baton_down"]
                    ),
                    # Per transfer, in order: what tells a slow pair's cause (the coordinator
                    # busier than usual, or waiting).
                    "seconds_per_transfer": {
                        k: [round(v, 3) for v in samples[k]]
                        for k in ("raw_up", "baton_up", "cpu_up", "raw_cpu_up", "client_cpu_up")
                    },
                    "site_hash_sign_s": round(med["prepare"], 3),
                    "sha256_cpu_s": round(min(hash_cpu), 3),
                    "raw_server_cpu_s_upload": round(med["raw_cpu_up"], 3),
                    "raw_server_cpu_s_download": round(med["raw_cpu_down"], 3),
                    "coordinator_cpu_s_upload": round(med["cpu_up"], 3),
                    "coordinator_cpu_s_download": round(med["cpu_down"], 3),
                    "site_cpu_s_upload": round(med["client_cpu_up"], 3),
                    "raw_client_cpu_s_upload": round(med["raw_client_cpu_up"], 3),
                    "site_cpu_s_download": round(med["client_cpu_down"], 3),
                    "raw_client_cpu_s_download": round(med["raw_client_cpu_down"], 3),
                    # The coordinator's CPU per transfer by thread (median ms; its threads
                    # named as Python names them, else by the OS).
                    "coordinator_cpu_ms_upload_by_thread": _by_name(by_thread["up"], names),
                    "coordinator_cpu_ms_download_by_thread": _by_name(by_thread["down"], names),
                    "coordinator_rss_mib_before": round(before / MiB),
                    "coordinator_rss_mib_settled": round(settled / MiB),
                    "coordinator_peak_rss_mib_upload": round(peak_up / MiB),
                    "coordinator_rss_growth_mib_upload": round(growth_up / MiB),
                    "raw_server_rss_growth_mib_upload": round(raw_growth_up / MiB),
                    "coordinator_peak_rss_mib_download": round(peak_down / MiB),
                    "load_average_1m": round(os.getloadavg()[0], 2),
                    "uptime": _uptime(),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                report(figures)  # written after every row: a run cut short keeps its rows
        for site in sites.values():
            site.close()
        admin.close()
        raw_channel.close()
    finally:
        sampler.stop()
        raw_sampler.stop()
        if profile_out is not None:
            coordinator.send_signal(signal.SIGTERM)  # py-spy then writes its profile and exits
            coord_proc.wait(60)
        for proc in (coord_proc, raw_proc):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    figures["uptime_after"] = _uptime()
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return figures


def _pair_ratios(raw_seconds: list[float], baton_seconds: list[float]) -> list[float]:
    """Baton's throughput over raw's, per interleaved pair, in the order they ran."""
    return [round(r / b, 2) for r, b in zip(raw_seconds, baton_seconds, strict=True)]


def _pairs_line(r: dict[str, Any]) -> str:
    up, down = r.get("upload_ratio_pairs"), r.get("download_ratio_pairs")
    if not up:
        return ""
    return (
        f"* {r['size_mib']} MiB, {r['chunk_kib']} KiB chunks: up ratio per pair "
        f"{', '.join(map(str, up))} (median {statistics.median(up):.2f}, "
        f"{sum(x >= 0.8 for x in up)} of {len(up)} >= 0.8); down "
        f"{', '.join(map(str, down))} (median {statistics.median(down):.2f})" + _cpu_pairs(r)
    )


def _cpu_pairs(r: dict[str, Any]) -> str:
    """The coordinator's and the raw server's CPU seconds per upload of the pairs, in order: a
    slow pair whose coordinator spent more CPU than the others (pages of the page cache the host
    had taken back) tells itself apart from one that waited."""
    per = r.get("seconds_per_transfer")
    if not per:
        return ""
    return (
        f"; CPU s per upload, coordinator {', '.join(map(str, per['cpu_up']))}, "
        f"raw server {', '.join(map(str, per['raw_cpu_up']))}"
    )


def markdown(figures: dict[str, Any], command: str) -> str:
    lines = [
        "# Checkpoint transfer: Baton vs raw gRPC (same mTLS channel settings)",
        "",
        f"Command: `{command}`",
        "",
        f"Coordinator idle RSS {figures['coordinator_idle_rss_mib']} MiB, downloads in "
        f"{figures['coordinator_chunk_bytes'] // 1024} KiB chunks; medians of "
        f"{figures['repeat']}; coordinator MALLOC_ARENA_MAX="
        f"{figures['malloc_arena_max'] or 'default'}, MALLOC_MMAP_THRESHOLD_="
        f"{figures.get('malloc_mmap_threshold') or 'default'}, MALLOC_TRIM_THRESHOLD_="
        f"{figures.get('malloc_trim_threshold') or 'default'}. Ratio = Baton / raw throughput "
        "(target >= 0.8 at 100 MB; coordinator RSS <= 150 MB). Baton's upload is the "
        f"{figures.get('baton_call', 'UploadCheckpoint')} call"
        + (
            " (bundle + hop result in one call, timed to its commit)."
            if figures.get("baton_call") == "HandBackHop"
            else "."
        ),
        "",
        "Through the coordinator: the upload is HandBackHop from its first message to its answer "
        "(the bundle streamed into the spool file while hashed and value-checked, fsync, rename "
        "into the store, hop commit); the download is DownloadCheckpoint from the store. Raw: "
        "bytes messages of the same chunk size over a channel and server built by the same "
        "helpers (same mTLS, message-size, window and keep-alive options), the server hashing "
        "(sha256) what it receives and writing nothing (`raw up unhashed`: not even hashing), "
        "serving downloads from memory unhashed. Both clients hash before the call. Baton's "
        "client is "
        "the site agent's own call (`site_agent.transfers.SiteStub`: hand-framed chunk "
        "messages). sha256 CPU s: hashing the size alone on one core (what both servers pay). "
        "Client CPU s: this process (the clients' side, hashing before the call included).",
        "",
        f"Load before: `{figures.get('uptime_before', '')}`; after: "
        f"`{figures.get('uptime_after', '(run cut short)')}`.",
        "",
        "| size | upload chunk | raw up MB/s | Baton up MB/s | up ratio "
        "| raw up unhashed MB/s; ratio | raw down MB/s "
        "| Baton down MB/s | down ratio "
        "| coordinator RSS before; after (6 s later); peak up / down "
        "| raw server CPU s up / down | coordinator CPU s up / down "
        "| RSS growth while uploading: raw / coordinator | client CPU s up: raw / site "
        "| client CPU s down: raw / site | sha256 CPU s | load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in figures["rows"]:
        lines.append(
            f"| {r['size_mib']} MiB | {r['chunk_kib']} KiB | {r['raw_upload_mb_s']} "
            f"| {r['baton_upload_mb_s']} | {r['upload_ratio']} "
            f"| {r.get('raw_upload_unhashed_mb_s', '')}; {r.get('upload_ratio_unhashed', '')} "
            f"| {r['raw_download_mb_s']} "
            f"| {r['baton_download_mb_s']} | {r['download_ratio']} "
            f"| {r.get('coordinator_rss_mib_before', '?')}; "
            f"{r.get('coordinator_rss_mib_settled', '?')}; "
            f"{r['coordinator_peak_rss_mib_upload']} / "
            f"{r['coordinator_peak_rss_mib_download']} MiB "
            f"| {r.get('raw_server_cpu_s_upload', '')} / "
            f"{r.get('raw_server_cpu_s_download', '')} "
            f"| {r.get('coordinator_cpu_s_upload', '')} / "
            f"{r.get('coordinator_cpu_s_download', '')} "
            f"| {r.get('raw_server_rss_growth_mib_upload', '?')} / "
            f"{r.get('coordinator_rss_growth_mib_upload', '?')} MiB "
            f"| {r.get('raw_client_cpu_s_upload', '')} / {r.get('site_cpu_s_upload', '')} "
            f"| {r.get('raw_client_cpu_s_download', '')} / {r.get('site_cpu_s_download', '')} "
            f"| {r.get('sha256_cpu_s', '')} | {r.get('load_average_1m', '')} |"
        )
    pairs = [line for line in map(_pairs_line, figures["rows"]) if line]
    if pairs:
        lines += ["", "Ratios per interleaved pair (each Baton transfer against the raw one "
                  "just before it):", "", *pairs]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(figures: dict[str, Any], path: Path) -> None:
    """Throughput by size: raw gRPC and Baton, upload and download (largest chunk size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunk = max(r["chunk_kib"] for r in figures["rows"])
    rows = sorted((r for r in figures["rows"] if r["chunk_kib"] == chunk),
                  key=lambda r: r["size_mib"])  # fmt: skip
    sizes = [r["size_mib"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in [
        ("raw_upload_mb_s", "raw gRPC upload", "k--"),
        ("baton_upload_mb_s", f"Baton {figures.get('baton_call', 'upload')}", "C0-o"),
        ("raw_download_mb_s", "raw gRPC download", "k:"),
        ("baton_download_mb_s", "Baton download", "C1-s"),
    ]:
        ax.plot(sizes, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s} MiB" for s in sizes])
    ax.set_ylabel("MB/s (median)")
    ax.set_title(f"Checkpoint transfer over mTLS, {chunk} KiB chunks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--raw-server":
        asyncio.run(_raw_server(Path(sys.argv[2]), Path(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 10, 100], help="MiB, comma-separated")  # fmt: skip
    parser.add_argument("--chunk-kib", type=lambda s: [int(x) for x in s.split(",")],
                        default=[CHUNK_BYTES // 1024], help="upload chunk sizes")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--malloc-arena-max", type=int, default=2,
                        help="the coordinator's MALLOC_ARENA_MAX (0: glibc default)")  # fmt: skip
    parser.add_argument("--malloc-trim-threshold", type=int, default=0,
                        help="the coordinator's MALLOC_TRIM_THRESHOLD_ (0: glibc's default); "
                             "with a fixed mmap threshold above the chunk size, one above a few "
                             "chunks keeps freed message buffers for reuse")  # fmt: skip
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="the coordinator's MALLOC_MMAP_THRESHOLD_ (0: glibc's sliding "
                             "default)")  # fmt: skip
    parser.add_argument("--legacy", action="store_true",
                        help="time UploadCheckpoint (then ReportHopResult) instead of "
                             "HandBackHop")  # fmt: skip
    parser.add_argument("--profile", nargs="?", const="python", choices=["python", "native"],
                        help="sample the coordinator with py-spy into results/NAME_profile.txt "
                             "(collapsed stacks; `native`: with C frames)")  # fmt: skip
    parser.add_argument("--name", default="transfer")
    args = parser.parse_args()
    command = "python benchmarks/transfer.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)

    def report(figures: dict[str, Any]) -> None:
        (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
        (RESULTS / f"{args.name}.md").write_text(markdown(figures, command))

    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args, Path(tmp), report)
    report(figures)
    plot(figures, RESULTS / f"{args.name}.png")
    print(markdown(figures, command))


if __name__ == "__main__":
    main()
