"""Where the CPU of a 100 MiB upload goes: the coordinator's threads against the raw server's.

`benchmarks/transfer.py` gives each side's CPU seconds in total; this splits them by thread
(event loop, gRPC's event_engine threads, the coordinator's worker threads: spool writes, hashing,
value checks, ledger writes) and, with `--perf`, by what the samples were in (sha256, the page
cache write, numpy, memcpy, page faults, ...), timing only the upload calls. Raw and Baton uploads
alternate; both servers, both clients and the payload come from `benchmarks/transfer.py` (same
channel helpers, chunk size, malloc settings). Thread CPU from /proc (Linux); `--perf` needs
`perf` and permission to sample the two processes. Nothing is written but the printed summary
and, with `--perf`, the two perf.data files in that directory. `--download` times downloads
instead: the raw server's from memory, and the next site's DownloadCheckpoint of the bundle just
handed back (`--settle S`: S seconds after the hand back's answer, so that what the coordinator
does after an answer runs before the timed download, not during it).

    python benchmarks/upload_threads.py --uploads 6 --perf /tmp/upload-perf
    python benchmarks/upload_threads.py --download --settle 2 --uploads 6
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # the benchmark's own servers, clients and payloads

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from protocols.pki import Role, init_ca, issue_certificate
from protocols.transport import CHUNK_BYTES, secure_channel

_TICK = os.sysconf("SC_CLK_TCK")
# What a perf sample's call chain holds, first match wins: its category.
_CATEGORIES = [
    ("sha256", ("sha256", "SHA256")),
    ("page cache write (ext4)", ("ext4_", "generic_perform_write", "vfs_write")),
    ("page faults, page zeroing", ("clear_page", "exc_page_fault", "do_anonymous_page")),
    ("munmap", ("munmap",)),
    ("numpy (value check)", ("_multiarray_umath",)),
    ("socket receive", ("recvmsg", "tcp_recvmsg")),
    ("socket send", ("sendmsg",)),
    ("futex (thread wake-ups)", ("futex",)),
    ("sqlite", ("libsqlite",)),
]


def _thread_cpu(pid: int) -> dict[tuple[int, str], float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[(int(tid), comm)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _switches(pid: int) -> dict[tuple[int, str], float]:
    """Context switches (voluntary + involuntary) of each thread so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        lines = [line for line in status.splitlines() if "ctxt_switches:" in line]
        out[(int(tid), comm)] = float(sum(int(line.split()[1]) for line in lines))
    return out


def _by_thread(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float],
               pid: int) -> dict[str, float]:  # fmt: skip
    spent: dict[str, float] = collections.defaultdict(float)
    for (tid, comm), seconds in after.items():
        name = "event loop (main)" if tid == pid else comm
        spent[name] += seconds - before.get((tid, comm), 0.0)
    return spent


class _Perf:
    """`perf record` of one process, sampling only between `on()` and `off()`."""

    def __init__(self, pid: int, out: Path) -> None:
        tmp = Path(tempfile.mkdtemp())
        control, ack = tmp / "control", tmp / "ack"
        os.mkfifo(control)
        os.mkfifo(ack)
        self.proc = subprocess.Popen(
            ["perf", "record", "-F", "997", "-g", "-D", "-1", "-p", str(pid), "-o", str(out),
             f"--control=fifo:{control},{ack}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.control = control.open("w")
        self.ack = ack.open()

    def _say(self, command: str) -> None:
        self.control.write(command + "\n")
        self.control.flush()
        self.ack.readline()

    def on(self) -> None:
        self._say("enable")

    def off(self) -> None:
        self._say("disable")

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(60)


def perf_summary(data: Path, pid: int, uploads: int) -> list[tuple[str, str, float]]:
    """(thread, category, ms per upload) from a perf.data file, largest first."""
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,tid,comm,ip,sym,dso"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    sample: list[str] | None = None
    thread = ""
    for line in [*script.splitlines(), ""]:
        head = re.match(r"\s*(\S.*?)\s+(\d+)/(\d+)\s*$", line)
        if head and not line.startswith("\t"):
            thread = "event loop (main)" if int(head.group(3)) == pid else head.group(1)
            sample = []
        elif line.strip() and sample is not None:
            sample.append(line.strip())
        elif sample is not None:
            chain = " ".join(sample)
            category = next((name for name, keys in _CATEGORIES if any(k in chain for k in keys)),
                            None)  # fmt: skip
            if category is None:
                leaf = re.search(r"\((.*)\)\s*$", sample[0]) if sample else None
                category = Path(leaf.group(1)).name if leaf else "?"
            counts[(thread, category)] += 1
            sample = None
    return [(t, c, round(n / uploads, 1)) for (t, c), n in counts.most_common()]  # ~1 ms each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=6)
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--perf", type=Path, help="directory for perf.data files (and a summary)")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=131072,
        help="the coordinator's MALLOC_MMAP_THRESHOLD_ (the deployed value)",
    )
    parser.add_argument(
        "--malloc-trim-threshold",
        type=int,
        default=0,
        help="the coordinator's MALLOC_TRIM_THRESHOLD_ (0: glibc's default)",
    )
    parser.add_argument("--download", action="store_true",
                        help="time downloads instead: the raw server's, and the next site's "
                             "DownloadCheckpoint of the bundle just handed back")  # fmt: skip
    parser.add_argument("--settle", type=float, default=0.0,
                        help="with --download, seconds between the hand back's answer (and the "
                             "next site's task) and the download: what the coordinator does "
                             "after the answer (a committed hop's clean-up, the watchdog) then "
                             "runs before the download, not during it")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        run(args, Path(tmp_name))


def run(args: argparse.Namespace, tmp: Path) -> None:
    pki = tmp / "pki"
    init_ca(pki)
    for role, name in [(Role.COORDINATOR, "coordinator"), (Role.ADMIN, "admin"),
                       (Role.SITE, "site-a"), (Role.SITE, "site-b")]:  # fmt: skip
        issue_certificate(pki, pki, role, name)
    raw, raw_port, _ = transfer._start(
        [sys.executable, transfer.__file__, "--raw-server", str(pki), str(tmp / "raw.port")],
        tmp / "raw.port",
    )
    command = [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
               "--port-file", str(tmp / "c.port"), "--state-dir", str(tmp / "state"),
               "--ca", str(pki / "ca.crt"), "--cert", str(pki / "coordinator.crt"),
               "--key", str(pki / "coordinator.key"), "--log-level", "WARNING"]  # fmt: skip
    # The deployed malloc settings, as transfer.py runs the coordinator (unless told otherwise).
    malloc = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
    if args.malloc_trim_threshold:
        malloc["MALLOC_TRIM_THRESHOLD_"] = str(args.malloc_trim_threshold)
    coordinator, port, _ = transfer._start(command, tmp / "c.port", **malloc)
    perfs: dict[str, _Perf] = {}
    try:
        raw_channel = secure_channel(f"localhost:{raw_port}", transfer._tls(pki, "site-a"))
        sites = {n: transfer.Site(port, pki, n) for n in ("site-a", "site-b")}
        admin = AdminClient(f"localhost:{port}", transfer._tls(pki, "admin"))
        admin.wait_for_sites({"site-a", "site-b"}, timeout=30)
        size = args.size_mib * transfer.MiB
        payload = os.urandom(size)

        def hop() -> tuple[str, Any, bytes]:
            plan = parse_plan({"name": "cpu", "dataset": "notes", "labels": ["x", "y"],
                               "sites": ["site-a", "site-b"]})  # fmt: skip
            run_id = admin.start_run(plan)
            task = sites["site-a"].tasks.get(timeout=30)
            return run_id, task, sites["site-a"].bundle(task, size)

        def baton(task: Any, data: bytes) -> float:
            return sites["site-a"].upload(task, data, CHUNK_BYTES, legacy=False)[0]

        for _ in range(2):  # warm: every thread exists before perf attaches
            transfer.raw_upload(raw_channel, payload, CHUNK_BYTES)
            run_id, task, data = hop()
            baton(task, data)
            sites["site-b"].tasks.get(timeout=30)
            admin.control(run_id, "abort", "benchmark")
        if args.perf is not None:
            args.perf.mkdir(parents=True, exist_ok=True)
            perfs = {
                "raw": _Perf(raw.pid, args.perf / "raw.data"),
                "coordinator": _Perf(coordinator.pid, args.perf / "coordinator.data"),
            }
            time.sleep(1)
        seconds: dict[str, list[float]] = {"raw": [], "coordinator": []}
        threads: dict[str, list[dict[str, float]]] = {"raw": [], "coordinator": []}
        switches: dict[str, list[dict[str, float]]] = {"raw": [], "coordinator": []}

        def timed(side: str, pid: int, upload: Any, *call: Any) -> None:
            before, switched = _thread_cpu(pid), _switches(pid)
            if side in perfs:
                perfs[side].on()
            seconds[side].append(upload(*call))
            if side in perfs:
                perfs[side].off()
            threads[side].append(_by_thread(before, _thread_cpu(pid), pid))
            switches[side].append(_by_thread(switched, _switches(pid), pid))

        for _ in range(args.uploads):
            if args.download:
                timed("raw", raw.pid, transfer.raw_download, raw_channel, size, CHUNK_BYTES)
                run_id, task, data = hop()
                _, _, sha = sites["site-a"].upload(task, data, CHUNK_BYTES, legacy=False)
                sites["site-b"].tasks.get(timeout=30)
                time.sleep(args.settle)
                timed("coordinator", coordinator.pid, sites["site-b"].download, sha, len(data))
                admin.control(run_id, "abort", "benchmark")
                continue
            timed("raw", raw.pid, transfer.raw_upload, raw_channel, payload, CHUNK_BYTES)
            run_id, task, data = hop()
            timed("coordinator", coordinator.pid, baton, task, data)
            sites["site-b"].tasks.get(timeout=30)
            admin.control(run_id, "abort", "benchmark")
        for perf in perfs.values():
            perf.stop()
        for site in sites.values():
            site.close()
    finally:
        for proc in (coordinator, raw):
            proc.send_signal(15)
            proc.wait(30)
    kind = f"downloads (settle {args.settle:g} s)" if args.download else "uploads"
    print(f"{args.uploads} {kind} of {args.size_mib} MiB each side, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for side in ("raw", "coordinator"):
        wall = statistics.median(seconds[side])
        names = sorted({n for t in threads[side] for n in t})
        split = {n: round(statistics.median(t.get(n, 0.0) for t in threads[side]) * 1000)
                 for n in names}  # fmt: skip
        total = round(statistics.median(sum(t.values()) for t in threads[side]) * 1000)
        print(f"{side}: median {wall * 1000:.0f} ms wall; CPU ms per transfer {total}: {split}")
        switched = {n: round(statistics.median(t.get(n, 0.0) for t in switches[side]))
                    for n in names}  # fmt: skip
        print(f"    context switches per transfer: {switched}")
        if side in perfs:
            pid = raw.pid if side == "raw" else coordinator.pid
            data_file = args.perf / ("raw.data" if side == "raw" else "coordinator.data")
            for thread, category, ms in perf_summary(data_file, pid, args.uploads)[:25]:
                print(f"    {ms:7.1f} ms  {thread:20s} {category}")


if __name__ == "__main__":
    main()
