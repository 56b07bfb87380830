"""The hospital's site agent: dials out, runs the hops it is given, returns adapters.

The agent never listens on a port. It keeps one task stream open, runs one task at a time, and
sends back only the declared trainable tensors and aggregate metrics. A finished hop's upload and
result are retried while the coordinator is away, so a coordinator restart loses no work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, cast

import grpc

from protocols.interpreter import quick_thread_switches
from protocols.logs import log_context
from protocols.task_types import LORA_TASK_TYPES
from protocols.transport import secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from protocols.version import BATON_VERSION, PROTOCOL_VERSION
from site_agent._load_ahead import (
    LowPriorityLoader,
    ahead_niceness,
    collector_paused,
    open_torch_library,
)
from site_agent.approvals import ApprovalPolicy, ApprovalStore
from site_agent.base_model import hash_base_model
from site_agent.evaluation_task import EvaluationRunner
from site_agent.examples import TASK_TYPES
from site_agent.heads import HEAD_FILE, KeptHead
from site_agent.hop_runner import BeatThreads, HopRunner, keep_freed_buffers
from site_agent.metrics import SiteMetrics
from site_agent.reconnect import ReconnectBackoff, wait_for_port
from site_agent.refusal import CertificateRefused, local_certificate_problem, probe_handshake
from site_agent.registry import list_registered
from site_agent.releases import ReleaseLimits, StatisticsReleases
from site_agent.settings import SiteSettings
from site_agent.state import SiteState
from site_agent.statistics_task import StatisticsRunner
from site_agent.task_checks import HopFailure
from site_agent.transfers import SiteStub

if TYPE_CHECKING:
    from site_agent.tasks import Trainer

__all__ = ["AGENT_VERSION", "CertificateRefused", "HistoryRewritten", "HopFailure", "SiteAgent"]

logger = logging.getLogger(__name__)

AGENT_VERSION = BATON_VERSION
LORA_TASKS = LORA_TASK_TYPES
CERTIFICATE_WARNING_DAYS = 30
APPROVAL_POLL_SECONDS = 1.0  # how soon a `baton-site approve` reaches the coordinator
Metrics = dict[str, float]


class HistoryRewritten(RuntimeError):
    """The coordinator no longer holds the ledger event this site acknowledged."""


def one_line(exc: BaseException) -> str:
    """An exception as one short line for a log or a refusal (no traceback, no locals)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _out_of_memory(exc: BaseException) -> bool:
    """Whether an error is, or was caused by, running out of memory."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MemoryError):
            return True
        seen = seen.__cause__
    return False


def _label_names(label_counts: object) -> list[str]:
    """The label names of a registered dataset's splits (counts stay at the site)."""
    if not isinstance(label_counts, dict):
        return []
    return sorted({str(label) for split in label_counts.values() if isinstance(split, dict)
                   for label in split})  # fmt: skip


class SiteAgent(HopRunner, EvaluationRunner, StatisticsRunner):
    """Runs tasks for one site until stopped."""

    def __init__(self, settings: SiteSettings) -> None:
        keep_freed_buffers()  # a handoff's buffers reuse the last one's pages (see there)
        quick_thread_switches()  # the hop and its heartbeat threads share the interpreter
        self.settings = settings
        self.state = SiteState(settings.state_path)
        self.heads = KeptHead(settings.state_path.parent / HEAD_FILE, settings.ca_certificate)
        self.approvals = ApprovalStore(
            settings.approvals_path,
            frozenset(settings.approved_bundles),
            ApprovalPolicy.load(settings.approval_policy)
            if settings.approval_policy
            else ApprovalPolicy(),
        )
        self.releases = StatisticsReleases(
            settings.statistics_releases_path,
            ReleaseLimits(
                max_answers=settings.max_statistics_answers,
                epsilon=settings.statistics_epsilon,
                delta=settings.statistics_delta,
            ),
        )
        self._trainers: dict[str, Trainer] = {}
        # One lock per task type: the background load and a task may race for a trainer, and a
        # base model loading never holds up a tabular hop.
        self._trainers_lock = {task_type: threading.Lock() for task_type in TASK_TYPES}
        self._base_model_sha256: str | None = None
        # "You are next" preparations run here, one at a time, beside the task stream.
        self._preparations = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        # Signed ledger heads are checked and kept here, in order, beside the task stream.
        self._head_keeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-head")
        # Loads ahead of this site's first visit of a run, at a low CPU priority (see _load_ahead).
        self._loads_ahead = LowPriorityLoader()
        self._stop = threading.Event()
        self._stream: grpc.Call | None = None
        # Work a hop read from the stream while it waited for its lease decision, run next.
        self._queued_tasks: deque[pb.Task] = deque()
        self.site_name = ""
        self.metrics = SiteMetrics()
        self._draining = threading.Event()  # SIGTERM: no new task; the current one may finish
        self._grace_deadline = 0.0
        self.backoff = ReconnectBackoff(maximum=settings.reconnect_max_seconds, from_start=True)
        self._session_started = False
        # Set by a hop whose validation pass runs after its commit (see _report_validation).
        self._deferred_validation: Callable[[], Metrics] | None = None
        self._preload_decided = False  # see _said_hello
        self._heap_lock = threading.Lock()  # see HopRunner._settle_heap_between_hops
        self._beat_threads = BeatThreads()  # hops' heartbeats, on threads started ahead

    # ---- lifecycle ----------------------------------------------------------------------------

    def trainer(self, task_type: str) -> Trainer:
        """The trainer of a task type, created once per process (base model loaded once).

        Waits for the background load if it is loading this trainer.

        Raises:
            HopFailure: ``unsupported-task``, or ``no-base-model`` if this site has no base
                model or cannot load it (the reason in one line).
        """
        if task_type not in TASK_TYPES:
            raise HopFailure("unsupported-task", f"this site cannot run {task_type!r} tasks")
        if task_type in LORA_TASKS and self.settings.base_model_dir is None:
            raise HopFailure("no-base-model", f"this site has no base model for {task_type}")
        with self._trainers_lock[task_type]:
            if task_type not in self._trainers:
                started = time.monotonic()
                try:
                    with collector_paused():
                        self._trainers[task_type] = self._load_trainer(task_type)
                except Exception as exc:  # a site's model folder: any library's error
                    if task_type not in LORA_TASKS:
                        raise
                    raise HopFailure(
                        "no-base-model",
                        f"this site cannot load its base model {self.settings.base_model_dir}: "
                        f"{one_line(exc)}",
                    ) from exc
                logger.info(
                    "%s trainer loaded in %.2f s (process CPU so far %.2f s)",
                    task_type,
                    time.monotonic() - started,
                    time.process_time(),
                )
                # What lives as long as the process: out of full collections (once no hop runs).
                self._settle_heap_between_hops()
            return self._trainers[task_type]

    def _load_trainer(self, task_type: str) -> Trainer:
        """Imports torch and the task's libraries, builds the trainer and loads one base model
        ahead of a first hop: for the label set most of this site's registered datasets share.

        Bounded to one base model (one copy in memory); other label counts load at their first
        hop. A label set no run could use is one log line and skipped; running out of memory
        while loading ahead is one log line and the trainer is kept (its hops load the model).

        Raises:
            Exception: The trainer cannot be built or the base model folder cannot load (missing
                or corrupt weights...): ``trainer`` refuses with ``no-base-model``.
        """
        open_torch_library()  # off the interpreter lock: the agent's other threads keep going
        if task_type in LORA_TASKS:  # tabular trainers never import transformers
            from site_agent._library_logs import route_library_output

            route_library_output()  # before transformers logs anything; off the hello path
        from site_agent.tasks import create_trainer, load_base_models
        from site_agent.tasks._loop import warm_up_optimizer

        warm_up_optimizer()  # the first hop's optimizer then costs no lazy import
        self._warm_up_signing()
        trainer = create_trainer(
            task_type,
            base_model_dir=self.settings.base_model_dir if task_type in LORA_TASKS else None,
            device=self.settings.device,
            num_threads=self.settings.num_threads,
        )
        labels = self._labels_to_load(task_type)
        try:
            load_base_models(trainer, [labels] if labels else [])
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            logger.warning(
                "could not load the %s base model ahead (out of memory); its first hop loads it",
                task_type,
            )
        return trainer

    def _warm_up_signing(self) -> None:
        """Signs a throwaway digest with this site's key: a first hand-back's custody signature
        otherwise pays for loading the signing code (tens of ms in a first visit's handoff)."""
        from protocols.signing import sign_digest

        try:
            sign_digest(self.settings.private_key.read_bytes(), "0" * 64)
        except (OSError, ValueError) as exc:  # the hop reports it, with its code, if it lasts
            logger.debug("custody signing not warmed up: %s", one_line(exc))

    def _labels_to_load(self, task_type: str) -> tuple[str, ...] | None:
        """The label set of this site's registered datasets of a task type whose base model a
        first hop most likely needs: the label count most of them share (ties: the first
        registered). A label set no run could use is one log line and skipped."""
        from site_agent.tasks import TaskSpec

        if task_type != "seq-classification":
            return None
        usable: list[tuple[str, ...]] = []
        for entry in list_registered(self.settings.data_dir):
            if entry.get("status") != "ok" or entry.get("task_type") != task_type:
                continue
            labels = tuple(_label_names(entry.get("label_counts")))
            try:
                TaskSpec(task_type, labels=labels)
            except ValueError as exc:
                logger.warning(
                    "dataset %s: its base model is not loaded ahead: %s",
                    entry.get("name"),
                    one_line(exc),
                )
                continue
            usable.append(labels)
        counts = Counter(len(labels) for labels in usable)
        return max(usable, key=lambda labels: counts[len(labels)], default=None)

    def _task_types_to_load(self) -> list[str]:
        """What the background load prepares: the task types of this site's datasets that it
        can run, or the base model's (else tabular's) trainer when it has none registered."""
        runnable = {
            str(entry.get("task_type"))
            for entry in list_registered(self.settings.data_dir)
            if entry.get("status") == "ok"
        } & {t for t in TASK_TYPES if t not in LORA_TASKS or self.settings.base_model_dir}
        if runnable:
            return sorted(runnable, key=lambda t: (t not in LORA_TASKS, t))
        return ["seq-classification" if self.settings.base_model_dir else "tabular"]

    def load_in_background(self) -> threading.Thread:
        """Imports torch and loads the trainers this site will need (tokenizer, config and base
        model) on a thread, so the agent says hello at once; a task that needs a trainer still
        loading waits for it. A base model that cannot load is one log line; hops that need it
        are then refused with ``no-base-model``."""

        def load() -> None:
            for task_type in self._task_types_to_load():
                try:
                    self.trainer(task_type)
                except HopFailure as failure:
                    logger.error("%s; its hops will be refused", failure)
                except Exception as exc:  # reported again, with its code, when a task needs it
                    logger.error("could not load the %s trainer: %s", task_type, one_line(exc))

        thread = threading.Thread(target=load, name="preload", daemon=True)
        thread.start()
        return thread

    def _said_hello(self) -> threading.Thread | None:
        """After this process's first hello (answered or not): with ``preload = "eager"`` the
        background load starts now, so that it does not slow the hello down; with
        ``"when-next"`` nothing loads until the coordinator says this site is next or sends it
        a task. Returns the background load's thread if it started one."""
        if self._preload_decided:
            return None
        self._preload_decided = True
        if self.settings.preload == "eager":
            return self.load_in_background()
        loads = "torch and the base model load" if self.settings.base_model_dir else "torch loads"
        if self.settings.preload == "when-scheduled":
            logger.info("%s when a run this site is in starts (preload = when-scheduled)", loads)
        else:
            logger.info("%s when this site is next (preload = when-next)", loads)
        return None

    def _load_ahead(self, notice: pb.PrepareAhead) -> None:
        """Queues the load of what this site's first visit of a run needs, at a low CPU
        priority (the further ahead, the lower), if ``preload = "when-scheduled"``."""
        if self.settings.preload != "when-scheduled":
            return
        hop = notice.hop
        if hop.task_type in self._trainers:
            return  # loaded: its preparation comes with "you are next"

        def load() -> None:
            with log_context(run_id=hop.run_id, site=self.site_name):
                try:
                    self._hop_setup(hop)  # the run's approval first, then the trainer
                except HopFailure as failure:
                    logger.info("not loading ahead of hop %d: %s", hop.hop_index, failure)
                except (ValueError, OSError) as exc:
                    logger.warning("could not load ahead of hop %d: %s", hop.hop_index, exc)
                else:
                    logger.info("loaded ahead of hop %d of run %s (%d hops ahead)",
                                hop.hop_index, hop.run_id, notice.hops_ahead)  # fmt: skip

        self._loads_ahead.submit(load, ahead_niceness(notice.hops_ahead))

    def stop(self) -> None:
        self._stop.set()
        self._preparations.shutdown(wait=False, cancel_futures=True)
        self._head_keeper.shutdown(wait=False)  # a head received is still kept
        self._loads_ahead.stop()
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def close(self) -> None:
        """After `run`: waits for the work still on the agent's own threads (the ledger heads
        being kept, a preparation under way) so that the process may end without the
        interpreter's exit, which would wait for them too."""
        self._preparations.shutdown(wait=True, cancel_futures=True)
        self._head_keeper.shutdown(wait=True)

    def shutdown(self, grace: float) -> None:
        """Graceful stop (SIGTERM): takes no new task; a hop in training may finish within
        `grace` seconds, after which it is handed back to the coordinator (released, not failed).
        """
        self._grace_deadline = time.monotonic() + grace
        self._draining.set()
        logger.info("shutting down: the current task may finish within %.0f s", grace)
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def _out_of_grace(self) -> bool:
        return self._draining.is_set() and time.monotonic() >= self._grace_deadline

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._draining.is_set()

    def serve_metrics(self) -> int | None:
        """Starts the /metrics port if the settings ask for one; returns the bound port."""
        if self.settings.metrics_port is None:
            return None
        return self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)

    def run(self) -> None:
        """Connects and serves; reconnects with capped exponential backoff until `stop()`.

        Raises:
            HistoryRewritten: The coordinator's ledger lost an event this site acknowledged.
            CertificateRefused: The coordinator refuses (or will refuse) this site's
                certificate: expired, from another CA, revoked. Network faults are retried.
        """
        self._check_certificate()
        while not self._stopping():
            self._check_certificate()
            self._session_started = False
            try:
                self._serve_once()
            except grpc.RpcError as exc:
                if self._stopping():
                    break
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "ledger" in (
                    exc.details() or ""
                ):
                    raise HistoryRewritten(exc.details()) from exc
                self._raise_if_refused(exc)
                self._said_hello()  # the coordinator is away: load as if it had answered
                delay = self.backoff.failed()
                logger.warning(
                    "connection to coordinator lost (%s: %s); retrying in %.2f s",
                    exc.code(),
                    exc.details(),
                    delay,
                )
            else:
                delay = self.backoff.failed()
                logger.info("session with coordinator ended; retrying in %.2f s", delay)
            wait_for_port(self.settings.coordinator, delay, self._stop)

    def _check_certificate(self) -> None:
        problem = local_certificate_problem(self.settings.tls)
        if problem is not None:
            raise CertificateRefused(problem)

    def _raise_if_refused(self, exc: grpc.RpcError) -> None:
        """Stops on a refusal of the hello that retrying cannot cure; transient faults return."""
        if self._session_started:
            return  # refusals of later calls concern that call, not the certificate
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise CertificateRefused(
                f"the coordinator refused this site's certificate: {exc.details()}"
            ) from exc
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return
        details = (exc.details() or "").lower()
        if "socket closed" in details or "handshake" in details:
            reason = probe_handshake(
                self.settings.coordinator, self.settings.tls, self.settings.server_name
            )
            if reason is not None:
                raise CertificateRefused(reason) from exc

    def _hello(self) -> pb.HelloRequest:
        request = pb.HelloRequest(
            agent_version=AGENT_VERSION,
            capabilities=[
                t for t in TASK_TYPES if t not in LORA_TASKS or self.settings.base_model_dir
            ],
            protocol_version=PROTOCOL_VERSION,
            last_ledger_hash=self.state.ledger_head,
            accepts_provisional_hops=True,  # HopRunner holds one until its lease decision
        )
        kept = self.heads.load_or_none()
        if kept is not None:
            request.kept_head.CopyFrom(kept.to_proto())
        if self.settings.base_model_dir is not None:
            if self._base_model_sha256 is None:  # read once: hello never waits for torch
                self._base_model_sha256 = hash_base_model(self.settings.base_model_dir)
            request.base_models.add(
                name=self.settings.base_model_dir.name, sha256=self._base_model_sha256
            )
        for entry in list_registered(self.settings.data_dir):
            counts = entry.get("counts")
            if entry.get("status") != "ok" or not isinstance(counts, dict):
                continue
            request.datasets.add(
                name=str(entry["name"]),
                task=str(entry["task_type"]),
                train_examples=int(counts.get("train", 0)),
                validation_examples=int(counts.get("validation", 0)),
                test_examples=int(counts.get("test", 0)),
                labels=_label_names(entry.get("label_counts")),
            )
        self._add_approvals(request)
        return request

    def _add_approvals(self, request: pb.HelloRequest) -> None:
        request.approved_bundles.extend(self.approvals.approved_hashes())
        request.approval_by_policy = bool(self.approvals.policy.rules)
        request.approval_not_required = not self.settings.require_approval
        for rule in self.approvals.policy.rules:
            request.approval_rules.add(
                task_types=sorted(rule.task_types), datasets=sorted(rule.datasets),
                base_models=sorted(rule.base_models), modes=sorted(rule.modes),
                strategies=sorted(rule.strategies), max_values=dict(rule.max_values),
            )  # fmt: skip

    def _watch_approvals(self, stub: pb_grpc.SiteServiceStub, stop: threading.Event) -> None:
        """Says hello again when this site's approvals change, so preflight knows them."""
        known = self.approvals.approved_hashes()
        while not stop.wait(APPROVAL_POLL_SECONDS):
            current = self.approvals.approved_hashes()
            if current == known:
                continue
            try:
                stub.Hello(self._hello(), timeout=30)
            except grpc.RpcError as exc:
                logger.warning("could not report new approvals: %s", exc.code())
                continue
            known = current
            logger.info("reported %d approved bundle(s) to the coordinator", len(current))

    def _keep_head(self, head: pb.SignedLedgerHead) -> None:
        """Keeps a signed ledger head on a thread of its own, heads in the order received.

        Its signature check and durable write (an fsync) would otherwise hold up the task read
        after it: the coordinator signs a head when a run moves and every 100 events, so now
        and then right after a hop's commit, and the head then reaches the next hop's site just
        before its task.
        """
        try:
            self._head_keeper.submit(self.heads.keep, head)
        except RuntimeError:  # stopped: this head is not kept (the next session sends one)
            logger.debug("ledger head not kept: the agent is stopping")

    def _serve_once(self) -> None:
        with secure_channel(
            self.settings.coordinator, self.settings.tls, server_name=self.settings.server_name
        ) as channel:
            stub = SiteStub(channel)  # bundles move as hand-framed chunk messages
            hello = stub.Hello(self._hello(), timeout=30)
            self._session_started = True
            self.backoff.connected()
            self.site_name = hello.site_name
            logger.info(
                "connected to coordinator %s as site %s", self.settings.coordinator, self.site_name
            )
            self._said_hello()
            if self._beat_threads is not None:
                self._beat_threads.warm()
            days_left = (hello.certificate_expires_at - time.time()) / 86400
            if hello.certificate_expires_at and days_left < CERTIFICATE_WARNING_DAYS:
                logger.warning(
                    "this site's certificate expires in %.0f days: run `baton-site cert renew`",
                    days_left,
                )
            stream = stub.StreamTasks(pb.TaskStreamRequest())
            self._stream = stream
            watching = threading.Event()
            threading.Thread(
                target=self._watch_approvals, args=(stub, watching), name="approvals", daemon=True
            ).start()
            self._queued_tasks.clear()  # a task queued on a stream that ended is re-sent
            try:
                for task in self._tasks(stream):
                    kind = task.WhichOneof("kind")
                    if kind == "hop":
                        self._loads_ahead.hurry()  # needed now: at the agent's priority
                        self._run_hop(stub, task.hop, hello.heartbeat_interval_ms / 1000)
                    elif kind == "evaluation":
                        with log_context(run_id=task.evaluation.run_id, site=self.site_name):
                            self._run_evaluation(stub, task.evaluation)
                    elif kind == "statistics":
                        with log_context(site=self.site_name):
                            self._run_statistics(stub, task.statistics)
                    else:
                        self._take_aside(task)
                    if self._stopping():
                        break
            finally:
                watching.set()
                self._stream = None

    def _tasks(self, stream: Iterator[pb.Task]) -> Iterator[pb.Task]:
        """The stream's messages, those read meanwhile by a hop (`_await_lease_decision`)
        first, in the order they came."""
        while True:
            while self._queued_tasks:
                yield self._queued_tasks.popleft()
            try:
                task = next(stream)
            except StopIteration:
                return
            yield task

    def _take_aside(self, task: pb.Task) -> None:
        """Handles a message that is no work to run: a head, a preparation, a load ahead (a
        lease decision outside its hop's wait is stale: its hop is over)."""
        kind = task.WhichOneof("kind")
        if kind == "ledger_head":
            self._keep_head(task.ledger_head)
        elif kind == "prepare":
            self._loads_ahead.hurry()  # needed now: at the agent's priority
            self._preparations.submit(self._prepare, task.prepare.hop)
        elif kind == "prepare_ahead":
            self._load_ahead(task.prepare_ahead)

    def _await_lease_decision(self, task: pb.HopTask) -> bool:
        stream = cast("Iterator[pb.Task] | None", self._stream)
        if stream is None:
            return False
        while True:
            try:
                message = next(stream)
            except (StopIteration, grpc.RpcError):  # the serve loop meets the same end
                return False
            kind = message.WhichOneof("kind")
            if kind == "lease_decision":
                decision = message.lease_decision
                if decision.hop_id == task.hop_id and decision.lease_token == task.lease_token:
                    return decision.granted
            elif kind in ("hop", "evaluation", "statistics"):
                self._queued_tasks.append(message)  # work: after this hop
            else:
                self._take_aside(message)
