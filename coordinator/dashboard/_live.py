"""Server-sent events for live views: a page fragment re-sent whenever it changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from coordinator.dashboard._deps import DashboardState

__all__ = ["live_fragment"]


def live_fragment(
    request: Request,
    state: DashboardState,
    fragment: Callable[[], str],
    done: Callable[[], bool] = lambda: False,
) -> EventSourceResponse:
    """Streams `fragment()` as "update" events when it changes, until `done()` or a timeout.

    The fragment is rendered in a worker thread: ledger reads never block the event loop that
    also serves the sites' gRPC calls.
    """

    async def events() -> AsyncIterator[ServerSentEvent]:
        last = None
        ends = time.monotonic() + state.stream_seconds
        while True:
            html = await run_in_threadpool(fragment)
            if html != last:
                last = html
                yield ServerSentEvent(data=html, event="update")
            finished = await run_in_threadpool(done)
            if finished or time.monotonic() >= ends or await request.is_disconnected():
                yield ServerSentEvent(data="", event="end" if finished else "reconnect")
                return
            await asyncio.sleep(state.stream_interval)

    return EventSourceResponse(events(), ping=15)
