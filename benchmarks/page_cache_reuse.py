"""What writing a new file costs when the page cache grows, against reusing pages just freed.

The coordinator writes each uploaded bundle through the page cache and keeps it (renamed into
the store), so every upload takes new page cache pages. On a virtual machine whose host takes
back the memory its guest leaves free (virtio-balloon free page reporting: see
`/sys/bus/virtio/drivers/virtio_balloon/*/features`, bit 5), a page the guest has not touched
lately costs a host fault on its first write, which the guest sees as CPU time in the copy into
the page cache. Per round, in turn: `grow` writes `--files` new files of `--mib` MiB and keeps
them all (as the store does); `reuse` writes as many, dropping the previous file's pages
(POSIX_FADV_DONTNEED, as `CheckpointStore.make_room` does) before writing the next; `behind`
keeps them all but drops each file's pages behind its writes (an fdatasync every 8 MiB, then
POSIX_FADV_DONTNEED of what it made clean); `direct` writes with O_DIRECT from one aligned
buffer (each chunk copied into it first), no page cache, as session 22's direct-I/O spool did
(measured, not merged: `results/upload22.md`). Files are written in 1 MiB writes and
fdatasynced; CPU is this process's. Each file is then read back in 1 MiB preads, as a download
reads the store: through the page cache, but with O_DIRECT in `direct` mode (as that branch's
store read a streamed bundle); `direct-buffered` writes as `direct` and reads back through the
page cache (what a download of it costs without O_DIRECT reads). Its CPU and wall time show
what a mode leaves for the next site's download. The first file of a
round may reuse what the round before freed; the rest show the steady state.

    nice -n 10 .venv/bin/python benchmarks/page_cache_reuse.py --rounds 2 --name NAME
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "results"


def _cpu() -> float:
    return time.process_time()


_BEHIND = 8  # MiB between fdatasyncs in `behind` mode (the spool's _SYNC_BYTES)


def _write(path: Path, chunk: bytes, mib: int, mode: str) -> float:
    """CPU ms to write `mib` MiB to a new file (the writes, and in `behind` mode the fdatasyncs
    and page drops behind them; not the last fdatasync)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags, 0o600)
    aligned = mmap.mmap(-1, len(chunk)) if mode == "direct" else None
    try:
        started = _cpu()
        for index in range(mib):
            if aligned is not None:
                aligned[:] = chunk
                os.write(fd, aligned)
            else:
                os.write(fd, chunk)
            if mode == "behind" and (index + 1) % _BEHIND == 0:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, (index + 1) * len(chunk), os.POSIX_FADV_DONTNEED)
        spent = _cpu() - started
        os.fdatasync(fd)
    finally:
        os.close(fd)
        if aligned is not None:
            aligned.close()
    return spent * 1000


def _read(path: Path, *, direct: bool = False) -> tuple[float, float]:
    """(CPU ms, wall ms) to read a file in 1 MiB preads (with O_DIRECT into one aligned
    buffer, as session 22's unmerged branch read a streamed bundle, if `direct`)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buffer = mmap.mmap(-1, MiB)
    try:
        started, wall = _cpu(), time.perf_counter()
        offset = 0
        while got := (
            os.preadv(fd, [buffer], offset) if direct else len(os.pread(fd, MiB, offset))
        ):
            offset += got
        return (_cpu() - started) * 1000, (time.perf_counter() - wall) * 1000
    finally:
        buffer.close()
        os.close(fd)


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _round(
    directory: Path, mode: str, files: int, mib: int, chunk: bytes
) -> tuple[list[float], list[float], list[float]]:
    """CPU ms of each file's writes, then CPU and wall ms of reading it back (`direct`: with
    O_DIRECT, as session 22's unmerged branch read a streamed bundle; else through the page
    cache)."""
    paths = [directory / f"{mode}-{index}" for index in range(files)]
    spent, read_cpu, read_wall = [], [], []
    try:
        for index, path in enumerate(paths):
            if mode == "reuse" and index:
                _drop(paths[index - 1])
            spent.append(_write(path, chunk, mib, "direct" if mode == "direct-buffered" else mode))
            cpu, wall = _read(path, direct=mode == "direct")
            read_cpu.append(cpu)
            read_wall.append(wall)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return spent, read_cpu, read_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="on the disk to measure")
    parser.add_argument("--modes", default="grow,reuse",
                        help="of grow, reuse, behind, direct, direct-buffered (the last two need a "
                             "file system that takes O_DIRECT)")  # fmt: skip
    parser.add_argument("--name", default="page_cache_reuse")
    args = parser.parse_args()
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("needs posix_fadvise (Linux)")
    chunk = os.urandom(MiB)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    modes = args.modes.split(",")
    rows: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    reads: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    read_walls: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for _ in range(args.rounds):
            for mode in modes:
                spent, read_cpu, read_wall = _round(Path(tmp), mode, args.files, args.mib, chunk)
                rows[mode].append(spent)
                reads[mode].append(read_cpu)
                read_walls[mode].append(read_wall)
    figures = {
        "command": "python benchmarks/page_cache_reuse.py " + " ".join(sys.argv[1:]),
        "uptime": uptime,
        "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "mib": args.mib,
        "cpu_ms_per_file": {mode: [[round(v) for v in r] for r in rs] for mode, rs in rows.items()},
        "read_cpu_ms_per_file": {m: [[round(v) for v in r] for r in rs] for m, rs in reads.items()},
        "read_wall_ms_per_file": {
            m: [[round(v) for v in r] for r in rs] for m, rs in read_walls.items()
        },
    }
    lines = [
        "# Writing new files: page cache growing against pages reused",
        "",
        f"Command: `{figures['command']}`; before `{uptime}`; after `{figures['uptime_after']}`.",
        "",
        f"CPU ms to write each {args.mib} MiB file (1 MiB writes), file by file, per round, then "
        "CPU and wall ms to read it back right after; medians of the files after the first.",
        "",
        "| mode | round | write CPU ms per file | median | read back CPU ms | median | "
        "read back wall ms | median |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def rest(values: list[int]) -> str:
        return f"{statistics.median(values[1:]) if len(values) > 1 else values[0]:.0f}"

    for mode, per_round in figures["cpu_ms_per_file"].items():
        for index, values in enumerate(per_round):
            read_cpu = figures["read_cpu_ms_per_file"][mode][index]
            read_wall = figures["read_wall_ms_per_file"][mode][index]
            lines.append(
                f"| {mode} | {index + 1} | {', '.join(map(str, values))} | {rest(values)} | "
                f"{', '.join(map(str, read_cpu))} | {rest(read_cpu)} | "
                f"{', '.join(map(str, read_wall))} | {rest(read_wall)} |"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
