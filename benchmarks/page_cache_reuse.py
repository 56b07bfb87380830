"""What writing a new file costs when the page cache grows, against reusing pages just freed.

The coordinator writes each uploaded bundle through the page cache and keeps it (renamed into
the store), so every upload takes new page cache pages. On a virtual machine whose host takes
back the memory its guest leaves free (virtio-balloon free page reporting: see
`/sys/bus/virtio/drivers/virtio_balloon/*/features`, bit 5), a page the guest has not touched
lately costs a host fault on its first write, which the guest sees as CPU time in the copy into
the page cache. Per round, in turn: `grow` writes `--files` new files of `--mib` MiB and keeps
them all (as the store does); `reuse` writes as many, dropping the previous file's pages
(POSIX_FADV_DONTNEED, as `CheckpointStore.make_room` does) before writing the next. Files are
written in 1 MiB writes and fdatasynced; CPU is this process's. The first file of a round may
reuse what the round before freed; the rest show the steady state.

    nice -n 10 .venv/bin/python benchmarks/page_cache_reuse.py --rounds 2 --name NAME
"""

from __future__ import annotations

import argparse
import json
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


def _write(path: Path, chunk: bytes, mib: int) -> float:
    """CPU ms to write `mib` MiB to a new file (the writes alone, not the fdatasync)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        started = _cpu()
        for _ in range(mib):
            os.write(fd, chunk)
        spent = _cpu() - started
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return spent * 1000


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _round(directory: Path, mode: str, files: int, mib: int, chunk: bytes) -> list[float]:
    paths = [directory / f"{mode}-{index}" for index in range(files)]
    spent = []
    try:
        for index, path in enumerate(paths):
            if mode == "reuse" and index:
                _drop(paths[index - 1])
            spent.append(_write(path, chunk, mib))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="on the disk to measure")
    parser.add_argument("--name", default="page_cache_reuse")
    args = parser.parse_args()
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("needs posix_fadvise (Linux)")
    chunk = os.urandom(MiB)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows: dict[str, list[list[float]]] = {"grow": [], "reuse": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for _ in range(args.rounds):
            for mode in ("grow", "reuse"):
                rows[mode].append(_round(Path(tmp), mode, args.files, args.mib, chunk))
    figures = {
        "command": "python benchmarks/page_cache_reuse.py " + " ".join(sys.argv[1:]),
        "uptime": uptime,
        "mib": args.mib,
        "cpu_ms_per_file": {mode: [[round(v) for v in r] for r in rs] for mode, rs in rows.items()},
    }
    lines = [
        "# Writing new files: page cache growing against pages reused",
        "",
        f"Command: `{figures['command']}`; `{uptime}`.",
        "",
        f"CPU ms to write each {args.mib} MiB file (1 MiB writes), file by file, per round; "
        "median of the files after the first.",
        "",
        "| mode | round | CPU ms per file | median after the first |",
        "|---|---|---|---|",
    ]
    for mode, per_round in figures["cpu_ms_per_file"].items():
        for index, values in enumerate(per_round):
            rest = statistics.median(values[1:]) if len(values) > 1 else values[0]
            lines.append(f"| {mode} | {index + 1} | {', '.join(map(str, values))} | {rest:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
