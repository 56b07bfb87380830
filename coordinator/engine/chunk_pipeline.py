"""An upload's chunks handed, in order, to work that runs on its own threads (spool write, hash
and value check) while the event loop receives the next ones.

Each stage has one thread and a queue for the whole upload: the event loop only enqueues a chunk
and goes back to receiving (no worker-thread call and no wake-up of the loop per chunk), and
waits only when `max_chunks` chunks are still in flight, which bounds the memory an upload holds.
Dedicated threads, not the loop's default executor: a slow client holds its upload's threads for
as long as it streams, and must not starve the executor everyone else's file and ledger work uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence

from coordinator.worker_threads import settle

__all__ = ["ChunkPipeline"]

Chunk = bytes | memoryview
_END = None  # the queue's last item


class ChunkPipeline:
    """Runs every stage on every chunk, in the order `put` received them; each stage on one thread.

    Use as `async with ChunkPipeline(stages) as pipeline: await pipeline.put(chunk) ...; await
    pipeline.finish()`. Leaving the block any other way (an error, a cancellation) stops the
    stages after the chunk each is on and waits for their threads to end: nothing a stage uses
    (a file descriptor) may be closed under it. A stage's first error is raised by the next
    `put` or by `finish`; that stage then takes no more chunks.
    """

    def __init__(self, stages: Sequence[Callable[[Chunk], object]], *, max_chunks: int = 2) -> None:
        if max_chunks < 1:
            raise ValueError("max_chunks must be at least 1")
        self._stages = list(stages)
        self._max_chunks = max_chunks
        self._queues: list[queue.SimpleQueue[Chunk | None]] = [queue.SimpleQueue() for _ in stages]
        self._done = [0] * len(self._stages)  # chunks each stage is through with
        self._put = 0
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._stopping = False  # set when the block is left early: stages skip what is queued
        self._closed = False  # the end was enqueued
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: list[asyncio.Future[None]] = []

    async def __aenter__(self) -> ChunkPipeline:
        self._loop = asyncio.get_running_loop()
        for index in range(len(self._stages)):
            ended = self._loop.create_future()
            self._ended.append(ended)
            thread = threading.Thread(
                target=self._run, args=(index, ended), name=f"upload-stage-{index}", daemon=True
            )
            try:
                thread.start()
            except BaseException:
                self._ended.pop()
                raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            self._stopping = True
        self._close()
        await settle(*self._ended)  # waits for every thread, even if cancelled meanwhile

    def _in_flight(self) -> int:
        return self._put - min(self._done)

    async def put(self, chunk: Chunk) -> None:
        """Hands `chunk` to every stage; waits first while `max_chunks` are in flight."""
        while True:
            if self.error is not None:
                raise self.error
            with self._lock:
                if self._in_flight() < self._max_chunks:
                    break
                assert self._loop is not None
                waiter = self._waiter = self._loop.create_future()
            await waiter
        self._put += 1
        for stage_queue in self._queues:
            stage_queue.put(chunk)

    async def finish(self) -> None:
        """Waits until every stage has taken every chunk; raises a stage's first error."""
        self._close()
        for ended in self._ended:
            await asyncio.shield(ended)
        if self.error is not None:
            raise self.error

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            for stage_queue in self._queues:
                stage_queue.put(_END)

    def _run(self, index: int, ended: asyncio.Future[None]) -> None:
        stage = self._stages[index]
        stage_queue = self._queues[index]
        failed = False
        try:
            while (chunk := stage_queue.get()) is not _END:
                if not failed and not self._stopping:
                    try:
                        stage(chunk)
                    except BaseException as exc:
                        failed = True
                        with self._lock:
                            if self.error is None:
                                self.error = exc
                del chunk  # not held while the queue waits
                with self._lock:
                    self._done[index] += 1
                    waiter = self._waiter
                    if waiter is not None and (failed or self._in_flight() < self._max_chunks):
                        self._waiter = None
                        self._wake(waiter)
        finally:
            with self._lock:
                waiter, self._waiter = self._waiter, None
            if waiter is not None:
                self._wake(waiter)
            self._wake(ended)

    def _wake(self, future: asyncio.Future[None]) -> None:
        assert self._loop is not None

        def resolve() -> None:
            if not future.done():
                future.set_result(None)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self._loop.call_soon_threadsafe(resolve)
