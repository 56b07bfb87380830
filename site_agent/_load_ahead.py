"""Loading ahead of a run's first visit: one thread that loads at a lower CPU priority, and is
put back at the agent's priority when the site is told it is next or given its hop. Loads run
with the cyclic garbage collector paused (`collector_paused`); a trainer's load opens torch's
core library outside the interpreter lock first (`open_torch_library`)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

__all__ = [
    "AHEAD_NICENESS",
    "LowPriorityLoader",
    "ahead_niceness",
    "collector_paused",
    "open_torch_library",
]

logger = logging.getLogger("site_agent.agent")

# How much lower than the agent's a load for a hop k hops ahead runs (a thread's nice value,
# Linux): the next site's load gets most of what the training site leaves of the cores, the
# sites further ahead the rest, in their order. Below +10: a load's thread holds the
# interpreter lock between its thread switches, and on a busy host the agent's other threads
# wait for it as long as the kernel keeps that thread waiting for a core. During a MiniLM
# trainer's load with two busy processes on two cores (torch's library opened ahead), the
# agent's main thread waited at most 0.35 s at +9 (p99 39 ms, 6 waits over 0.1 s) and 0.14 s
# at +6, but 1.9 s at +19 (p99 142 ms, 716 waits over 0.1 s): `load_ahead_waits-session33`
# (benchmarks/load_ahead_waits.py). None is a validation pass's +10 (hop_runner): a load's end
# tells the threads it left from such a pass by their nice value (an agent started at nice 10
# or more caps both at 19, and a pass that starts during a load ahead may then go back up).
AHEAD_NICENESS = (3, 6, 9)


_pause_lock = threading.Lock()
_pauses = 0  # loads running with the collector paused
_resume = False  # whether the collector was on when the first of them began


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Keeps the cyclic garbage collector off while a trainer loads: torch, transformers, peft
    and the base model are some 480,000 objects that live as long as the process, and the
    collector's passes over them while they are made find nothing (about a tenth of a first
    load's CPU, which a first hop waits for). The collector is back as it was once the last
    load running ends; the agent then freezes what loaded (`settle_heap`).
    """
    global _pauses, _resume
    with _pause_lock:
        if _pauses == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()


def open_torch_library() -> None:
    """Opens torch's core library (``libtorch_cpu.so``, Linux) before torch is imported, with
    the interpreter lock released (`_dlopen_unlocked`); the import of ``torch._C`` then finds
    it open. Its static initialisers (0.2-0.3 s of CPU, registering torch's operators) would
    otherwise run inside that import, holding the lock: on a load ahead's lowered thread on a
    busy host the hold stretches, and the agent's other threads wait it out, the one that reads
    "you are next" and would hurry the load first. With two busy processes on two cores the
    main thread waited 3.18 s in a load at +9, against at most 0.35 s in the whole load once
    the library is opened ahead (`load_ahead_waits-session33`).

    glibc runs those initialisers holding its loader lock: a thread that opens another library
    meanwhile (an extension module's first import) still waits for them, holding the
    interpreter lock.

    Does nothing once torch is imported (or is being imported), where torch is not found, and
    for a CUDA or ROCm build of torch: there torch opens its GPU libraries (CUPTI, which its
    core library needs, among them) from the wheel's own folders before its core library, and
    an open ahead would bind the core library to whichever copy the system's search finds.
    Never raises: a library that does not open here opens in the import, as it always did.
    """
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return
    try:
        spec = importlib.util.find_spec("torch")  # finds the package without importing it
        library = _cpu_core_library(spec.submodule_search_locations or []) if spec else None
        if library is not None:
            _dlopen_unlocked(library)
    except (ImportError, ValueError, OSError, AttributeError, TypeError) as exc:
        logger.debug("torch's core library is not opened ahead of its import: %s", exc)


def _cpu_core_library(folders: Iterable[str]) -> str | None:
    """The path of ``libtorch_cpu.so`` in the first of torch's package folders that has it,
    or None where there is none or the build is a CUDA or ROCm one (torch's own order of
    opening then stands, see `open_torch_library`)."""
    for folder in folders:
        lib = os.path.join(folder, "lib")
        if os.path.exists(os.path.join(lib, "libtorch_cpu.so")):
            gpu = ("libtorch_cuda.so", "libtorch_hip.so")
            if any(os.path.exists(os.path.join(lib, name)) for name in gpu):
                return None
            return os.path.join(lib, "libtorch_cpu.so")
    return None


def _dlopen_unlocked(library: str) -> None:
    """Opens a shared library with the interpreter lock released (Linux). ``ctypes.CDLL``
    holds the lock through its ``dlopen``; a call of libc's ``dlopen`` through a ctypes
    function releases it, as every foreign call does. Local, as torch opens it; the handle is
    kept open for the process's life (the import takes its own)."""
    dlopen = ctypes.CDLL(None).dlopen  # the process's own libc (libdl before glibc 2.34)
    dlopen.restype = ctypes.c_void_p
    dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    if not dlopen(os.fsencode(library), os.RTLD_NOW | os.RTLD_LOCAL):
        # The import meets the same failure and says it.
        logger.debug("torch's core library did not open ahead of its import: %s", library)


def ahead_niceness(hops_ahead: int) -> int:
    """The nice value added to a load for a hop ``hops_ahead`` hops ahead (1: the next one)."""
    return AHEAD_NICENESS[min(max(hops_ahead, 1), len(AHEAD_NICENESS)) - 1]


class LowPriorityLoader:
    """Runs loads one at a time on its own thread, each at a lower CPU priority than the
    agent's, until `hurry` puts the one running back at the agent's priority.

    Each load runs on a thread of its own, started at the load's priority: the threads the
    load starts in turn (transformers' loading pool, torch's intra-op workers, which a thread
    creates once, at its first parallel operation) inherit that priority when they are
    created, and a later setting of the caller's would not reach them. A hurry puts the load's
    thread and every thread of the process still below the agent's priority back at it (the
    only other thread a site lowers, its validation pass, never runs while a task is read).
    A load that ends unhurried puts the threads it started and left running back at the
    agent's priority: a process-wide pool made at a library's first use (as the tokenizers'
    Rust pool is, which every later encoding of the process runs on) would otherwise keep the
    load's low priority for as long as the process lives.

    Linux only (there a thread has a nice value of its own); elsewhere loads run at the
    agent's priority. Raising a priority back needs CAP_SYS_NICE or RLIMIT_NICE (systemd's
    LimitNICE), which a site's service user usually lacks: the loader checks once, before its
    first load, and without it runs every load at the agent's priority (one INFO line), as a
    load it could not hurry would hold a hop up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[tuple[Callable[[], None], int]] = []
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._running_on: int | None = None  # native id of the thread while a load runs
        self._hurried = False
        self._lowers: bool | None = None  # whether loads run lowered: known once the thread runs

    def submit(self, load: Callable[[], None], niceness: int) -> None:
        """Queues ``load`` to run at ``niceness`` above the agent's nice value."""
        with self._lock:
            if self._stopped:
                return
            self._jobs.append((load, niceness))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="load-ahead", daemon=True)
                self._thread.start()
            self._wake.notify()

    def hurry(self) -> None:
        """Puts the load running now (if any), and those queued, at the agent's priority; the
        loads submitted after those run low again."""
        with self._lock:
            if self._running_on is None and not self._jobs:
                return  # nothing to hurry: a hurry does not carry over to a later run's loads
            self._hurried = True
            if self._running_on is not None and self._lowers:
                _raise_lowered_threads()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._jobs.clear()
            self._wake.notify()

    def idle(self, timeout: float) -> bool:
        """Waits until no load is queued or running (tests); False if ``timeout`` passed."""
        with self._wake:
            return self._wake.wait_for(
                lambda: not self._jobs and self._running_on is None, timeout=timeout
            )

    def _loop(self) -> None:
        native_id = threading.get_native_id()
        lowers = _may_raise_priority_back()
        if not lowers:
            logger.info(
                "loads ahead run at the agent's priority: this process may not raise a thread's "
                "priority back (needs CAP_SYS_NICE or LimitNICE)"
            )
        with self._lock:
            self._lowers = lowers
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._jobs or self._stopped)
                if self._stopped:
                    return
                load, niceness = self._jobs.pop(0)
                self._running_on = native_id
                # From the agent's nice value each time, never from the last load's. Set on
                # this thread before the load's own thread starts: that one inherits it.
                lowered = lowers and not self._hurried
                self._set(native_id, niceness if lowered else 0)
                before = _thread_ids()
                worker = threading.Thread(
                    target=self._run, args=(load,), name="load-ahead-job", daemon=True
                )
                worker.start()
            worker.join()
            if lowered:
                _raise_threads_left_by_a_load(before, niceness)
            with self._wake:
                self._running_on = None
                if not self._jobs:
                    self._hurried = False  # the next run's loads are low again
                self._wake.notify_all()

    @staticmethod
    def _run(load: Callable[[], None]) -> None:
        try:
            with collector_paused():
                load()
        except Exception as exc:  # a load reports its own failures; this is a last guard
            logger.error("loading ahead failed: %s", exc)

    @staticmethod
    def _set(native_id: int, niceness: int) -> None:
        """Sets a thread's nice value to the agent's (the process's) plus ``niceness``."""
        if not sys.platform.startswith("linux"):
            return
        try:
            base = os.getpriority(os.PRIO_PROCESS, os.getpid())
            os.setpriority(os.PRIO_PROCESS, native_id, min(19, base + niceness))
        except OSError as exc:  # checked ahead (_may_raise_priority_back): a last guard
            logger.debug("a load ahead keeps its CPU priority: %s", exc)


def _thread_ids() -> frozenset[int]:
    """The native ids of this process's threads (Linux; elsewhere none)."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        return frozenset(int(tid) for tid in os.listdir("/proc/self/task"))
    except OSError:
        return frozenset()


def _raise_threads_left_by_a_load(before: frozenset[int], niceness: int) -> None:
    """Puts the threads a load ahead started and left running (not there before it, still at
    its nice value) back at the agent's priority (Linux). A thread lowered on purpose meanwhile
    (a validation pass, at its own nice value) keeps its priority."""
    if not sys.platform.startswith("linux"):
        return
    try:
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    except OSError as exc:
        logger.debug("threads a load ahead left keep its CPU priority: %s", exc)
        return
    left_at = min(19, base + niceness)
    if left_at == base:
        return  # the agent already runs at nice 19: nothing was lowered
    for tid in _thread_ids() - before:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) == left_at:
                os.setpriority(os.PRIO_PROCESS, tid, base)
        except OSError:  # the thread ended meanwhile (ESRCH), or a last guard
            continue


def _raise_lowered_threads() -> None:
    """Puts every thread of this process whose nice value is above the agent's (the
    process's) back at the agent's (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError as exc:
        logger.debug("a load ahead keeps its CPU priority: %s", exc)
        return
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > base:
                os.setpriority(os.PRIO_PROCESS, tid, base)
        except OSError:  # the thread ended meanwhile (ESRCH), or a last guard
            continue


def _may_raise_priority_back() -> bool:
    """Whether this process may put a thread it lowered back at the agent's priority (Linux:
    root, CAP_SYS_NICE or RLIMIT_NICE). Tried on a scratch thread, which may keep the lower
    priority. Elsewhere True: no load is lowered there."""
    if not sys.platform.startswith("linux"):
        return True
    outcome: list[bool] = []

    def probe() -> None:
        me = threading.get_native_id()
        try:
            base = os.getpriority(os.PRIO_PROCESS, me)
            os.setpriority(os.PRIO_PROCESS, me, min(19, base + 1))
            os.setpriority(os.PRIO_PROCESS, me, base)
            outcome.append(True)
        except OSError:  # PermissionError (EACCES) without the privilege
            outcome.append(False)

    scratch = threading.Thread(target=probe, name="load-ahead-priority-check", daemon=True)
    scratch.start()
    scratch.join()
    return outcome == [True]
