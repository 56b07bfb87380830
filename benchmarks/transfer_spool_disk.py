"""How fast a streamed upload's spool file can be made durable on this disk, by write strategy.

An upload's 1 MiB chunks arrive at a given rate (the network's: `--mb-s`); each is written to a
new file as it arrives, and the file must be durable (fsync) before the upload's commit. Timed
per strategy: when the last chunk was written ("arrival": later than the network's pace if the
writes held it back), the tail from the last chunk to the end of the fsync (what the hand back's
answer waits for), and this process's CPU. Strategies, interleaved round by round:

- `direct`: direct I/O (O_DIRECT) through a 1 MiB aligned staging buffer, one write in flight
  on a disk thread (the coordinator's spool writer up to session 13);
- `page-cache`: page cache writes, fsync at the end;
- `page-cache+writeback`: page cache writes, `sync_file_range(SYNC_FILE_RANGE_WRITE)` every
  8 MiB (writeback started, not waited for: the fallback of session 13's writer);
- `page-cache+fdatasync`: page cache writes, an fdatasync every 8 MiB on its own thread, one at
  a time (the writer of session 14);
- `page-cache+fdatasync+reserved`: the same, the file's blocks allocated first (fallocate,
  size kept);
- `page-cache+fdatasync+eager`: the same, each chunk's writeback started as it is written
  (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on the writing thread);
- `page-cache+fdatasync+eager-behind`: the same writeback started from another thread, one
  call at a time, for all the chunks written since the last (the writing thread never waits).

A virtual disk whose host caches writes (virtio, write-back) makes the fsync flush the host's
cache: its cost grows with the bytes not yet flushed, which is what an fdatasync behind the
stream keeps small.

    nice -n 19 .venv/bin/python benchmarks/transfer_spool_disk.py --mib 100 --mb-s 450 --rounds 5
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

MiB = 1024 * 1024
_EVERY = 8 * MiB
_THREADS = ThreadPoolExecutor(max_workers=3)


def _pwrite_all(fd: int, buffer: mmap.mmap, length: int, at: int) -> None:
    with memoryview(buffer) as view:
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:length], at + done)


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]


def _sync_file_range() -> Callable[[int, int, int], None]:
    call = ctypes.CDLL(None, use_errno=True).sync_file_range
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return lambda fd, offset, length: call(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


class _Stream:
    """Chunks handed over at the network's pace: `wait(i)` returns when chunk i has arrived."""

    def __init__(self, seconds_per_chunk: float) -> None:
        self.step = seconds_per_chunk
        self.started = time.perf_counter()

    def wait(self, index: int) -> None:
        due = self.started + (index + 1) * self.step
        while (now := time.perf_counter()) < due:
            time.sleep(due - now)


def direct(path: Path, chunks: list[bytes], stream: _Stream) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    buffers = [mmap.mmap(-1, MiB), mmap.mmap(-1, MiB)]
    pending: Future[None] | None = None
    try:
        for index, chunk in enumerate(chunks):
            stream.wait(index)
            buffer = buffers[index % 2]
            buffer[: len(chunk)] = chunk
            if pending is not None:
                pending.result()
            pending = _THREADS.submit(_pwrite_all, fd, buffer, len(chunk), index * MiB)
        last = time.perf_counter()
        if pending is not None:
            pending.result()
        os.fsync(fd)
    finally:
        os.close(fd)
    return last


def _fallocate_keep_size() -> Callable[[int, int, int], None]:
    call = ctypes.CDLL(None, use_errno=True).fallocate
    call.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return lambda fd, offset, length: call(fd, 1, offset, length)  # FALLOC_FL_KEEP_SIZE


def page_cache(
    hint: str | None, *, reserve: bool = False, eager: str | None = None
) -> Callable[[Path, list[bytes], _Stream], float]:
    start_writeback = _sync_file_range() if hint == "writeback" else None
    write_back = _sync_file_range() if eager else None
    allocate = _fallocate_keep_size() if reserve else None

    def run(path: Path, chunks: list[bytes], stream: _Stream) -> float:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        if allocate is not None:
            allocate(fd, 0, sum(len(chunk) for chunk in chunks))
        syncing: Future[None] | None = None
        starting: Future[None] | None = None  # eager="behind": the writeback being started
        started = behind = position = 0
        try:
            for index, chunk in enumerate(chunks):
                stream.wait(index)
                _write_all(fd, chunk)
                position += len(chunk)
                if write_back is not None and eager == "here":
                    write_back(fd, position - len(chunk), len(chunk))  # started at once
                elif write_back is not None and (starting is None or starting.done()):
                    # Started on another thread, one call at a time, for all written since.
                    starting = _THREADS.submit(write_back, fd, started, position - started)
                    started = position
                if hint is None or position - behind < _EVERY:
                    continue
                if start_writeback is not None:
                    start_writeback(fd, behind, position - behind)
                    behind = position
                elif syncing is None or syncing.done():
                    if syncing is not None:
                        syncing.result()
                    syncing = _THREADS.submit(os.fdatasync, fd)
                    behind = position
            last = time.perf_counter()
            for pending in (starting, syncing):
                if pending is not None:
                    pending.result()
            os.fsync(fd)
        finally:
            os.close(fd)
        return last

    return run


STRATEGIES: dict[str, Callable[[Path, list[bytes], _Stream], float]] = {
    "direct": direct,
    "page-cache": page_cache(None),
    "page-cache+writeback": page_cache("writeback"),
    "page-cache+fdatasync": page_cache("fdatasync"),
    "page-cache+fdatasync+reserved": page_cache("fdatasync", reserve=True),
    "page-cache+fdatasync+eager": page_cache("fdatasync", eager="here"),
    "page-cache+fdatasync+eager-behind": page_cache("fdatasync", eager="behind"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--mb-s", type=float, default=450.0, help="the chunks' arrival rate")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="on the disk to measure")
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES),
                        help="comma-separated, of: " + ", ".join(STRATEGIES))  # fmt: skip
    args = parser.parse_args()
    strategies = {name: STRATEGIES[name] for name in args.strategies}
    if not sys.platform.startswith("linux"):
        raise SystemExit("Linux only (O_DIRECT, sync_file_range)")
    chunks = [os.urandom(MiB) for _ in range(args.mib)]
    step = MiB / (args.mb_s * 1e6)
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in strategies}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for _ in range(args.rounds):
            for name, strategy in strategies.items():
                path = Path(tmp) / name
                cpu = time.process_time()
                stream = _Stream(step)
                last = strategy(path, chunks, stream)
                ended = time.perf_counter()
                figures[name].append(
                    (last - stream.started, ended - last, time.process_time() - cpu)
                )
                path.unlink()
    load = os.getloadavg()[0]
    pace = args.mib * step * 1000
    print(f"{args.mib} MiB in 1 MiB chunks arriving at {args.mb_s:g} MB/s ({pace:.0f} ms); "
          f"medians of {args.rounds}; load {load:.1f}")  # fmt: skip
    print("| strategy | last chunk written, ms | last chunk -> durable, ms (each round) "
          "| durable, ms | CPU ms |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, rows in figures.items():
        arrival, tail, cpu = (statistics.median(column) for column in zip(*rows, strict=True))
        tails = ", ".join(f"{row[1] * 1000:.0f}" for row in rows)
        print(f"| {name} | {arrival * 1000:.0f} | {tail * 1000:.0f} ({tails}) "
              f"| {(arrival + tail) * 1000:.0f} | {cpu * 1000:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
