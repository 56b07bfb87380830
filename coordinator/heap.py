"""Gives the C heap's free pages back to the kernel once large transfers have ended.

gRPC takes a bundle in through many buffers smaller than glibc's mmap threshold; once freed they
stay in the heap, so each 10-100 MiB transfer used to leave the coordinator's RSS 5-20 MiB higher
(benchmarks/transfer.py: 122 MiB idle, 141 MiB before the 100 MiB transfers, the same after
malloc_trim as before them: retained, not leaked). glibc's `malloc_trim` returns them; on other
C libraries (musl, macOS, Windows) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
from collections.abc import Callable

__all__ = ["TransferTrim", "release_free_memory"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
# How long no transfer may start before the heap is released (see `TransferTrim`).
QUIET_SECONDS = 5.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim(pad), or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # musl and other C libraries: no malloc_trim
        return None
    call.argtypes = (ctypes.c_size_t,)
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Returns the heap's free pages to the kernel (glibc). False where it cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class TransferTrim:
    """Releases free heap memory once transfers that moved at least `min_bytes` have ended.

    Transfers report their start and end (`started`, `ended`). When the last one in flight ends
    and `min_bytes` or more moved since the last release, `trim` runs on a worker thread after
    `quiet_seconds` in which no transfer started: it never starts while bytes are moving (it
    holds the allocator's lock while it walks the heap, a few ms; a transfer starting during a
    release waits that long for its first allocations), and once for a burst of transfers (a
    hand back and the next site's download of it; a round's uploads). The pages it returns are
    faulted in
    again by the next large transfer (about 6,000 minor faults, a few ms, per 100 MiB upload):
    worth it once the coordinator goes quiet, not between the transfers of a burst.
    """

    def __init__(
        self,
        *,
        min_bytes: int = 8 * MiB,
        quiet_seconds: float | None = None,
        trim: Callable[[], object] | None = None,
    ) -> None:
        self.min_bytes = min_bytes
        self.quiet_seconds = quiet_seconds  # None: QUIET_SECONDS
        self._trim = trim  # None: `release_free_memory`
        self.in_flight = 0
        self.moved = 0  # bytes moved by transfers since the last release
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[object] | None = None

    @property
    def scheduled(self) -> bool:
        """Whether a release waits for its quiet period."""
        return self._timer is not None

    def started(self) -> None:
        self.in_flight += 1
        if self._timer is not None:  # bytes move again: wait for the next quiet period
            self._timer.cancel()
            self._timer = None

    def ended(self, moved: int) -> None:
        self.in_flight -= 1
        self.moved += moved
        if self.in_flight == 0 and self.moved >= self.min_bytes and self._timer is None:
            loop = asyncio.get_running_loop()
            quiet = QUIET_SECONDS if self.quiet_seconds is None else self.quiet_seconds
            self._timer = loop.call_later(quiet, self._release)

    def _release(self) -> None:
        self._timer = None
        if self.in_flight or (self._running is not None and not self._running.done()):
            return  # a release is running already: the next transfer's end schedules another
        self.moved = 0
        trim = self._trim or release_free_memory
        self._running = asyncio.get_running_loop().run_in_executor(None, trim)
        self._running.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        logger.warning("could not release free heap memory: %s", exc)
