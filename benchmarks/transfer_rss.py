"""Where the coordinator's RSS sits, idle and at its peak during 100 MiB hand backs.

A coordinator started as `benchmarks/transfer.py` starts it (deployed malloc settings), two sites
of that script; then `--uploads` hand backs one after the other, each hop's run aborted after it.
`/proc/PID/smaps` is read every 5 ms during each upload; the sample with the largest total RSS is
kept and split by mapping: shared libraries and other files, glibc's main heap (`[heap]`), thread
stacks, ~1 MiB anonymous maps (Python's obmalloc arenas, mmapped message buffers and staging
buffers), larger anonymous maps (glibc's second arena, merged obmalloc arenas). Prints one line
per upload; writes nothing.

    nice -n 19 .venv/bin/python benchmarks/transfer_rss.py --uploads 3
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # the benchmark's own coordinator start, sites and bundles

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from protocols.pki import Role, init_ca, issue_certificate
from protocols.transport import CHUNK_BYTES

MiB = 1024 * 1024
_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def _kind(fields: list[str]) -> str:
    start, end = (int(x, 16) for x in fields[0].split("-"))
    name = fields[5] if len(fields) > 5 else ""
    if name.startswith("["):
        return name
    if name:
        return "files"
    size = end - start
    if fields[1].startswith("---"):
        return "guard pages"
    if size in (8 * MiB, 8 * MiB + 4096):
        return "thread stacks"
    if MiB <= size <= MiB + 8192:
        return "~1 MiB anonymous"
    return "anonymous < 1 MiB" if size < MiB else "anonymous > 1 MiB"


def smaps(pid: int) -> collections.Counter[str]:
    """KiB of RSS per kind of mapping."""
    by: collections.Counter[str] = collections.Counter()
    kind = ""
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            if _MAPPING.match(line):
                kind = _kind(line.split())
            elif line.startswith("Rss:"):
                by[kind] += int(line.split()[1])
    return by


def _peak_while(pid: int, call: Callable[[], float]) -> tuple[float, collections.Counter[str]]:
    """`call()`'s result and the largest sample of `smaps(pid)` taken while it ran."""
    peak: collections.Counter[str] = collections.Counter()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            now = smaps(pid)
            if sum(now.values()) > sum(peak.values()):
                peak = now
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return call(), peak
    finally:
        done.set()
        sampler.join()


def _hand_back(site: transfer.Site, task: Any, data: bytes) -> float:
    return site.upload(task, data, CHUNK_BYTES, legacy=False)[0]


def _show(by: collections.Counter[str]) -> str:
    parts = [f"{kind} {kib / 1024:.1f}" for kind, kib in by.most_common() if kib >= 100]
    return f"{sum(by.values()) / 1024:.1f} MiB ({', '.join(parts)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = tmp / "pki"
        init_ca(pki)
        for role, name in [(Role.COORDINATOR, "coordinator"), (Role.ADMIN, "admin"),
                           (Role.SITE, "site-a"), (Role.SITE, "site-b")]:  # fmt: skip
            issue_certificate(pki, pki, role, name)
        command = [sys.executable, "-m", "coordinator", "coordinator", "serve", "--port", "0",
                   "--port-file", str(tmp / "c.port"), "--state-dir", str(tmp / "state"),
                   "--ca", str(pki / "ca.crt"), "--cert", str(pki / "coordinator.crt"),
                   "--key", str(pki / "coordinator.key"), "--log-level", "WARNING"]  # fmt: skip
        coordinator, port, _ = transfer._start(command, tmp / "c.port", MALLOC_ARENA_MAX="2",
                                               MALLOC_MMAP_THRESHOLD_="131072")  # fmt: skip
        try:
            sites = {n: transfer.Site(port, pki, n) for n in ("site-a", "site-b")}
            admin = AdminClient(f"localhost:{port}", transfer._tls(pki, "admin"))
            admin.wait_for_sites({"site-a", "site-b"}, timeout=30)
            time.sleep(2)
            print("idle:", _show(smaps(coordinator.pid)), flush=True)
            for index in range(args.uploads):
                plan = parse_plan({"name": "rss", "dataset": "notes", "labels": ["x", "y"],
                                   "sites": ["site-a", "site-b"]})  # fmt: skip
                run_id = admin.start_run(plan)
                task = sites["site-a"].tasks.get(timeout=30)
                data = sites["site-a"].bundle(task, args.size_mib * MiB)
                before = smaps(coordinator.pid)
                upload = functools.partial(_hand_back, sites["site-a"], task, data)
                seconds, peak = _peak_while(coordinator.pid, upload)
                sites["site-b"].tasks.get(timeout=30)
                admin.control(run_id, "abort", "benchmark")
                print(f"upload {index}: {seconds * 1000:.0f} ms; before {_show(before)}; "
                      f"peak {_show(peak)}", flush=True)  # fmt: skip
                del data
            for site in sites.values():
                site.close()
            admin.close()
        finally:
            coordinator.terminate()
            coordinator.wait(30)


if __name__ == "__main__":
    main()
