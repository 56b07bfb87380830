"""One thread for the admin calls' ledger reads: off the event loop, apart from the writer.

A finished run, the list of every run, the sites: read here, so a site's heartbeat or hand
back is not kept waiting on the loop, and a hop's commit (the writer's thread) never queues
behind a long read. SQLite's WAL and PostgreSQL both let this read while the writer writes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["LedgerReader"]

P = ParamSpec("P")
T = TypeVar("T")


class LedgerReader:
    """Runs ledger reads on a single worker thread, first come first served."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-reader")

    async def run(self, read: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs `read(*args, **kwargs)` on the reader thread; returns (or raises) its outcome."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(read, *args, **kwargs))

    def close(self) -> None:
        """Waits for the reads handed over so far, then stops the thread."""
        self._executor.shutdown(wait=True)
