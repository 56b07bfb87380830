"""One hop at a site: incoming checkpoint, (prepared) training, egress check, upload, result."""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

import grpc

from protocols import hyperparameter_messages
from protocols.checkpoint import (
    CheckpointError,
    CheckpointManifest,
    bundle_metadata,
    inspect_bundle,
)
from protocols.logs import log_context
from protocols.signing import sign_digest
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from site_agent._load_ahead import collector_paused
from site_agent.registry import RegisteredDataset
from site_agent.state import SiteState
from site_agent.task_checks import HopFailure, TaskChecks, _task_spec
from site_agent.transfers import _RETRYABLE, Transfers

if TYPE_CHECKING:
    import torch

    from protocols.hyperparameters import HopHyperparameters
    from site_agent.tasks import TaskSpec, Trainer

logger = logging.getLogger("site_agent.agent")
Metrics = dict[str, float]
T = TypeVar("T")
# How much lower than the agent's a deferred validation pass runs (a thread's nice value).
_VALIDATION_NICENESS = 10
# How long before a hop's last step is expected to end its site beats (`_Heartbeat`): the
# coordinator's tamper check for the hand back, started then, is still current when the hand
# back arrives (it keeps one for `coordinator.engine.hops.CHECK_AHEAD_SECONDS`, 0.5 s).
LAST_STEP_LEAD_SECONDS = 0.25
# glibc's `mallopt` parameters (malloc.h) and what `keep_freed_buffers` sets them to.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_FROM_BYTES = 16 << 20  # a block this large or larger is mapped on its own
_TRIM_FROM_BYTES = 64 << 20  # an arena gives its free top back past this much


def keep_freed_buffers() -> bool:
    """Has the C allocator keep freed blocks up to 16 MB for reuse instead of giving the pages
    back to the kernel at once (glibc on Linux; elsewhere nothing changes). True if set.

    A handoff makes and frees buffers of an adapter's size (~300 KB for MiniLM: the copy out of
    the model, the bundle, the gRPC message, the received task's bundle, its tensors). By
    default glibc maps such a block on its own or trims the arena once it is freed, so the next
    one faults its pages in again (75 faults per 300 KB) and each unmap waits for the other
    cores: 1.8 ms median, 50-70 ms p90, per 300 KB make-copy-hash-free cycle at load ~30 on this
    2-core VM, against 0.37 / 0.7 ms with these settings (no page fault). What is kept is
    reused by the next hop's buffers (the same sizes every hop); blocks of 16 MB and more are
    still mapped and unmapped on their own.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library with mallopt: the defaults stay
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Either one set by hand turns glibc's own threshold adjustment off: both are set.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_FROM_BYTES)
    )


def settle_heap(*, collect: bool = True) -> None:
    """Collects once (unless ``collect`` is False), then moves every object alive now out of
    the collector's full passes.

    A site keeps torch, its task libraries and its base model for its lifetime: some 480,000
    tracked objects that each full (generation 2) collection walks again, 100-500 ms on a loaded
    2-core machine, about once per MiniLM hop, wherever it falls (a handoff too). Called once a
    trainer has loaded, off the handoff; what is created later (a hop's model copy...) stays
    collectable.

    ``collect=False`` right after a load with no hop running: the load ran with the collector
    paused and what it made is alive, so a full pass finds nothing to free (0 of 410,000 objects
    after MiniLM's load) and holds the interpreter lock throughout. On a load ahead's low-priority
    thread on a busy host that pass (0.29 s of CPU) kept the agent's main thread waiting 20 s.
    A settle owed at a hop's end collects: the hop's cyclic garbage may lie there.
    """
    if collect:
        gc.collect()
    gc.freeze()


@functools.lru_cache(maxsize=8)
def _hyperparameters(wire: bytes) -> tuple[HopHyperparameters, Mapping[str, object]]:
    """A task's hyperparameters and their values by name, validated once per exact message (its
    deterministic serialisation: the same bytes are the same fields, present or not): a hop's
    preparation and its start carry the same ones. Read only; a message out of bounds raises,
    so it is never cached."""
    hyperparameters = hyperparameter_messages.from_message(pb.HopHyperparameters.FromString(wire))
    return hyperparameters, MappingProxyType(hyperparameters.model_dump())


class _CollectorHold:
    """Keeps the cyclic garbage collector off from a hop's last step until its hand back is
    answered: the span of a handoff the next site waits on this one.

    A collection that falls there holds the handoff up by its whole length; held, it runs at
    the start of the validation pass (on its low-priority thread) or once the hop is over,
    while the next site trains. Only the agent's task thread holds it.
    """

    def __init__(self) -> None:
        self._held = False
        self._was_enabled = False

    def hold(self) -> None:
        if not self._held:
            self._was_enabled = gc.isenabled()
            gc.disable()
            self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._was_enabled:
                gc.enable()


def _lower_this_threads_priority() -> None:
    """Raises the calling thread's nice value by ``_VALIDATION_NICENESS`` (Linux).

    Not the idle scheduling class: the task thread waits for this pass, and on a saturated
    host an idle-class thread gets ~0.3% of a core, so the site would read no task (its next
    hop's lease included) until the host calmed down; nice +10 still yields ~90% to the next
    site's start and the coordinator's commit.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        thread_id = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread_id) + _VALIDATION_NICENESS
        os.setpriority(os.PRIO_PROCESS, thread_id, niceness)
    except OSError as exc:  # a container may forbid it: the pass runs all the same
        logger.debug("validation runs at the agent's priority: %s", exc)


def at_low_priority(work: Callable[[], T]) -> T:
    """Runs ``work`` on a thread of its own at a lower CPU priority and waits for it.

    A committed hop's validation pass starts as the coordinator commits and the next site
    starts its hop: on a machine with few cores, it yields to them. Linux only (there a
    thread has a nice value of its own); elsewhere it runs at the agent's priority. torch's
    intra-op (OpenMP) workers are made by the thread that first runs a parallel operation,
    and inherit its priority then: the pass's thread is new, lowered before it runs anything,
    so its workers run at its priority too, while the task thread's own workers (training)
    keep the agent's.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        _lower_this_threads_priority()
        try:
            outcome.append(work())
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="validation", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


@dataclass
class _Progress:
    phase: str = "starting"
    step: int = 0
    total: int = 0
    loss: float = 0.0


class BeatThreads:
    """Long-lived daemon threads that run hops' heartbeat loops, one loop at a time each.

    A hop's start hands its loop to an idle one: `Thread.start` waits until the new thread
    has been scheduled, up to milliseconds of a handoff on a loaded host. A thread still in a
    loop (a beat stuck on an unreachable coordinator) is not waited for: another one runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[tuple[Callable[[], None], threading.Event]]] = []

    def run(self, loop: Callable[[], None]) -> threading.Event:
        """Runs ``loop`` on an idle thread (a new one if none is idle); the event is set once
        it has returned."""
        done = threading.Event()
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        (inbox or self._spawn()).put((loop, done))
        return done

    def warm(self) -> None:
        """Starts an idle thread if there is none (off the handoff: the agent connecting)."""
        with self._lock:
            if self._idle:
                return
        inbox = self._spawn()
        with self._lock:
            self._idle.append(inbox)

    def _spawn(self) -> queue.SimpleQueue[tuple[Callable[[], None], threading.Event]]:
        inbox: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(inbox,), name="heartbeat", daemon=True).start()
        return inbox

    def _serve(self, inbox: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]]) -> None:
        while True:
            loop, done = inbox.get()
            try:
                loop()
            except BaseException:  # a loop's failure ends its hop's beats, not this thread
                logger.exception("heartbeat loop failed")
            finally:
                with self._lock:  # idle before done: the next hop's start finds this thread
                    self._idle.append(inbox)
                done.set()


class _Heartbeat:
    """Sends progress on a background thread; remembers if the coordinator asked to cancel.

    ``threads``: where the loop runs (the agent's `BeatThreads`); None: a thread of its own.
    """

    def __init__(
        self,
        stub: pb_grpc.SiteServiceStub,
        task: pb.HopTask,
        interval: float,
        threads: BeatThreads | None = None,
        decide: Callable[[], bool] | None = None,
    ) -> None:
        self._stub = stub
        self._task = task
        self._interval = interval
        self._progress = _Progress()
        self._stop = threading.Event()
        self._wake = threading.Event()  # the loop looks again: a beat now, or one due later
        self._tell = False  # a beat now (`_wake` set with it)
        self._due: float | None = None  # time.monotonic() of a beat due later
        self._first_step_at: float | None = None
        self.cancelled = threading.Event()
        self._threads = threads
        self._done: threading.Event | None = None
        self._thread: threading.Thread | None = None
        # A provisional task (`HopTask.provisional`) is not leased until its decision comes
        # (`decide` reads it): no beat goes out for it before, none at all if it is withdrawn.
        self._decide = decide
        self._granted: bool | None = None if task.provisional else True
        self._released = threading.Event()
        if self._granted:
            self._released.set()

    def __enter__(self) -> _Heartbeat:
        if self._threads is not None:
            self._done = self._threads.run(self._loop)
        else:
            self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._released.set()
        if self._done is not None:
            self._done.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def granted(self) -> bool:
        """Whether this hop is leased: at once for an ordinary task; for a provisional one, its
        lease decision, read from the task stream at the first call (which waits for it)."""
        if self._granted is None:
            self._granted = self._decide is not None and self._decide()
            if self._granted:
                self._released.set()
        return self._granted

    def phase(self, phase: str, *, tell: bool = True) -> None:
        """Enters a phase; ``tell``: beat at once (from the heartbeat thread: the hop does not
        wait for the coordinator's answer), else with the next regular beat."""
        self._progress = _Progress(phase, self._progress.step, self._progress.total)
        if tell:
            self._tell_now()

    def training_step(self, step: int, total: int, loss: float) -> None:
        self._progress = _Progress("training", step, total, loss)
        now = time.monotonic()
        if step == 1:
            self._first_step_at = now
            # "Training" is told once the first step is done, not while the hop sets up: the
            # coordinator then tells the site after this one that it is next, and its
            # preparation (a model copy, the data encoded) no longer competes for the CPU
            # with this site's start.
            self._tell_now()
        if step == total - 1:
            # The last step begins. A beat LAST_STEP_LEAD_SECONDS before it is expected to
            # end (the steps' mean so far) has the coordinator check the run's ledger rows
            # for the hand back while this step computes, not as the hand back arrives.
            first = self._first_step_at
            mean = (now - first) / (step - 1) if step > 1 and first is not None else 0.0
            self._due = now + max(0.0, mean - LAST_STEP_LEAD_SECONDS)
            self._wake.set()
        elif step >= total:
            self._due = None  # the hand back follows: no beat beside it

    def _tell_now(self) -> None:
        self._tell = True
        self._wake.set()

    def _send(self) -> None:
        progress = self._progress
        try:
            response = self._stub.SendHeartbeat(
                pb.Heartbeat(
                    hop_id=self._task.hop_id,
                    lease_token=self._task.lease_token,
                    phase=progress.phase,
                    step=progress.step,
                    total_steps=progress.total,
                    loss=progress.loss,
                ),
                timeout=10,
            )
        except grpc.RpcError as exc:
            logger.warning("heartbeat failed: %s", exc.code())
            return
        if response.cancel and not self.cancelled.is_set():
            logger.warning("coordinator cancelled hop %s", self._task.hop_id)
            self.cancelled.set()

    def _loop(self) -> None:
        self._released.wait()  # a provisional hop's lease first (set on exit too)
        regular = time.monotonic() + self._interval
        while not self.cancelled.is_set():
            due = self._due
            until = regular if due is None else min(regular, due)
            self._wake.wait(max(0.0, until - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            now, due = time.monotonic(), self._due
            if due is not None and now >= due:
                self._due = None
            elif not self._tell and now < regular:
                continue  # woken to wait for a beat due later
            self._tell = False
            self._send()
            regular = time.monotonic() + self._interval


class HopRunner(TaskChecks, Transfers):
    """Runs the hops (and "you are next" preparations) the coordinator gives this site."""

    state: SiteState
    site_name: str
    _deferred_validation: Callable[[], Metrics] | None
    _handing_back: tuple[pb.UploadHeader, bytes] | None = None  # a finished hop's bundle
    # What a finished hop leaves to free (its input and output tensors), freed once its hand
    # back is answered: a buffer of an adapter's size is unmapped when freed, and on a loaded
    # (virtual) host that can wait milliseconds for the other cores, inside the handoff.
    _freed_after_hand_back: tuple[object, ...] = ()
    # Whether a hop runs (from its task to its validation's report), and whether the heap is
    # to be settled once it is over: no `gc.freeze` while a hop's objects are alive.
    _heap_lock: threading.Lock
    _beat_threads: BeatThreads | None = None  # None: a thread per hop
    _hop_running = False
    _settle_owed = False

    def _settle_heap_between_hops(self) -> None:
        """`settle_heap` now, without a collection (a trainer just loaded, no hop's objects
        about), or once the hop running now is over, with one (its model, tensors and
        messages would otherwise stay out of every collection for good)."""
        with self._heap_lock:
            if self._hop_running:
                self._settle_owed = True
                return
            settle_heap(collect=False)

    # ---- one hop ------------------------------------------------------------------------------

    def _run_hop(self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, interval: float) -> None:
        with self._heap_lock:
            self._hop_running = True
        try:
            with log_context(run_id=task.run_id, hop_id=task.hop_id, site=self.site_name):
                self._run_hop_logged(stub, task, interval)
        finally:
            self._freed_after_hand_back = ()  # a hop not handed back (cancelled, say)
            with self._heap_lock:
                self._hop_running = False
                owed, self._settle_owed = self._settle_owed, False
                if owed:  # a trainer loaded during the hop: its heap, now the hop is over
                    settle_heap()

    def _run_hop_logged(
        self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, interval: float
    ) -> None:
        provisional = " (provisional: its lease is committing)" if task.provisional else ""
        logger.info("hop %d of run %s: starting%s", task.hop_index, task.run_id, provisional)
        collector = _CollectorHold()  # held by `_train_hop` from the last step
        try:
            reported = self._train_and_report(stub, task, interval, collector)
            if reported is None:
                return
            result, response = reported
            if response.ledger_head:
                self.state.acknowledge(response.ledger_head)
            if result.ok:
                self.metrics.hop("trained")
            logger.info("hop %d of run %s: %s", task.hop_index, task.run_id, response.hop_status)
            validate, self._deferred_validation = self._deferred_validation, None
            if validate is not None and result.validation_follows:
                self._report_validation(stub, task, validate, collector)
        finally:
            collector.release()

    def _train_and_report(
        self,
        stub: pb_grpc.SiteServiceStub,
        task: pb.HopTask,
        interval: float,
        collector: _CollectorHold,
    ) -> tuple[pb.HopResult, pb.HopResultResponse] | None:
        """Trains a hop and reports its result (hands it back); None: nothing was taken.

        A provisional task (`HopTask.provisional`) is set up while its lease commits; its first
        step, and any answer (a refusal too), waits for the lease decision on the task stream.
        """
        decide = functools.partial(self._await_lease_decision, task)
        with _Heartbeat(stub, task, interval, self._beat_threads, decide) as beat:
            try:
                result = self._train_hop(stub, task, beat, collector)
            except HopFailure as failure:
                if not beat.granted():
                    self._withdrawn(task)
                    return None
                logger.error("hop %s refused: %s (%s)", task.hop_id, failure, failure.code)
                self.metrics.hop("refused")
                result = pb.HopResult(
                    hop_id=task.hop_id,
                    lease_token=task.lease_token,
                    ok=False,
                    error_code=failure.code,
                    error_message=str(failure),
                )
            if result is None:
                return None
            if not beat.granted():  # a trainer that never asked before a first step
                self._withdrawn(task)
                return None
            # Still heartbeating: the lease holds while the coordinator cannot take the result.
            return self._report_hop_result(stub, task, result, beat, collector)

    def _report_hop_result(
        self,
        stub: pb_grpc.SiteServiceStub,
        task: pb.HopTask,
        result: pb.HopResult,
        beat: _Heartbeat,
        collector: _CollectorHold | None = None,
    ) -> tuple[pb.HopResult, pb.HopResultResponse] | None:
        """Reports a hop's result (a finished hop: hands its bundle back with it, one call),
        retrying while the coordinator cannot take it; None: refused.

        The collector ``collector`` holds off the handoff is released at the first retry: a
        coordinator that is away is no handoff to hurry, and garbage would pile up meanwhile.

        A bundle the coordinator refuses (size, hash, format, values, lineage, signature) is
        reported as the hop's failure (code "handback-refused"), so that the run's failure policy
        applies at once. A refused result whose bundle the coordinator stored (non-finite
        metrics, say) is logged and left to the lease, as a refused ReportHopResult.
        """
        handing_back, self._handing_back = self._handing_back, None
        release = collector.release if collector is not None else None
        _freed, self._freed_after_hand_back = self._freed_after_hand_back, ()
        try:
            if result.ok and handing_back is not None:
                header, payload = handing_back
                response = self._hand_back(
                    stub, header, payload, result, beat.cancelled, on_retry=release
                )
            else:
                response = self._retrying(
                    "hop result",
                    lambda: stub.ReportHopResult(result, timeout=60),
                    lease_lost=beat.cancelled,
                    on_retry=release,
                )
        except grpc.RpcError as exc:
            if beat.cancelled.is_set():
                logger.error("hop %s: lease lost before the coordinator took its result (%s)",
                             task.hop_id, exc.details())  # fmt: skip
                return None
            if exc.code() in _RETRYABLE:
                raise
            logger.error("hop %s result refused: %s %s", task.hop_id, exc.code(), exc.details())
            if (
                handing_back is not None
                and exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                and not self._bundle_stored(stub, handing_back[0])
            ):
                self._deferred_validation = None
                failed = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=False,
                                      error_code="handback-refused",
                                      error_message=f"the coordinator refused the hop's "
                                                    f"bundle: {exc.details()}")  # fmt: skip
                return self._report_hop_result(stub, task, failed, beat, collector)
            return None
        return result, response

    def _await_lease_decision(self, task: pb.HopTask) -> bool:
        """Reads the task stream up to a provisional hop's lease decision: True if granted.

        The agent's stream reader (the thread running the hop) reads it; what comes before is
        handled as the stream loop would (a head, a preparation) or queued for after the hop.
        A stream that ends first withdraws the hop (the coordinator re-sends a committed lease
        on the next stream).
        """
        raise NotImplementedError  # the agent reads its stream (SiteAgent)

    def _withdrawn(self, task: pb.HopTask) -> None:
        logger.info("hop %s: lease not committed; the provisional task is dropped", task.hop_id)
        self.metrics.hop("withdrawn")

    @staticmethod
    def _bundle_stored(stub: pb_grpc.SiteServiceStub, header: pb.UploadHeader) -> bool:
        """Whether the coordinator holds the whole bundle a refused hand back carried (then the
        refusal concerns the result, not the bundle)."""
        try:
            progress: pb.UploadProgress = stub.UploadStatus(header, timeout=30)
        except grpc.RpcError:
            return False
        return progress.received >= header.total_size > 0

    def _hop_setup(self, task: pb.HopTask) -> tuple[HopHyperparameters, TaskSpec, Trainer]:
        """A hop's hyperparameters, spec and trainer, once its run's approval is checked.

        Shared by the hop and its preparation: both refuse the same tasks the same way.
        """
        try:
            hyperparameters, values = _hyperparameters(
                task.hyperparameters.SerializeToString(deterministic=True)
            )
        except hyperparameter_messages.HyperparameterMessageError as exc:
            raise HopFailure("bad-task", f"invalid hyperparameters: {exc}") from exc
        self._check_approval(task, values)
        spec = _task_spec(task.task_type, task.labels, task.lora, task.task_options_json)
        trainer = self._task_trainer(
            task.task_type, task.cross_validation if task.HasField("cross_validation") else None
        )
        return hyperparameters, spec, trainer

    def _incoming(
        self,
        stub: pb_grpc.SiteServiceStub,
        task: pb.HopTask,
        held: str,
        pushed: bytes | None = None,
    ) -> Mapping[str, torch.Tensor]:
        """The hop's input, checked (``pushed``: the task's `input_bundle`, if read already)."""
        import safetensors.torch

        from site_agent.tasks import tensors_from_values

        ref = task.input_checkpoint
        # A copy out of the message (each read of the field is another): taken once.
        data = task.input_bundle if pushed is None else pushed
        if data:  # pushed inside the task: checked exactly as a download
            bundle, values = self._checked_bundle(data, ref)
            self.metrics.checkpoint_bytes.labels(direction="download").inc(len(data))
        else:
            data, bundle, values = self._download_checked(stub, ref)
        # The checks above parsed, hashed and read every value once: not again here.
        if bundle.manifest.base_model_sha256 != held:
            raise HopFailure(
                "base-model-mismatch",
                f"incoming adapter was trained on base model {bundle.manifest.base_model_sha256}; "
                f"this site holds {held}",
            )
        tensors = tensors_from_values(values)
        return tensors if tensors is not None else safetensors.torch.load(data)

    def _train_hop(
        self,
        stub: pb_grpc.SiteServiceStub,
        task: pb.HopTask,
        beat: _Heartbeat,
        collector: _CollectorHold | None = None,
    ) -> pb.HopResult | None:
        with collector_paused():  # a first hop's torch import: see collector_paused
            from site_agent.tasks import HopCancelled, PreparingTrainer, serialized

        self._deferred_validation = None
        hyperparameters, spec, trainer = self._hop_setup(task)
        dataset = self._dataset(task.dataset, task.task_type)
        held = self._model_sha256(trainer, spec, dataset)
        self._check_base_model(held, task.base_model_sha256)
        incoming = None
        parent = ""
        if task.HasField("input_checkpoint"):
            pushed = task.input_bundle  # a copy out of the message: taken once
            if not pushed:
                beat.phase("downloading")
            parent = task.input_checkpoint.sha256
            incoming = self._incoming(stub, task, held, pushed)

        # The phase stays what it was while the hop sets up: "training" comes with its first
        # step (`training_step`), so that no regular beat tells it early either.

        def should_cancel() -> bool:
            # A provisional hop waits here, before its first step, for its lease decision.
            return (
                not beat.granted()
                or beat.cancelled.is_set()
                or self._stop.is_set()
                or self._out_of_grace()
            )

        def progress(step: int, total: int, loss: float) -> None:
            beat.training_step(step, total, loss)
            if step == total and collector is not None:  # the handoff from this site begins
                collector.hold()

        try:
            if self._validates_after_commit(task, trainer):
                assert isinstance(trainer, PreparingTrainer)
                outcome = trainer.run_hop(spec, dataset, hyperparameters, incoming,
                                          progress, should_cancel,
                                          defer_validation=True)  # fmt: skip
            else:
                outcome = trainer.run_hop(
                    spec, dataset, hyperparameters, incoming, progress, should_cancel
                )
        except HopCancelled:
            if not beat.granted():
                self._withdrawn(task)
                return None
            if self._out_of_grace() and not beat.cancelled.is_set() and not self._stop.is_set():
                logger.warning("hop %s handed back to the coordinator: shutting down", task.hop_id)
                self.metrics.hop("released")
                return pb.HopResult(
                    hop_id=task.hop_id,
                    lease_token=task.lease_token,
                    ok=False,
                    released=True,
                    error_code="released",
                    error_message=f"site {self.site_name} shut down before the hop finished",
                )
            logger.warning("hop %s cancelled; no result is reported", task.hop_id)
            self.metrics.hop("cancelled")
            return None
        except ValueError as exc:
            raise HopFailure("training-failed", str(exc)) from exc
        self.metrics.training.observe(
            max(outcome.train_finished_at_ns - outcome.train_started_at_ns, 0) / 1e9
        )

        # Not told at once: the hand back follows at once, and is what the coordinator waits for.
        beat.phase("uploading", tell=False)
        manifest = CheckpointManifest(
            task_type=task.task_type,
            base_model_sha256=held,
            run_id=task.run_id,
            hop_id=task.hop_id,
            producer_site=self.site_name,
            parent_sha256=parent,
            created_at=datetime.now(UTC).isoformat(),
        )
        payload = serialized(outcome.tensors, bundle_metadata(manifest, outcome.adapter_config))
        # The egress check hashes the bundle: that digest is the one signed and sent.
        digest = self._check_egress(trainer, spec, dataset, payload, self.settings.max_upload_bytes)
        header = pb.UploadHeader(
            hop_id=task.hop_id,
            lease_token=task.lease_token,
            total_size=len(payload),
            sha256=digest,
            signature=sign_digest(self.settings.private_key.read_bytes(), digest),
        )
        # Handed back with the result, in one call (`_report_hop_result`).
        self._handing_back = (header, payload)
        self._freed_after_hand_back = (outcome, incoming)
        self._deferred_validation = outcome.validate
        return pb.HopResult(
            hop_id=task.hop_id,
            lease_token=task.lease_token,
            ok=True,
            output_checkpoint=pb.CheckpointRef(
                sha256=digest, size=len(payload), signature=header.signature
            ),
            metrics=outcome.metrics,
            train_started_at_ns=outcome.train_started_at_ns,
            train_finished_at_ns=outcome.train_finished_at_ns,
            validation_follows=outcome.validate is not None,
        )

    @staticmethod
    def _validates_after_commit(task: pb.HopTask, trainer: Trainer) -> bool:
        """Whether this hop's validation pass runs after its commit (off the handoff)."""
        from site_agent.tasks import PreparingTrainer

        return task.validation_after_commit and isinstance(trainer, PreparingTrainer)

    def _report_validation(
        self,
        stub: pb_grpc.SiteServiceStub,
        task: pb.HopTask,
        validate: Callable[[], Metrics],
        collector: _CollectorHold | None = None,
    ) -> None:
        """Runs a committed hop's validation pass and reports it as its own ledger event.

        The hop is committed whatever happens here: a failed pass is reported as such, and a
        coordinator that is away is retried like a hop result. A collection ``collector``
        held off the handoff runs first, at the pass's low priority.
        """

        def collect_then_validate() -> Metrics:
            if collector is not None:
                collector.release()
                gc.collect()
            return validate()

        report = pb.HopValidation(hop_id=task.hop_id)
        try:
            report.metrics.update(at_low_priority(collect_then_validate))
            report.ok = True
        except ValueError as exc:
            logger.error("hop %s: validation after the commit failed: %s", task.hop_id, exc)
            report.error_message = str(exc)
        try:
            response: pb.HopValidationResponse = self._retrying(
                "hop validation", lambda: stub.ReportHopValidation(report, timeout=60)
            )
        except grpc.RpcError as exc:
            if exc.code() in _RETRYABLE:
                raise
            logger.error("hop %s validation refused: %s %s", task.hop_id, exc.code(),
                         exc.details())  # fmt: skip
            return
        if response.ledger_head:
            self.state.acknowledge(response.ledger_head)
        logger.info("hop %d of run %s: validation reported", task.hop_index, task.run_id)

    # ---- getting ready for the next hop --------------------------------------------------------

    def _prepare(self, hop: pb.HopTask) -> None:
        """Gets ready for a hop this site is told it is next for: only for an approved run.

        Nothing is reported: a refused or failed preparation just leaves the hop to load what
        it needs when it arrives (and to refuse it then, with its code, if it must).
        """
        from site_agent.tasks import PreparingTrainer

        with log_context(run_id=hop.run_id, hop_id=hop.hop_id, site=self.site_name):
            try:
                hyperparameters, spec, trainer = self._hop_setup(hop)
                if not isinstance(trainer, PreparingTrainer):
                    return
                # Hashed in full here, off the handoff: the hop's start then compares the
                # source's identity with what this hash found (`load_registered`).
                dataset = self._dataset(hop.dataset, hop.task_type, rehash=True)
                self._check_base_model(
                    self._model_sha256(trainer, spec, dataset), hop.base_model_sha256
                )
                trainer.prepare(spec, dataset, hyperparameters.seed)
                self._rehearse_handoff(trainer, spec, dataset)
                # While another site trains: the handoff to this site then starts with no
                # collection owed (it would fall in the set-up or the first steps).
                gc.collect()
            except HopFailure as failure:
                logger.info("not preparing hop %d: %s", hop.hop_index, failure)
            except (ValueError, OSError) as exc:
                logger.warning("could not prepare hop %d: %s", hop.hop_index, exc)
            else:
                logger.info("hop %d of run %s: prepared", hop.hop_index, hop.run_id)

    def _rehearse_handoff(
        self, trainer: Trainer, spec: TaskSpec, dataset: RegisteredDataset
    ) -> None:
        """Runs this site's steps of a handoff once on an adapter of the prepared hop's shape
        (zeros), nothing sent and nothing kept: the hand back's serialisation, egress check and
        signature, then the check a task's pushed adapter gets (hash, format, values, custody
        signature) and its tensors built from the values read.

        A process's first handoffs (to this site, then from it) otherwise run these paths for
        the first time on the handoff: lazy imports and caches, the interpreter's specialising
        of each function, fresh buffers; a cold cluster's first four handoffs were the slow
        ones (benchmarks/results/gc24-split.md). A rehearsal that fails is one debug line: the
        hop pays those costs, as before.
        """
        from site_agent.tasks import serialized, tensors_from_values

        try:
            import torch

            state = trainer.trainable_state(spec, dataset)
            if not state or any(t.dtype != "F32" for t in state):
                return  # adapters travel as float32; anything else is not worth rehearsing
            manifest = CheckpointManifest(
                task_type=spec.task_type, base_model_sha256="0" * 64, run_id="rehearsal",
                hop_id="rehearsal", producer_site=self.site_name, parent_sha256="",
                created_at=datetime.now(UTC).isoformat(),
            )  # fmt: skip
            tensors = {t.name: torch.zeros(t.shape, dtype=torch.float32) for t in state}
            payload = serialized(tensors, bundle_metadata(manifest, {}))
            digest = self._check_egress(trainer, spec, dataset, payload, len(payload))
            ref = pb.CheckpointRef(
                sha256=digest, size=len(payload),
                signature=sign_digest(self.settings.private_key.read_bytes(), digest),
                producer_certificate=self.settings.certificate.read_bytes(),
            )  # fmt: skip
            _bundle, values = self._checked_bundle(payload, ref)
            tensors_from_values(values)
        except Exception as exc:  # any step's error: only a first-call cost is at stake
            logger.debug("handoff not rehearsed: %s: %s", type(exc).__name__, exc)

    @staticmethod
    def _check_egress(
        trainer: Trainer,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        payload: bytes,
        max_bytes: int,
    ) -> str:
        """Only a well-formed, finite bundle of exactly the declared trainable state leaves;
        returns its sha256 (hex)."""
        try:
            bundle = inspect_bundle(payload, max_bytes=max_bytes)
        except CheckpointError as exc:
            raise HopFailure("egress-refused", str(exc)) from exc
        declared = [
            (t.name, t.dtype, tuple(t.shape)) for t in trainer.trainable_state(spec, dataset)
        ]
        actual = [(t.name, t.dtype, tuple(t.shape)) for t in bundle.tensors]
        if sorted(declared) != actual:
            extra = sorted({n for n, _, _ in actual} - {n for n, _, _ in declared})
            raise HopFailure(
                "egress-refused",
                "adapter differs from the task's declared trainable state"
                + (f" (undeclared: {', '.join(extra[:5])})" if extra else ""),
            )
        return bundle.sha256
