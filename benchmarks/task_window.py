"""The first 300 KB message on a fresh server stream: how long it takes to reach a sync client.

A probe of a site's task stream (issue 15): an asyncio gRPC server with the coordinator's
options streams 4 messages of ``--kib`` KiB, ``--gap`` s apart, to a sync client with the site's
options, on a fresh channel per trial (insecure: flow control is the same under TLS). Per
message position: the time from the server's send to the client's read (one clock: both in this
process). ``--window off`` leaves the client's ``grpc.http2.lookahead_bytes`` out (main before
cold25), ``on`` sets it to ``--window-bytes``.

    nice -n 19 .venv/bin/python benchmarks/task_window.py --window off
    nice -n 19 .venv/bin/python benchmarks/task_window.py --window on
"""

from __future__ import annotations

import argparse
import asyncio
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

from protocols import transport

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
    parser.add_argument("--window", choices=("on", "off"), default="on")
    parser.add_argument("--window-bytes", type=int, default=transport.MAX_MESSAGE_BYTES)
    parser.add_argument("--kib", type=int, default=293)
    parser.add_argument("--gap", type=float, default=0.15)
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    ready, port = threading.Event(), list[int]()
    threading.Thread(target=_serve, args=(ready, port, args.kib, args.gap), daemon=True).start()
    ready.wait()
    options: list[tuple[str, Any]] = [
        o for o in transport._CLIENT_OPTIONS if o[0] != "grpc.http2.lookahead_bytes"
    ]
    if args.window == "on":
        options.append(("grpc.http2.lookahead_bytes", args.window_bytes))
    arrivals: list[list[float]] = [[] for _ in range(MESSAGES)]
    for _ in range(args.trials):
        channel = grpc.insecure_channel(f"127.0.0.1:{port[0]}", options=options)
        for i, message in enumerate(channel.unary_stream("/t/S")(b"")):
            sent = int.from_bytes(message[:8], "little")
            arrivals[i].append((time.perf_counter_ns() - sent) / 1e6)
        channel.close()
    for i, times in enumerate(arrivals):
        print(f"window {args.window}: message {i + 1} median {statistics.median(times):.2f} ms, "
              f"each {[round(t, 2) for t in times]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
