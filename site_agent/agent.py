"""The hospital's site agent: dials out, runs the hops it is given, returns adapters.

The agent never listens on a port. It keeps one task stream open, runs one task at a time, and
sends back only the declared trainable tensors and aggregate metrics. A finished hop's upload and
result are retried while the coordinator is away, so a coordinator restart loses no work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from protocols import hyperparameter_messages
from protocols.approval import ApprovalBundle, BundleViolation
from protocols.checkpoint import (
    AGGREGATOR,
    CheckpointError,
    CheckpointManifest,
    bundle_metadata,
    inspect_bundle,
    sha256_hex,
)
from protocols.logs import log_context
from protocols.signing import (
    SignatureError,
    sign_digest,
    verify_aggregate_custody,
    verify_custody,
)
from protocols.task_types import LORA_TASK_TYPES
from protocols.transport import CHUNK_BYTES, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from protocols.version import BATON_VERSION, PROTOCOL_VERSION
from site_agent.approvals import ApprovalPolicy, ApprovalStore
from site_agent.base_model import hash_base_model
from site_agent.examples import TASK_TYPES, DatasetError
from site_agent.heads import HEAD_FILE, KeptHead
from site_agent.metrics import SiteMetrics
from site_agent.reconnect import ReconnectBackoff
from site_agent.refusal import CertificateRefused, local_certificate_problem, probe_handshake
from site_agent.registry import RegisteredDataset, list_registered, load_registered
from site_agent.releases import ReleaseLimits, ReleaseRefused, StatisticsReleases
from site_agent.settings import SiteSettings
from site_agent.state import SiteState

if TYPE_CHECKING:
    import torch

    from site_agent.tasks import TaskSpec, Trainer

__all__ = ["AGENT_VERSION", "CertificateRefused", "HistoryRewritten", "HopFailure", "SiteAgent"]

logger = logging.getLogger(__name__)

AGENT_VERSION = BATON_VERSION
LORA_TASKS = LORA_TASK_TYPES
CERTIFICATE_WARNING_DAYS = 30
APPROVAL_POLL_SECONDS = 1.0  # how soon a `baton-site approve` reaches the coordinator
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
# A finished result is asked about at least this often: a coordinator whose disk was full
# takes it within seconds of space being freed.
_RESULT_RETRY_MAX_DELAY = 5.0
T = TypeVar("T")
Metrics = dict[str, float]


class HopFailure(Exception):
    """A task this site refuses or cannot complete; reported to the coordinator with its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class HistoryRewritten(RuntimeError):
    """The coordinator no longer holds the ledger event this site acknowledged."""


@dataclass
class _Progress:
    phase: str = "starting"
    step: int = 0
    total: int = 0
    loss: float = 0.0


class _Heartbeat:
    """Sends progress on a background thread; remembers if the coordinator asked to cancel."""

    def __init__(self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, interval: float) -> None:
        self._stub = stub
        self._task = task
        self._interval = interval
        self._progress = _Progress()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def phase(self, phase: str) -> None:
        self._progress = _Progress(phase, self._progress.step, self._progress.total)
        # Phase changes are worth telling at once (e.g. "training" starts), but from the
        # heartbeat thread: the hop does not wait for the coordinator's answer.
        self._wake.set()

    def training_step(self, step: int, total: int, loss: float) -> None:
        self._progress = _Progress("training", step, total, loss)

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
        while not self.cancelled.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._send()


def _label_names(label_counts: object) -> list[str]:
    """The label names of a registered dataset's splits (counts stay at the site)."""
    if not isinstance(label_counts, dict):
        return []
    return sorted({str(label) for split in label_counts.values() if isinstance(split, dict)
                   for label in split})  # fmt: skip


def _task_spec(task_type: str, labels: Any, lora: pb.LoraConfig, options_json: str) -> TaskSpec:
    from site_agent.tasks import LoraSettings, TaskSpec

    try:
        options = json.loads(options_json) if options_json else {}
    except ValueError as exc:
        raise HopFailure("bad-task", f"task options are not JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise HopFailure("bad-task", "task options must be a JSON object")
    return TaskSpec(
        task_type=task_type,
        labels=tuple(labels),
        lora=LoraSettings(
            r=lora.r or 8,
            alpha=lora.alpha or 16,
            dropout=lora.dropout,
            target_modules=tuple(lora.target_modules) or ("query", "value"),
        ),
        options=options,
    )


class SiteAgent:
    """Runs tasks for one site until stopped."""

    def __init__(self, settings: SiteSettings) -> None:
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
        self._trainers_lock = threading.Lock()  # the background load and a task may race
        self._base_model_sha256: str | None = None
        # "You are next" preparations run here, one at a time, beside the task stream.
        self._preparations = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._stop = threading.Event()
        self._stream: grpc.Call | None = None
        self.site_name = ""
        self.metrics = SiteMetrics()
        self._draining = threading.Event()  # SIGTERM: no new task; the current one may finish
        self._grace_deadline = 0.0
        self.backoff = ReconnectBackoff(maximum=settings.reconnect_max_seconds)
        self._session_started = False
        # Set by a hop whose validation pass runs after its commit (see _report_validation).
        self._deferred_validation: Callable[[], Metrics] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def trainer(self, task_type: str) -> Trainer:
        """The trainer of a task type, created once per process (base model loaded once)."""
        if task_type not in TASK_TYPES:
            raise HopFailure("unsupported-task", f"this site cannot run {task_type!r} tasks")
        if task_type in LORA_TASKS and self.settings.base_model_dir is None:
            raise HopFailure("no-base-model", f"this site has no base model for {task_type}")
        with self._trainers_lock:
            if task_type not in self._trainers:
                from site_agent.tasks import create_trainer

                self._trainers[task_type] = create_trainer(
                    task_type,
                    base_model_dir=self.settings.base_model_dir
                    if task_type in LORA_TASKS
                    else None,
                    device=self.settings.device,
                    num_threads=self.settings.num_threads,
                )
            return self._trainers[task_type]

    def load_in_background(self) -> threading.Thread:
        """Imports torch (and loads the base model's tokenizer and config, if the site has one)
        on a thread, so the agent says hello at once; a task that needs the trainer waits."""
        task_type = "seq-classification" if self.settings.base_model_dir else "tabular"

        def load() -> None:
            try:
                self.trainer(task_type)
            except Exception as exc:  # reported again, with its code, when a task needs it
                logger.warning("could not preload the base model: %s", exc)
            else:
                logger.info("%s trainer loaded", task_type)

        thread = threading.Thread(target=load, name="preload", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._preparations.shutdown(wait=False, cancel_futures=True)
        stream = self._stream
        if stream is not None:
            stream.cancel()

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
        if self.settings.preload:
            self.load_in_background()
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
            self._stop.wait(delay)

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

    def _serve_once(self) -> None:
        with secure_channel(
            self.settings.coordinator, self.settings.tls, server_name=self.settings.server_name
        ) as channel:
            stub = pb_grpc.SiteServiceStub(channel)
            hello = stub.Hello(self._hello(), timeout=30)
            self._session_started = True
            self.backoff.connected()
            self.site_name = hello.site_name
            logger.info(
                "connected to coordinator %s as site %s", self.settings.coordinator, self.site_name
            )
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
            try:
                for task in stream:
                    kind = task.WhichOneof("kind")
                    if kind == "hop":
                        self._run_hop(stub, task.hop, hello.heartbeat_interval_ms / 1000)
                    elif kind == "evaluation":
                        with log_context(run_id=task.evaluation.run_id, site=self.site_name):
                            self._run_evaluation(stub, task.evaluation)
                    elif kind == "statistics":
                        with log_context(site=self.site_name):
                            self._run_statistics(stub, task.statistics)
                    elif kind == "ledger_head":
                        self.heads.keep(task.ledger_head)
                    elif kind == "prepare":
                        self._preparations.submit(self._prepare, task.prepare.hop)
                    if self._stopping():
                        break
            finally:
                watching.set()
                self._stream = None

    # ---- calls that outlive a coordinator restart -------------------------------------------

    def _retrying(
        self, what: str, call: Callable[[], T], *, lease_lost: threading.Event | None = None
    ) -> T:
        """Retries `call` while the coordinator is unreachable or cannot store (e.g. its disk is
        full), with backoff, up to result_retry_seconds and, for a hop, while its lease holds."""
        deadline = time.monotonic() + self.settings.result_retry_seconds
        delay = 0.5
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE or time.monotonic() > deadline:
                    raise
                if lease_lost is not None and lease_lost.is_set():
                    raise
                logger.warning("%s not taken by the coordinator now (%s: %s); again in %.1f s",
                               what, exc.code().name, exc.details(), delay)  # fmt: skip
                if self._stop.wait(delay) or self._out_of_grace():
                    raise
                delay = min(delay * 2, self.settings.reconnect_max_seconds, _RESULT_RETRY_MAX_DELAY)

    def _download(self, stub: pb_grpc.SiteServiceStub, ref: pb.CheckpointRef) -> bytes:
        """Downloads a bundle, resuming from the last received byte after an interruption."""
        buffer = bytearray()

        def fetch() -> bytes:
            request = pb.DownloadRequest(sha256=ref.sha256, offset=len(buffer))
            for chunk in stub.DownloadCheckpoint(request, timeout=600):
                if chunk.offset != len(buffer) or chunk.total_size != ref.size:
                    raise HopFailure("checkpoint-integrity", "download chunks out of order")
                buffer.extend(chunk.data)
            return bytes(buffer)

        data = self._retrying("download", fetch)
        self.metrics.checkpoint_bytes.labels(direction="download").inc(len(data))
        return self._checked_bundle(data, ref)

    def _checked_bundle(self, data: bytes, ref: pb.CheckpointRef) -> bytes:
        """The bundle if it is the one referenced and its producer's custody signature holds."""
        try:
            bundle = inspect_bundle(data, expected_sha256=ref.sha256)
            ca_pem = self.settings.ca_certificate.read_bytes()
            if bundle.manifest.producer_site == AGGREGATOR:  # a round's aggregate
                verify_aggregate_custody(
                    bundle.sha256, ref.signature, ref.producer_certificate, ca_pem=ca_pem
                )
            else:
                verify_custody(
                    bundle.sha256,
                    ref.signature,
                    ref.producer_certificate,
                    ca_pem=ca_pem,
                    producer=bundle.manifest.producer_site,
                )
        except (CheckpointError, SignatureError) as exc:
            raise HopFailure("checkpoint-integrity", str(exc)) from exc
        return data

    # ---- one hop ------------------------------------------------------------------------------

    def _run_hop(self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, interval: float) -> None:
        with log_context(run_id=task.run_id, hop_id=task.hop_id, site=self.site_name):
            self._run_hop_logged(stub, task, interval)

    def _run_hop_logged(
        self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, interval: float
    ) -> None:
        logger.info("hop %d of run %s: starting", task.hop_index, task.run_id)
        with _Heartbeat(stub, task, interval) as beat:
            try:
                result = self._train_hop(stub, task, beat)
            except HopFailure as failure:
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
                return
            # Still heartbeating: the lease holds while the coordinator cannot take the result.
            response = self._report_hop_result(stub, task, result, beat)
            if response is None:
                return
        if response.ledger_head:
            self.state.acknowledge(response.ledger_head)
        if result.ok:
            self.metrics.hop("trained")
        logger.info("hop %d of run %s: %s", task.hop_index, task.run_id, response.hop_status)
        validate, self._deferred_validation = self._deferred_validation, None
        if validate is not None and result.validation_follows:
            self._report_validation(stub, task, validate)

    def _report_hop_result(
        self,
        stub: pb_grpc.SiteServiceStub,
        task: pb.HopTask,
        result: pb.HopResult,
        beat: _Heartbeat,
    ) -> pb.HopResultResponse | None:
        """Reports a hop's result, retrying while the coordinator cannot take it; None: refused."""
        try:
            response: pb.HopResultResponse = self._retrying(
                "hop result",
                lambda: stub.ReportHopResult(result, timeout=60),
                lease_lost=beat.cancelled,
            )
        except grpc.RpcError as exc:
            if beat.cancelled.is_set():
                logger.error("hop %s: lease lost before the coordinator took its result (%s)",
                             task.hop_id, exc.details())  # fmt: skip
                return None
            if exc.code() in _RETRYABLE:
                raise
            logger.error("hop %s result refused: %s %s", task.hop_id, exc.code(), exc.details())
            return None
        return response

    def _check_approval(
        self,
        task: pb.HopTask | pb.EvaluationTask,
        hyperparameters: Mapping[str, object] | None,
    ) -> None:
        """Refuses a task unless it matches its run's bundle and that bundle is approved here.

        Runs before anything is loaded: an unapproved run never touches this site's data.
        """
        if not task.approval_bundle_json:
            raise HopFailure("not-approved", "the task carries no approval bundle")
        try:
            bundle = ApprovalBundle.from_json(task.approval_bundle_json)
            if hyperparameters is not None:
                bundle.check_hyperparameters(hyperparameters)
            if isinstance(task, pb.HopTask):
                bundle.check_round(task.round)
        except BundleViolation as exc:
            raise HopFailure("not-approved", f"task leaves its run's bundle: {exc}") from exc
        lora = {
            "r": task.lora.r,
            "alpha": task.lora.alpha,
            "dropout": task.lora.dropout,
            "target_modules": list(task.lora.target_modules),
        }
        expected: dict[str, tuple[object, object]] = {
            "task type": (bundle.task_type, task.task_type),
            "dataset": (bundle.dataset, task.dataset),
            "labels": (tuple(bundle.labels), tuple(task.labels)),
            "options": (dict(bundle.options), json.loads(task.task_options_json or "{}")),
        }
        if bundle.is_statistics:
            raise HopFailure("not-approved", "a statistics bundle does not cover training")
        expected["cross-validation"] = (
            dict(bundle.cross_validation),
            {
                "folds": task.cross_validation.folds,
                "min_validation_rows": task.cross_validation.min_validation_rows,
            }
            if task.HasField("cross_validation")
            else {},
        )
        if bundle.base_model_sha256:
            expected["base model"] = (bundle.base_model_sha256, task.base_model_sha256)
        if bundle.task_type != "tabular":
            expected["LoRA configuration"] = (dict(bundle.lora), lora)
        for what, (approved, actual) in expected.items():
            if approved != actual:
                raise HopFailure("not-approved", f"task {what} differs from its run's bundle")
        if self.settings.require_approval and not self.approvals.is_approved(bundle):
            raise HopFailure(
                "not-approved",
                f"run bundle {bundle.sha256} is not approved at this site; review it with "
                f"`baton-site approvals` and approve it with `baton-site approve {bundle.sha256}`",
            )

    def _task_trainer(self, task_type: str, cross_validation: pb.CrossValidation | None) -> Trainer:
        """The task type's trainer; for a cross-validation run, wrapped to train every fold."""
        trainer = self.trainer(task_type)
        if cross_validation is None:
            return trainer
        from site_agent.tasks import CrossValidatedTrainer

        try:
            return CrossValidatedTrainer(
                trainer, cross_validation.folds, cross_validation.min_validation_rows
            )
        except ValueError as exc:
            raise HopFailure("bad-task", str(exc)) from exc

    def _dataset(self, name: str, task_type: str) -> RegisteredDataset:
        try:
            dataset = load_registered(self.settings.data_dir, name)
        except DatasetError as exc:
            raise HopFailure("dataset-invalid", str(exc)) from exc
        if dataset.task_type != task_type:
            raise HopFailure(
                "dataset-invalid",
                f"dataset {name!r} is registered for {dataset.task_type}, not {task_type}",
            )
        return dataset

    @staticmethod
    def _model_sha256(trainer: Trainer, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        """What a run pins: the base model's hash (LoRA tasks) or the architecture's (tabular)."""
        try:
            return trainer.model_sha256(spec, dataset)
        except ValueError as exc:
            raise HopFailure("bad-task", str(exc)) from exc

    def _check_base_model(self, held: str, pinned: str) -> None:
        if pinned and pinned != held:
            raise HopFailure(
                "base-model-mismatch",
                f"run is pinned to base model {pinned}; this site holds {held}",
            )

    def _incoming(
        self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, held: str
    ) -> dict[str, torch.Tensor]:
        import safetensors.torch

        ref = task.input_checkpoint
        if task.input_bundle:  # pushed inside the task: checked exactly as a download
            data = self._checked_bundle(task.input_bundle, ref)
            self.metrics.checkpoint_bytes.labels(direction="download").inc(len(data))
        else:
            data = self._download(stub, ref)
        bundle = inspect_bundle(data)
        if bundle.manifest.base_model_sha256 != held:
            raise HopFailure(
                "base-model-mismatch",
                f"incoming adapter was trained on base model {bundle.manifest.base_model_sha256}; "
                f"this site holds {held}",
            )
        return safetensors.torch.load(data)

    def _train_hop(
        self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, beat: _Heartbeat
    ) -> pb.HopResult | None:
        import safetensors.torch

        from site_agent.tasks import HopCancelled, PreparingTrainer

        self._deferred_validation = None
        try:
            hyperparameters = hyperparameter_messages.from_message(task.hyperparameters)
        except hyperparameter_messages.HyperparameterMessageError as exc:
            raise HopFailure("bad-task", f"invalid hyperparameters: {exc}") from exc
        self._check_approval(task, hyperparameters.model_dump())
        spec = _task_spec(task.task_type, task.labels, task.lora, task.task_options_json)
        trainer = self._task_trainer(
            task.task_type, task.cross_validation if task.HasField("cross_validation") else None
        )
        dataset = self._dataset(task.dataset, task.task_type)
        held = self._model_sha256(trainer, spec, dataset)
        self._check_base_model(held, task.base_model_sha256)
        incoming = None
        parent = ""
        if task.HasField("input_checkpoint"):
            if not task.input_bundle:
                beat.phase("downloading")
            parent = task.input_checkpoint.sha256
            incoming = self._incoming(stub, task, held)

        beat.phase("training")

        def should_cancel() -> bool:
            return beat.cancelled.is_set() or self._stop.is_set() or self._out_of_grace()

        try:
            if self._validates_after_commit(task, trainer):
                assert isinstance(trainer, PreparingTrainer)
                outcome = trainer.run_hop(spec, dataset, hyperparameters, incoming,
                                          beat.training_step, should_cancel,
                                          defer_validation=True)  # fmt: skip
            else:
                outcome = trainer.run_hop(
                    spec, dataset, hyperparameters, incoming, beat.training_step, should_cancel
                )
        except HopCancelled:
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

        beat.phase("uploading")
        manifest = CheckpointManifest(
            task_type=task.task_type,
            base_model_sha256=held,
            run_id=task.run_id,
            hop_id=task.hop_id,
            producer_site=self.site_name,
            parent_sha256=parent,
            created_at=datetime.now(UTC).isoformat(),
        )
        payload = safetensors.torch.save(
            outcome.tensors, metadata=bundle_metadata(manifest, outcome.adapter_config)
        )
        self._check_egress(trainer, spec, dataset, payload, self.settings.max_upload_bytes)
        header = pb.UploadHeader(
            hop_id=task.hop_id,
            lease_token=task.lease_token,
            total_size=len(payload),
            sha256=sha256_hex(payload),
            signature=sign_digest(self.settings.private_key.read_bytes(), sha256_hex(payload)),
        )

        attempts = 0

        def upload() -> pb.UploadResponse:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # a first attempt starts at 0: no round trip to ask
                # Resume from whatever the coordinator already holds of this upload.
                header.offset = stub.UploadStatus(header, timeout=30).received
            response: pb.UploadResponse = stub.UploadCheckpoint(
                self._upload_messages(header, payload), timeout=600
            )
            self.metrics.checkpoint_bytes.labels(direction="upload").inc(
                len(payload) - header.offset
            )
            return response

        uploaded = self._retrying("upload", upload, lease_lost=beat.cancelled)
        self._deferred_validation = outcome.validate
        return pb.HopResult(
            hop_id=task.hop_id,
            lease_token=task.lease_token,
            ok=True,
            output_checkpoint=uploaded.checkpoint,
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
        self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, validate: Callable[[], Metrics]
    ) -> None:
        """Runs a committed hop's validation pass and reports it as its own ledger event.

        The hop is committed whatever happens here: a failed pass is reported as such, and a
        coordinator that is away is retried like a hop result.
        """
        report = pb.HopValidation(hop_id=task.hop_id)
        try:
            report.metrics.update(validate())
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
                try:
                    hyperparameters = hyperparameter_messages.from_message(hop.hyperparameters)
                except hyperparameter_messages.HyperparameterMessageError as exc:
                    raise HopFailure("bad-task", f"invalid hyperparameters: {exc}") from exc
                self._check_approval(hop, hyperparameters.model_dump())
                spec = _task_spec(hop.task_type, hop.labels, hop.lora, hop.task_options_json)
                trainer = self._task_trainer(
                    hop.task_type,
                    hop.cross_validation if hop.HasField("cross_validation") else None,
                )
                if not isinstance(trainer, PreparingTrainer):
                    return
                dataset = self._dataset(hop.dataset, hop.task_type)
                self._check_base_model(
                    self._model_sha256(trainer, spec, dataset), hop.base_model_sha256
                )
                trainer.prepare(spec, dataset, hyperparameters.seed)
            except HopFailure as failure:
                logger.info("not preparing hop %d: %s", hop.hop_index, failure)
            except (ValueError, OSError) as exc:
                logger.warning("could not prepare hop %d: %s", hop.hop_index, exc)
            else:
                logger.info("hop %d of run %s: prepared", hop.hop_index, hop.run_id)

    @staticmethod
    def _check_egress(
        trainer: Trainer,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        payload: bytes,
        max_bytes: int,
    ) -> None:
        """Only a well-formed, finite bundle of exactly the declared trainable state leaves."""
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

    @staticmethod
    def _upload_messages(header: pb.UploadHeader, payload: bytes) -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        view = memoryview(payload)
        for start in range(header.offset, len(payload), CHUNK_BYTES):
            yield pb.UploadRequest(data=bytes(view[start : start + CHUNK_BYTES]))

    # ---- evaluation ---------------------------------------------------------------------------

    def _run_evaluation(self, stub: pb_grpc.SiteServiceStub, task: pb.EvaluationTask) -> None:
        import safetensors.torch

        logger.info("evaluation %s of run %s on %s", task.evaluation_id, task.run_id, task.split)
        result = pb.EvaluationResult(evaluation_id=task.evaluation_id, lease_token=task.lease_token)
        try:
            if task.split not in ("validation", "test"):
                raise HopFailure("bad-task", f"unknown split {task.split!r}")
            self._check_approval(task, None)
            spec = _task_spec(task.task_type, task.labels, task.lora, task.task_options_json)
            trainer = self._task_trainer(
                task.task_type,
                task.cross_validation if task.HasField("cross_validation") else None,
            )
            dataset = self._dataset(task.dataset, task.task_type)
            self._check_base_model(
                self._model_sha256(trainer, spec, dataset), task.base_model_sha256
            )
            tensors = safetensors.torch.load(self._download(stub, task.checkpoint))
            try:
                metrics = trainer.evaluate(spec, dataset, task.split, tensors)  # type: ignore[arg-type]
            except ValueError as exc:
                raise HopFailure("evaluation-failed", str(exc)) from exc
            result.ok = True
            result.metrics.update(metrics)
        except HopFailure as failure:
            logger.error("evaluation %s refused: %s", task.evaluation_id, failure)
            result.ok = False
            result.error_code = failure.code
            result.error_message = str(failure)
        try:
            self._retrying("evaluation result", lambda: stub.ReportEvaluation(result, timeout=60))
        except grpc.RpcError as exc:
            if exc.code() in _RETRYABLE:
                raise
            logger.error("evaluation result refused: %s %s", exc.code(), exc.details())

    # ---- aggregate statistics ----------------------------------------------------------------

    def _check_statistics_approval(self, task: pb.StatisticsTask) -> None:
        """Refuses a statistics request unless it matches its bundle and that is approved."""
        try:
            bundle = ApprovalBundle.from_json(task.approval_bundle_json)
        except BundleViolation as exc:
            raise HopFailure("not-approved", str(exc)) from exc
        expected = ApprovalBundle.for_statistics(
            task.task_type, task.dataset, min_count=task.min_count, noise_std=task.noise_std
        )
        if bundle != expected:
            raise HopFailure("not-approved", "the statistics request differs from its bundle")
        if self.settings.require_approval and not self.approvals.is_approved(bundle):
            raise HopFailure(
                "not-approved",
                f"statistics bundle {bundle.sha256} is not approved at this site; review it "
                f"with `baton-site approvals` and approve it with "
                f"`baton-site approve {bundle.sha256}`",
            )

    def _check_statistics_expiry(self, task: pb.StatisticsTask) -> None:
        """Refuses a statistics request past its expiry (by this site's clock, with tolerance)."""
        now = time.time()
        if task.expires_at and now > task.expires_at + self.settings.clock_skew_seconds:
            expired = datetime.fromtimestamp(task.expires_at, UTC).isoformat(timespec="seconds")
            raise HopFailure(
                "statistics-expired",
                f"the statistics request expired at {expired} (this site's clock is "
                f"{now - task.expires_at:.0f} s later; tolerance "
                f"{self.settings.clock_skew_seconds:g} s)",
            )

    def _run_statistics(self, stub: pb_grpc.SiteServiceStub, task: pb.StatisticsTask) -> None:
        from site_agent.releases import answer_request
        from site_agent.statistics import BelowMinimumCount

        logger.info("statistics %s of dataset %s", task.statistics_id, task.dataset)
        result = pb.StatisticsResult(statistics_id=task.statistics_id, lease_token=task.lease_token)
        try:
            self._check_statistics_expiry(task)
            self._check_statistics_approval(task)
            dataset = self._dataset(task.dataset, task.task_type)
            try:
                aggregates = answer_request(
                    dataset,
                    self.releases,
                    min_count=max(task.min_count, self.settings.min_aggregate_rows),
                    noise_std=task.noise_std,
                    base_model_dir=self.settings.base_model_dir,
                )
            except BelowMinimumCount as exc:
                raise HopFailure("below-minimum-count", str(exc)) from exc
            except ReleaseRefused as exc:
                raise HopFailure(exc.code, str(exc)) from exc
            except ValueError as exc:
                raise HopFailure("statistics-failed", str(exc)) from exc
            result.ok = True
            result.count = aggregates.count
            result.feature_names.extend(aggregates.feature_names)
            result.feature_sums.extend(aggregates.feature_sums)
            result.feature_sums_of_squares.extend(aggregates.feature_sums_of_squares)
            result.label_counts.update(aggregates.label_counts)
            result.length_bin_edges.extend(aggregates.length_bin_edges)
            result.length_histogram.extend(aggregates.length_histogram)
            result.length_unit = aggregates.length_unit
        except HopFailure as failure:
            logger.error("statistics %s refused: %s", task.statistics_id, failure)
            result.ok = False
            result.error_code = failure.code
            result.error_message = str(failure)
        try:
            self._retrying("statistics result", lambda: stub.ReportStatistics(result, timeout=60))
        except grpc.RpcError as exc:
            if exc.code() in _RETRYABLE:
                raise
            logger.error("statistics result refused: %s %s", exc.code(), exc.details())
