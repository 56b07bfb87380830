"""The first 300 KB message on a fresh server stream: how long it takes to reach a sync client.

A probe of a site's task stream (issue 15): an asyncio gRPC server with the coordinator's
options streams 4 messages of ``--kib`` KiB, ``--gap`` s apart, to a sync client with the site's
options, on a fresh channel per trial (insecure: flow control is the same under TLS). Per
message position: the time from the server's send to the client's read (one clock: both in this
process). Trials alternate between two clients: ``off``, the site's options as they are (the
stream window gRPC estimates from bandwidth probes), and ``on``, the same with
``grpc.http2.lookahead_bytes`` set to ``--window-bytes`` (a whole task message). Session 25 tried
``on`` in the site's channel (cold25) and dropped it: the first message was not faster. Writes
JSON + Markdown under benchmarks/results/.

    nice -n 19 .venv/bin/python benchmarks/task_window.py --trials 16 --name task-window
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import report_head
from protocols import transport

RESULTS = Path(__file__).resolve().parent / "results"

MESSAGES = 4


def _serve(ready: threading.Event, port: list[int], kib: int, gap: float) -> None:
    async def stream(_request: bytes, _context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(MESSAGES):
            await asyncio.sleep(gap)
            payload = bytearray(kib * 1024)
            payload[:8] = time.perf_counter_ns().to_bytes(8, "little")
            yield bytes(payload)

    async def main() -> None:
        server = grpc.aio.server(options=transport._SERVER_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "t", {"S": grpc.unary_stream_rpc_method_handler(stream)}
        )
        server.add_generic_rpc_handlers((handler,))
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.new_event_loop().run_until_complete(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window-bytes", type=int, default=transport.MAX_MESSAGE_BYTES)
    parser.add_argument("--kib", type=int, default=293)
    parser.add_argument("--gap", type=float, default=0.15)
    parser.add_argument("--trials", type=int, default=8, help="per window")
    parser.add_argument("--name", default="task-window")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    ready, port = threading.Event(), list[int]()
    threading.Thread(target=_serve, args=(ready, port, args.kib, args.gap), daemon=True).start()
    ready.wait()
    site = [o for o in transport._CLIENT_OPTIONS if o[0] != "grpc.http2.lookahead_bytes"]
    windows: dict[str, list[tuple[str, Any]]] = {
        "off": site,
        "on": [*site, ("grpc.http2.lookahead_bytes", args.window_bytes)],
    }
    arrivals = {window: [list[float]() for _ in range(MESSAGES)] for window in windows}
    for _ in range(args.trials):
        for window, options in windows.items():
            channel = grpc.insecure_channel(f"127.0.0.1:{port[0]}", options=options)
            for i, message in enumerate(channel.unary_stream("/t/S")(b"")):
                sent = int.from_bytes(message[:8], "little")
                arrivals[window][i].append((time.perf_counter_ns() - sent) / 1e6)
            channel.close()
    medians = {w: [round(statistics.median(t), 3) for t in a] for w, a in arrivals.items()}
    report = {
        **report_head(None, f"grpcio {grpc.__version__}"),
        "kib": args.kib,
        "window_bytes": args.window_bytes,
        "trials": args.trials,
        "median_ms": medians,
        "arrivals_ms": {w: [[round(x, 3) for x in t] for t in a] for w, a in arrivals.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# {args.name}: a {args.kib} KiB message on a fresh stream, send to read",
        "",
        f"`{report['command']}` ({report['generated']}; {report['machine']}). Median of "
        f"{args.trials} trials per window, ms; `on` adds a {args.window_bytes} B stream window "
        "to the site's channel options.",
        "",
        "| window | " + " | ".join(f"message {i + 1}" for i in range(MESSAGES)) + " |",
        "|---|" + "---:|" * MESSAGES,
        *(f"| {w} | " + " | ".join(f"{m:.2f}" for m in ms) + " |" for w, ms in medians.items()),
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
