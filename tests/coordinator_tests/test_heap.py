"""Free heap pages go back to the kernel once large bundle transfers have ended (glibc), never
while one is moving; other C libraries are left alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from coordinator import heap
from coordinator.heap import TransferTrim
from coordinator.servicer import FramedChunk, MalformedMessageGuard
from protocols.v1 import baton_pb2 as pb

WAIT = 30  # seconds: generous, only reached when something is wrong
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _glibc_thresholds_as_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """`TransferTrim`s built here leave the test process's malloc thresholds alone (they are
    raised only under a deployed MALLOC_MMAP_THRESHOLD_; the tests below that mean it say so)."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)


_FRAGMENTED_HEAP = textwrap.dedent(
    """
    import importlib.util, sys
    # heap.py alone, without the coordinator package's imports (a second of start-up)
    spec = importlib.util.spec_from_file_location("heap", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    release_free_memory = module.release_free_memory

    def rss_anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024

    # 80 MiB in 4 KiB blocks (below glibc's mmap threshold: in the heap), the last one kept, so
    # the heap's top cannot shrink on its own once the others are freed: as gRPC's buffers do.
    blocks = [bytes(4000) for _ in range(20_000)]
    last = blocks[-1]
    del blocks
    before = rss_anon_mib()
    released = release_free_memory()
    print(released, before, rss_anon_mib())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_kernel() -> None:
    command = [sys.executable, "-c", _FRAGMENTED_HEAP, str(heap.__file__)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    released, before, after = out.stdout.split()
    assert released == "True"
    assert int(before) - int(after) >= 40, (before, after)  # of the 80 MiB freed


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_where_there_is_no_malloc_trim_nothing_is_done(
    monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    monkeypatch.setattr(heap.sys, "platform", platform)
    monkeypatch.setattr(heap, "_TRIM", heap._malloc_trim())
    assert heap._TRIM is None
    assert heap.release_free_memory() is False


def test_a_c_library_without_malloc_trim_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class Musl:
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)  # musl has no malloc_trim

    monkeypatch.setattr(heap.sys, "platform", "linux")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *_: Musl())
    assert heap._malloc_trim() is None


class _Trims:
    def __init__(self) -> None:
        self.count = 0
        self.done = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.done.set()


def test_free_memory_is_released_once_the_last_large_transfer_ends() -> None:
    trims = _Trims()

    async def scenario() -> None:
        trim = TransferTrim(min_bytes=8 * MiB, quiet_seconds=0, trim=trims)
        trim.started()
        trim.started()  # two transfers at once
        trim.ended(20 * MiB)
        assert not trim.scheduled  # one is still moving
        trim.ended(1 * MiB)
        assert trim.scheduled
        await asyncio.to_thread(trims.done.wait, WAIT)
        assert trim.moved == 0

    asyncio.run(scenario())
    assert trims.count == 1


def test_small_transfers_release_nothing_until_they_add_up() -> None:
    trims = _Trims()

    async def scenario() -> None:
        trim = TransferTrim(min_bytes=8 * MiB, quiet_seconds=0, trim=trims)
        for _ in range(7):
            trim.started()
            trim.ended(1 * MiB)
            assert not trim.scheduled
        trim.started()
        trim.ended(1 * MiB)
        assert trim.scheduled
        await asyncio.to_thread(trims.done.wait, WAIT)

    asyncio.run(scenario())
    assert trims.count == 1


def test_a_transfer_starting_in_the_quiet_period_puts_the_release_off() -> None:
    trims = _Trims()

    async def scenario() -> None:
        trim = TransferTrim(min_bytes=1, quiet_seconds=3600, trim=trims)
        trim.started()
        trim.ended(MiB)
        assert trim.scheduled
        trim.started()  # bytes move again
        assert not trim.scheduled
        trim.quiet_seconds = 0
        trim.ended(MiB)
        await asyncio.to_thread(trims.done.wait, WAIT)
        assert trim.moved == 0

    asyncio.run(scenario())
    assert trims.count == 1


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def started(self) -> None:
        self.events.append(("started", 0))

    def ended(self, moved: int) -> None:
        self.events.append(("ended", moved))


async def _intercepted(method: str, handler: grpc.RpcMethodHandler, recorder: _Recorder) -> Any:
    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return handler

    guard = MalformedMessageGuard(ledger=None, transfers=recorder)  # type: ignore[arg-type]
    return await guard.intercept_service(continuation, SimpleNamespace(method=method))


def test_an_upload_call_reports_its_start_and_the_bytes_it_moved() -> None:
    recorder = _Recorder()

    async def consume(requests: AsyncIterator[Any], context: Any) -> pb.HopResultResponse:
        assert recorder.events == [("started", 0)]  # reported before the bytes move
        async for _ in requests:
            pass
        return pb.HopResultResponse(hop_status="committed")

    async def scenario() -> None:
        inner = grpc.stream_unary_rpc_method_handler(
            consume, request_deserializer=pb.HandBackRequest.FromString
        )
        handler = await _intercepted("/baton.v1.SiteService/HandBackHop", inner, recorder)
        messages = [pb.HandBackRequest(header=pb.UploadHeader(hop_id="h")),
                    pb.HandBackRequest(data=b"a" * 3000), pb.HandBackRequest(data=b"b" * 500),
                    pb.HandBackRequest(result=pb.HopResult(hop_id="h"))]  # fmt: skip

        async def requests() -> AsyncIterator[Any]:
            for message in messages:
                yield handler.request_deserializer(message.SerializeToString())

        await handler.stream_unary(requests(), None)

    asyncio.run(scenario())
    assert recorder.events == [("started", 0), ("ended", 3500)]


def test_a_download_call_reports_the_bytes_it_sent_also_when_cut() -> None:
    recorder = _Recorder()

    async def frames(request: Any, context: Any) -> AsyncIterator[FramedChunk]:
        for size in (1000, 1000, 24):
            yield FramedChunk(bytes(size))

    async def scenario() -> None:
        inner = grpc.unary_stream_rpc_method_handler(
            frames, request_deserializer=pb.DownloadRequest.FromString
        )
        handler = await _intercepted("/baton.v1.SiteService/DownloadCheckpoint", inner, recorder)
        stream = handler.unary_stream(pb.DownloadRequest(sha256="s"), None)
        assert [len(item.wire) async for item in stream] == [1000, 1000, 24]
        cut = handler.unary_stream(pb.DownloadRequest(sha256="s"), None)
        await anext(cut)
        await cut.aclose()  # the client went away after one chunk

    asyncio.run(scenario())
    assert recorder.events == [("started", 0), ("ended", 2024), ("started", 0), ("ended", 1000)]


def test_other_calls_are_not_transfers() -> None:
    recorder = _Recorder()

    async def beat(request: Any, context: Any) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse()

    async def scenario() -> None:
        inner = grpc.unary_unary_rpc_method_handler(
            beat, request_deserializer=pb.Heartbeat.FromString
        )
        handler = await _intercepted("/baton.v1.SiteService/SendHeartbeat", inner, recorder)
        await handler.unary_unary(pb.Heartbeat(), None)

    asyncio.run(scenario())
    assert recorder.events == []


def test_by_default_the_heap_is_released_after_5_quiet_seconds_not_within_a_burst() -> None:
    async def scenario() -> float:
        trim = TransferTrim(trim=_Trims())
        trim.started()
        trim.ended(100 * MiB)
        assert trim._timer is not None
        wait = trim._timer.when() - asyncio.get_running_loop().time()
        trim.started()  # the next site's download of it, within the 5 s: no release yet
        assert not trim.scheduled
        return wait

    assert 4 < asyncio.run(scenario()) <= heap.QUIET_SECONDS == 5


_CHUNK_FAULTS = textwrap.dedent(
    """
    import importlib.util, resource, sys
    spec = importlib.util.spec_from_file_location("heap", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def faults_per_chunk():
        # 1 MiB messages received and freed one after the other, as an upload's chunks are
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(40):
            chunk = b"x" * (1024 * 1024)
            del chunk
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 40

    thresholds = module.MallocThresholds()
    deployed = faults_per_chunk()
    thresholds.widen()
    widened = faults_per_chunk()
    thresholds.restore()
    print(thresholds.applies, deployed, widened, faults_per_chunk())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_while_bundles_move_chunk_messages_reuse_heap_memory_instead_of_fresh_mmaps() -> None:
    command = [sys.executable, "-c", _CHUNK_FAULTS, str(heap.__file__)]
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120, env=env)
    applies, deployed, widened, restored = out.stdout.split()
    assert applies == "True"
    assert int(deployed) >= 200, out.stdout  # 256 pages of 4 KiB, faulted in per chunk
    assert int(widened) <= 16, out.stdout  # the same heap memory, chunk after chunk
    assert int(restored) >= 200, out.stdout  # the deployed threshold is back


class _Mallopt:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_the_deployed_thresholds_come_back_with_the_release_after_the_transfers() -> None:
    mallopt, trims = _Mallopt(), _Trims()
    environ = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    thresholds = heap.MallocThresholds(environ, mallopt)
    mmap, trim = heap._M_MMAP_THRESHOLD, heap._M_TRIM_THRESHOLD

    async def scenario() -> None:
        transfers = TransferTrim(min_bytes=8 * MiB, quiet_seconds=0, trim=trims,
                                 thresholds=thresholds)  # fmt: skip
        transfers.started()
        transfers.started()
        assert mallopt.calls == [(trim, 4 * MiB), (mmap, 4 * MiB)]  # once, at the first
        transfers.ended(1 * MiB)
        assert not transfers.scheduled  # one is still moving
        transfers.ended(1 * MiB)  # under min_bytes: nothing to trim, the thresholds go back
        assert transfers.scheduled
        while thresholds.widened:
            await asyncio.sleep(0.01)
        assert mallopt.calls[2:] == [(mmap, 131072), (trim, 128 * 1024)]
        transfers.started()
        transfers.ended(20 * MiB)
        await asyncio.to_thread(trims.done.wait, WAIT)
        assert not thresholds.widened

    asyncio.run(scenario())
    assert trims.count == 1
    assert len(mallopt.calls) == 8


@pytest.mark.parametrize("environ", [{}, {"MALLOC_MMAP_THRESHOLD_": str(8 * MiB)},
                                     {"MALLOC_MMAP_THRESHOLD_": "lots"}])  # fmt: skip
def test_without_a_small_deployed_mmap_threshold_the_thresholds_are_left_alone(
    environ: dict[str, str],
) -> None:
    mallopt = _Mallopt()
    thresholds = heap.MallocThresholds(environ, mallopt)
    thresholds.widen()
    thresholds.restore()
    assert not thresholds.applies
    assert mallopt.calls == []
