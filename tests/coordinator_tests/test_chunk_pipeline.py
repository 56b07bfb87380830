"""An upload's chunks go to its stages (spool write, hash and value check) in order, each stage on
its own thread, with a bounded number in flight; a stage's error or an early exit stops them."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from coordinator.engine.chunk_pipeline import Chunk, ChunkPipeline

WAIT = 30  # seconds: generous, only reached when something is wrong


def _run(scenario: object) -> None:
    asyncio.run(scenario)  # type: ignore[arg-type]


def test_every_stage_takes_every_chunk_in_order_on_its_own_thread() -> None:
    seen: dict[str, list[bytes]] = {"write": [], "check": []}
    threads: dict[str, set[int]] = {"write": set(), "check": set()}

    def stage(name: str) -> object:
        def take(chunk: Chunk) -> None:
            seen[name].append(bytes(chunk))
            threads[name].add(threading.get_ident())

        return take

    chunks = [i.to_bytes(2, "big") * 3 for i in range(200)]

    async def scenario() -> int:
        async with ChunkPipeline([stage("write"), stage("check")]) as pipeline:
            for chunk in chunks:
                await pipeline.put(memoryview(chunk))
            await pipeline.finish()
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert seen["write"] == chunks and seen["check"] == chunks
    assert len(threads["write"]) == len(threads["check"]) == 1
    assert threads["write"] != threads["check"]
    assert loop_thread not in threads["write"] | threads["check"]


def test_no_more_than_max_chunks_are_in_flight() -> None:
    release = threading.Event()
    taken: list[bytes] = []

    def slow(chunk: Chunk) -> None:
        release.wait(WAIT)
        taken.append(bytes(chunk))

    async def scenario() -> None:
        async with ChunkPipeline([slow], max_chunks=2) as pipeline:
            await pipeline.put(b"1")
            await pipeline.put(b"2")  # two in flight: the stage holds the first
            third = asyncio.create_task(pipeline.put(b"3"))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not third.done()  # waits: the stage is still on chunk 1
            release.set()
            await asyncio.wait_for(third, WAIT)
            await pipeline.finish()

    _run(scenario())
    assert taken == [b"1", b"2", b"3"]


def test_a_stage_error_is_raised_and_that_stage_takes_no_more_chunks() -> None:
    written: list[bytes] = []
    checked: list[bytes] = []
    failed = threading.Event()

    def write(chunk: Chunk) -> None:
        if bytes(chunk) == b"2":
            failed.set()
            raise OSError(28, "No space left on device")
        written.append(bytes(chunk))

    async def scenario() -> None:
        async with ChunkPipeline([write, lambda c: checked.append(bytes(c))]) as pipeline:
            await pipeline.put(b"1")
            await pipeline.put(b"2")
            await asyncio.to_thread(failed.wait, WAIT)
            with pytest.raises(OSError, match="No space left"):
                for _ in range(1000):  # raised by the next put once the stage has failed
                    await pipeline.put(b"3")
                    await asyncio.sleep(0.001)
            with pytest.raises(OSError, match="No space left"):
                await pipeline.finish()

    _run(scenario())
    assert written == [b"1"]
    assert checked[:2] == [b"1", b"2"]


def test_leaving_early_waits_for_the_chunk_in_hand_and_skips_the_queued_ones() -> None:
    holding = threading.Event()
    release = threading.Event()
    taken: list[bytes] = []

    def slow(chunk: Chunk) -> None:
        holding.set()
        release.wait(WAIT)
        taken.append(bytes(chunk))

    async def scenario() -> None:
        pipeline = ChunkPipeline([slow], max_chunks=4)

        async def upload() -> None:
            async with pipeline:
                await pipeline.put(b"in hand")
                await pipeline.put(b"queued")
                await asyncio.to_thread(holding.wait, WAIT)
                raise ValueError("cut")  # the stream was cut: the block waits for the stage

        task = asyncio.create_task(upload())
        deadline = asyncio.get_running_loop().time() + WAIT
        while not pipeline._stopping and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)  # until the block is being left
        await asyncio.sleep(0)
        assert not task.done()  # it waits for the chunk in hand
        release.set()
        with pytest.raises(ValueError, match="cut"):
            await asyncio.wait_for(task, WAIT)
        assert taken == [b"in hand"]  # done before the block was left, the queued one skipped

    _run(scenario())


def test_a_stalled_upload_leaves_the_default_executor_free() -> None:
    """A client that stops sending mid-upload holds its upload's threads, not the executor's
    workers that every other upload's and the ledger's file work needs."""
    release = threading.Event()

    def stalled(chunk: Chunk) -> None:
        release.wait(WAIT)

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
        try:
            async with ChunkPipeline([stalled, stalled]) as pipeline:
                await pipeline.put(b"x")
                assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), WAIT) == 42
                await pipeline.put(b"y")
                assert await asyncio.wait_for(asyncio.to_thread(lambda: 43), WAIT) == 43
                release.set()
                await pipeline.finish()
        finally:
            release.set()

    _run(scenario())
