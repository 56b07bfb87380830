"""One thread for the engine's ledger writes: the event loop serves calls while one commits.

Transactions run one at a time in the order they were handed over (the engine's lock already
orders its state transitions; this keeps the durable commit, an fsync, off the event loop).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["LedgerWriter"]

P = ParamSpec("P")
T = TypeVar("T")


class LedgerWriter:
    """Runs ledger writes on a single worker thread, first come first served."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop that awaits the writes

    async def run(self, write: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs `write(*args, **kwargs)` on the writer thread; returns (or raises) its outcome."""
        return await self.submit(write, *args, **kwargs)

    def submit(self, write: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Hands `write(*args, **kwargs)` to the writer thread now, before the caller's next
        await (so the caller can work on the loop while it commits); its outcome's future."""
        loop = self.loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, functools.partial(write, *args, **kwargs))

    def close(self) -> None:
        """Waits for the writes handed over so far, then stops the thread."""
        self._executor.shutdown(wait=True)
