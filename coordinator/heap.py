"""Gives the C heap's free pages back to the kernel once large transfers have ended.

gRPC takes a bundle in through many buffers smaller than glibc's mmap threshold; once freed they
stay in the heap, so each 10-100 MiB transfer used to leave the coordinator's RSS 5-20 MiB higher
(benchmarks/transfer.py: 122 MiB idle, 141 MiB before the 100 MiB transfers, the same after
malloc_trim as before them: retained, not leaked). glibc's `malloc_trim` returns them; on other
C libraries (musl, macOS, Windows) there is nothing to call and nothing is done.

While bundles move, glibc's mmap threshold is raised above a chunk message's size (when the
deployment fixed it: `MALLOC_MMAP_THRESHOLD_`), so that each 1 MiB message reuses heap memory
instead of being a fresh mmap whose pages are faulted in, zeroed and unmapped again; the
deployed thresholds come back with the release after the transfers.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
from collections.abc import Callable, Mapping

__all__ = ["MallocThresholds", "TransferTrim", "release_free_memory"]

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

# glibc's `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's trim threshold when none is set and the mmap threshold is fixed (no dynamic one).
_GLIBC_TRIM_THRESHOLD = 128 * 1024
# While transfers move: a chunk message (1 MiB and its framing) comes from the heap, and freed
# ones stay there for the next (the release after the transfers gives them back). An arena's
# free top beyond the trim threshold still goes back at once: glibc's malloc_trim shrinks only
# the main arena's top, so a larger one would stay after the release in gRPC's threads' arena
# (64 MiB kept 3.5-7 MiB there, benchmarks/results/upcpu23.md).
TRANSFER_MMAP_THRESHOLD = 4 * MiB
TRANSFER_TRIM_THRESHOLD = 4 * MiB


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt(param, value), or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int)
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


def _env_bytes(environ: Mapping[str, str], name: str) -> int | None:
    try:
        value = int(environ.get(name, ""))
    except ValueError:
        return None
    return value if value >= 0 else None


class MallocThresholds:
    """glibc's mmap and trim thresholds, raised while bundles move (`widen`) and put back to
    the deployed ones after (`restore`).

    With `MALLOC_MMAP_THRESHOLD_=131072` (deploy/: it keeps the heap from fragmenting) every
    chunk message gRPC hands over is a fresh mmap: 256 page faults and zeroed pages to fill,
    then an munmap, per MiB received. Raised, the same heap memory serves chunk after chunk.
    Where no mmap threshold is set, glibc's own dynamic one already grows past a chunk's size
    (and a `mallopt` would turn it off for good): nothing is done then, nor without glibc.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        mallopt: Callable[[int, int], int] | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self._mmap = _env_bytes(environ, "MALLOC_MMAP_THRESHOLD_")
        trim = _env_bytes(environ, "MALLOC_TRIM_THRESHOLD_")
        self._trim = _GLIBC_TRIM_THRESHOLD if trim is None else trim
        self._mallopt = mallopt if mallopt is not None else _mallopt()
        self.widened = False

    @property
    def applies(self) -> bool:
        """Whether the deployment fixed an mmap threshold below a transfer's (and glibc's
        mallopt is there to change it)."""
        return (
            self._mallopt is not None
            and self._mmap is not None
            and self._mmap < TRANSFER_MMAP_THRESHOLD
        )

    def widen(self) -> None:
        """Raises the thresholds for the transfers about to move (once until `restore`)."""
        if self.widened or not self.applies:
            return
        assert self._mallopt is not None
        self.widened = True
        self._mallopt(_M_TRIM_THRESHOLD, max(self._trim, TRANSFER_TRIM_THRESHOLD))
        self._mallopt(_M_MMAP_THRESHOLD, TRANSFER_MMAP_THRESHOLD)

    def restore(self) -> None:
        """Puts the deployed thresholds back (before the release that frees the heap)."""
        if not self.widened:
            return
        assert self._mallopt is not None and self._mmap is not None
        self.widened = False
        self._mallopt(_M_MMAP_THRESHOLD, self._mmap)
        self._mallopt(_M_TRIM_THRESHOLD, self._trim)


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

    The malloc thresholds (`thresholds`) are raised when a transfer starts and put back by the
    release (also after transfers too small to trim for), before its trim.
    """

    def __init__(
        self,
        *,
        min_bytes: int = 8 * MiB,
        quiet_seconds: float | None = None,
        trim: Callable[[], object] | None = None,
        thresholds: MallocThresholds | None = None,
    ) -> None:
        self.min_bytes = min_bytes
        self.quiet_seconds = quiet_seconds  # None: QUIET_SECONDS
        self._trim = trim  # None: `release_free_memory`
        # Raised from the first transfer's start to the release after the last one's end.
        self.thresholds = MallocThresholds() if thresholds is None else thresholds
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
        self.thresholds.widen()
        if self._timer is not None:  # bytes move again: wait for the next quiet period
            self._timer.cancel()
            self._timer = None

    def ended(self, moved: int) -> None:
        self.in_flight -= 1
        self.moved += moved
        due = self.moved >= self.min_bytes or self.thresholds.widened
        if self.in_flight == 0 and due and self._timer is None:
            loop = asyncio.get_running_loop()
            quiet = QUIET_SECONDS if self.quiet_seconds is None else self.quiet_seconds
            self._timer = loop.call_later(quiet, self._release)

    def _release(self) -> None:
        self._timer = None
        if self.in_flight:
            return
        self.thresholds.restore()  # before the trim: what it frees is not taken again
        if self.moved < self.min_bytes or (self._running is not None and not self._running.done()):
            return  # a release is running already: the next transfer's end schedules another
        self.moved = 0
        trim = self._trim or release_free_memory
        self._running = asyncio.get_running_loop().run_in_executor(None, trim)
        self._running.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        logger.warning("could not release free heap memory: %s", exc)
