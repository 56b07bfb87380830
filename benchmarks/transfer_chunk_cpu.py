"""CPU seconds of the coordinator's own work on each chunk of a 100 MiB upload, in process.

What the coordinator does with every chunk message of a hand back before it reaches the disk:
the servicer's request deserializer (as `MalformedMessageGuard` installs it on HandBackHop) and
`BundleStream.feed` (sha256 and the float value check). Thread CPU time, best of `--repeat`, in a
child process run with the coordinator's deployed malloc settings (MALLOC_ARENA_MAX=2,
MALLOC_MMAP_THRESHOLD_=131072: every allocation of a chunk's size is a fresh mmap, so each copy
of a chunk also costs its page faults). CPU seconds, not wall time: the figure holds on a loaded
machine. `--root` imports the code from another checkout (e.g. an older commit's `git archive`)
to compare before and after in one command. `--tensors N` splits the values into N tensors
laid end to end (a LoRA adapter holds hundreds: 2 per adapted module per layer), `--dtype` picks
float32 or float16; `value check s` is `BundleStream.feed` without the hash:

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


class _NoHash:
    """Stands in for sha256 to time the value check alone."""

    def update(self, data: object) -> None:
        pass


def measure(
    size_mib: int, chunk: int, repeat: int, tensors: int = 1, dtype: str = "float32"
) -> dict[str, float]:
    """(In the child.) Best-of-`repeat` thread CPU seconds: deserialize alone, and with feed;
    feed without its hash (the value check)."""
    import numpy as np
    import safetensors.numpy

    import coordinator.servicer as servicer
    from protocols.checkpoint import CheckpointManifest, bundle_metadata
    from protocols.checkpoint_stream import BundleStream
    from protocols.v1 import baton_pb2 as pb

    manifest = CheckpointManifest(task_type="t", base_model_sha256="ab" * 32, run_id="r",
                                  hop_id="h", producer_site="s")  # fmt: skip
    values = np.random.default_rng(0).standard_normal(size_mib * MiB // 4).astype(dtype)
    parts = np.array_split(values, tensors)
    data = safetensors.numpy.save({f"w{i:04d}": part for i, part in enumerate(parts)},
                                  metadata=bundle_metadata(manifest, {}))  # fmt: skip
    messages = [pb.HandBackRequest(data=data[i : i + chunk]).SerializeToString()
                for i in range(0, len(data), chunk)]  # fmt: skip
    deserializer: Any = pb.HandBackRequest.FromString
    chunks_first = getattr(servicer, "_chunks_first", None)  # absent before zero-copy chunks
    if chunks_first is not None:
        deserializer = chunks_first(deserializer)
    parse = servicer._safe(deserializer)
    best = {"deserialize": float("inf"), "deserialize_hash_check": float("inf"),
            "value_check": float("inf")}  # fmt: skip
    chunks = [parse(message).data for message in messages]
    for _ in range(repeat):
        for what in best:
            stream = BundleStream()
            if what == "value_check":
                stream.hasher = _NoHash()  # type: ignore[assignment]
                started = time.thread_time()
                for chunk_data in chunks:
                    stream.feed(chunk_data)
                best[what] = min(best[what], time.thread_time() - started)
                assert stream.value_error is None
                continue
            started = time.thread_time()
            for message in messages:
                chunk_data = parse(message).data
                if what == "deserialize_hash_check":
                    stream.feed(chunk_data)
            best[what] = min(best[what], time.thread_time() - started)
            assert what == "deserialize" or stream.position == len(data)
    figures = {k: round(v, 4) for k, v in best.items()}
    figures.update(_wire_cpu(data, chunk, repeat))
    return figures


def _wire_cpu(data: bytes, chunk: int, repeat: int) -> dict[str, float]:
    """Best-of-`repeat` thread CPU seconds of the other per-chunk work on the wire, as this
    checkout does it: the site serializing its upload chunks, the coordinator serializing its
    download chunks, the site reading them back. Hand-framed (`protocols.chunk_wire`) where the
    checkout has it, else one protobuf message per chunk (the generated stubs' serializers)."""
    from protocols.v1 import baton_pb2 as pb

    try:
        from protocols import chunk_wire
    except ImportError:
        chunk_wire = None  # type: ignore[assignment]
    view = memoryview(data)
    parts = [bytes(view[i : i + chunk]) for i in range(0, len(data), chunk)]
    wire = [pb.Chunk(data=p, offset=i * chunk, total_size=len(data)).SerializeToString()
            for i, p in enumerate(parts)]  # fmt: skip

    def site_serialize() -> None:
        for start in range(0, len(data), chunk):
            if chunk_wire is not None:
                chunk_wire.hand_back_chunk(view[start : start + chunk])
            else:
                pb.HandBackRequest(data=bytes(view[start : start + chunk])).SerializeToString()

    def coordinator_download_serialize() -> None:
        for i, part in enumerate(parts):
            if chunk_wire is not None:
                chunk_wire.download_chunk(part, i * chunk, len(data))
            else:
                pb.Chunk(data=part, offset=i * chunk, total_size=len(data)).SerializeToString()

    def site_download_parse() -> None:
        buffer = bytearray()
        for message in wire:
            if chunk_wire is not None:
                buffer.extend(chunk_wire.read_download_chunk(message)[0])
            else:
                buffer.extend(pb.Chunk.FromString(message).data)
        assert len(buffer) == len(data)

    out = {}
    for name, work in [("site_serialize", site_serialize),
                       ("coordinator_download_serialize", coordinator_download_serialize),
                       ("site_download_parse", site_download_parse)]:  # fmt: skip
        seconds = float("inf")
        for _ in range(repeat):
            started = time.thread_time()
            work()
            seconds = min(seconds, time.thread_time() - started)
        out[name] = round(seconds, 4)
    return out


def _child(
    root: Path, size_mib: int, chunk: int, repeat: int, tensors: int, dtype: str
) -> dict[str, Any]:
    env = {**os.environ, **_MALLOC, "PYTHONPATH": str(root.resolve())}
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(size_mib), str(chunk), str(repeat),
         str(tensors), dtype],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return {"root": str(root), "commit": commit or "(not a git checkout)",
            **json.loads(out.stdout)}  # fmt: skip


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        size, chunk, repeat, tensors = (int(x) for x in sys.argv[2:6])
        print(json.dumps(measure(size, chunk, repeat, tensors, sys.argv[6])))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, action="append",
                        help="checkout to import (repeatable; default: this one)")  # fmt: skip
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tensors", type=int, default=1, help="tensors the values are split in")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--rounds", type=int, default=2, help="roots measured in turn, N times")
    parser.add_argument("--name", default="transfer_chunk_cpu")
    args = parser.parse_args()
    roots = args.root or [Path(__file__).resolve().parent.parent]
    uptime = _uptime()
    rows = []
    for _ in range(args.rounds):
        for root in roots:
            row = _child(root, args.size_mib, args.chunk_kib * 1024, args.repeat, args.tensors,
                         args.dtype)  # fmt: skip
            row["uptime"] = subprocess.run(
                ["uptime"], capture_output=True, text=True
            ).stdout.strip()
            rows.append(row)
            print(json.dumps(row), flush=True)
    figures = {"size_mib": args.size_mib, "chunk_kib": args.chunk_kib, "repeat": args.repeat,
               "tensors": args.tensors, "dtype": args.dtype, "malloc": _MALLOC,
               "uptime_before": uptime, "rows": rows}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        "# Coordinator CPU per chunk of an upload (in process)",
        "",
        f"Command: `python benchmarks/transfer_chunk_cpu.py {' '.join(sys.argv[1:])}`",
        "",
        f"A {args.size_mib} MiB {args.dtype} bundle ({args.tensors} tensors end to end) in "
        f"{args.chunk_kib} KiB HandBackRequest chunks; "
        f"thread CPU seconds, best of {args.repeat}; MALLOC_ARENA_MAX=2, "
        "MALLOC_MMAP_THRESHOLD_=131072 (as deployed). Load before: "
        f"`{uptime}`.",
        "",
        "Also per 100 MiB: the site serializing its upload chunks, the coordinator serializing "
        "its download chunks and the site reading them (hand-framed where the code has "
        "`protocols.chunk_wire`, else a protobuf message per chunk).",
        "",
        "| code | deserialize s | deserialize + sha256 + value check s | value check s "
        "| site upload serialize s | coordinator download serialize s "
        "| site download parse s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        load = row["uptime"].split("load average:")[-1].strip()
        lines.append(f"| {row['root']} ({row['commit']}) | {row['deserialize']} "
                     f"| {row['deserialize_hash_check']} | {row['value_check']} "
                     f"| {row['site_serialize']} "
                     f"| {row['coordinator_download_serialize']} "
                     f"| {row['site_download_parse']} | {load} |")  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
