"""CPU seconds of the coordinator's own work on each chunk of a 100 MiB upload, in process.

What the coordinator does with every chunk message of a hand back before it reaches the disk:
the servicer's request deserializer (as `MalformedMessageGuard` installs it on HandBackHop) and
`BundleStream.feed` (sha256 and the float value check). Thread CPU time, best of `--repeat`, in a
child process run with the coordinator's deployed malloc settings (MALLOC_ARENA_MAX=2,
MALLOC_MMAP_THRESHOLD_=131072: every allocation of a chunk's size is a fresh mmap, so each copy
of a chunk also costs its page faults). CPU seconds, not wall time: the figure holds on a loaded
machine. `--root` imports the code from another checkout (e.g. an older commit's `git archive`)
to compare before and after in one command:

    nice -n 19 .venv/bin/python benchmarks/transfer_chunk_cpu.py --root /tmp/before --root .
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024
_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}


def measure(size_mib: int, chunk: int, repeat: int) -> dict[str, float]:
    """(In the child.) Best-of-`repeat` thread CPU seconds: deserialize alone, and with feed."""
    import numpy as np
    import safetensors.numpy

    import coordinator.servicer as servicer
    from protocols.checkpoint import CheckpointManifest, bundle_metadata
    from protocols.checkpoint_stream import BundleStream
    from protocols.v1 import baton_pb2 as pb

    manifest = CheckpointManifest(task_type="t", base_model_sha256="ab" * 32, run_id="r",
                                  hop_id="h", producer_site="s")  # fmt: skip
    values = np.random.default_rng(0).standard_normal(size_mib * MiB // 4, np.float32)
    data = safetensors.numpy.save({"w": values}, metadata=bundle_metadata(manifest, {}))
    messages = [pb.HandBackRequest(data=data[i : i + chunk]).SerializeToString()
                for i in range(0, len(data), chunk)]  # fmt: skip
    deserializer: Any = pb.HandBackRequest.FromString
    chunks_first = getattr(servicer, "_chunks_first", None)  # absent before zero-copy chunks
    if chunks_first is not None:
        deserializer = chunks_first(deserializer)
    parse = servicer._safe(deserializer)
    best = {"deserialize": float("inf"), "deserialize_hash_check": float("inf")}
    for _ in range(repeat):
        for what in best:
            started = time.thread_time()
            stream = BundleStream()
            for message in messages:
                chunk_data = parse(message).data
                if what == "deserialize_hash_check":
                    stream.feed(chunk_data)
            best[what] = min(best[what], time.thread_time() - started)
            assert what == "deserialize" or stream.position == len(data)
    return {k: round(v, 4) for k, v in best.items()}


def _child(root: Path, size_mib: int, chunk: int, repeat: int) -> dict[str, Any]:
    env = {**os.environ, **_MALLOC, "PYTHONPATH": str(root.resolve())}
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(size_mib), str(chunk), str(repeat)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return {"root": str(root), "commit": commit or "(not a git checkout)",
            **json.loads(out.stdout)}  # fmt: skip


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        size, chunk, repeat = (int(x) for x in sys.argv[2:])
        print(json.dumps(measure(size, chunk, repeat)))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, action="append",
                        help="checkout to import (repeatable; default: this one)")  # fmt: skip
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="roots measured in turn, N times")
    parser.add_argument("--name", default="transfer_chunk_cpu")
    args = parser.parse_args()
    roots = args.root or [Path(__file__).resolve().parent.parent]
    uptime = _uptime()
    rows = []
    for _ in range(args.rounds):
        for root in roots:
            row = _child(root, args.size_mib, args.chunk_kib * 1024, args.repeat)
            row["uptime"] = subprocess.run(
                ["uptime"], capture_output=True, text=True
            ).stdout.strip()
            rows.append(row)
            print(json.dumps(row), flush=True)
    figures = {"size_mib": args.size_mib, "chunk_kib": args.chunk_kib, "repeat": args.repeat,
               "malloc": _MALLOC, "uptime_before": uptime, "rows": rows}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        "# Coordinator CPU per chunk of an upload (in process)",
        "",
        f"Command: `python benchmarks/transfer_chunk_cpu.py {' '.join(sys.argv[1:])}`",
        "",
        f"A {args.size_mib} MiB float32 bundle in {args.chunk_kib} KiB HandBackRequest chunks; "
        f"thread CPU seconds, best of {args.repeat}; MALLOC_ARENA_MAX=2, "
        "MALLOC_MMAP_THRESHOLD_=131072 (as deployed). Load before: "
        f"`{uptime}`.",
        "",
        "| code | deserialize s | deserialize + sha256 + value check s | load |",
        "|---|---|---|---|",
    ]
    for row in rows:
        load = row["uptime"].split("load average:")[-1].strip()
        lines.append(f"| {row['root']} ({row['commit']}) | {row['deserialize']} "
                     f"| {row['deserialize_hash_check']} | {load} |")  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
