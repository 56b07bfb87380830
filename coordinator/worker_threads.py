"""Blocking file-system work on worker threads that a cancelled caller never detaches from.

asyncio cancels the future of a worker-thread call when the awaiting task is cancelled (a client
disconnects, a deadline passes), but the thread runs on: a descriptor closed in the caller's
`finally` could then be reused by another file while the thread still writes to it. These
helpers wait for the thread's end, then let the cancellation through.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["run_to_end", "run_whole", "settle"]

T = TypeVar("T")


async def settle(*futures: asyncio.Future[T] | None) -> None:
    """Waits until every worker-thread future has ended, even if cancelled meanwhile (the
    cancellation is raised once they have). Their errors are retrieved, not raised."""
    pending = [f for f in futures if f is not None]
    cancelled = False
    while not all(f.done() for f in pending):
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    for future in pending:
        if not future.cancelled():
            future.exception()  # retrieved: the first error is already on its way up
    if cancelled:
        raise asyncio.CancelledError


async def run_to_end(
    func: Callable[..., T], *args: object, undo: Callable[[T], object] | None = None
) -> T:
    """`func(*args)` on a worker thread; a cancelled caller waits for its end before the
    cancellation goes on, and `undo` is then applied to its result (e.g. closing a descriptor
    it opened)."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        try:
            await settle(future)  # raises the cancellation again if it came back meanwhile
        finally:
            if undo is not None and not future.cancelled() and future.exception() is None:
                undo(future.result())
        raise


async def run_whole(work: Coroutine[Any, Any, T]) -> T:
    """Runs `work` to its end even if the caller is cancelled meanwhile (the cancellation is
    raised once it has): for steps that must not stop half done."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await settle(task)
        raise
