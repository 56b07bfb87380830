"""The hospital's site agent: dials out, runs the hops it is given, returns adapters.

The agent never listens on a port. It keeps one task stream open, trains one hop at a time, and
sends back only the adapter tensors and aggregate validation metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc

from protocols.checkpoint import (
    CheckpointError,
    CheckpointManifest,
    bundle_metadata,
    inspect_bundle,
    sha256_hex,
)
from protocols.transport import CHUNK_BYTES, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from site_agent._data import DatasetError, TextDataset, load_text_dataset
from site_agent.settings import SiteSettings

if TYPE_CHECKING:
    from site_agent._training import SequenceClassificationTrainer

__all__ = ["AGENT_VERSION", "CAPABILITIES", "HopFailure", "SiteAgent"]

logger = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = 1
CAPABILITIES = ("seq-classification",)


class HopFailure(Exception):
    """A hop this site refuses or cannot complete; reported to the coordinator with its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def phase(self, phase: str) -> None:
        self._progress.phase = phase

    def training_step(self, step: int, total: int, loss: float) -> None:
        self._progress = _Progress("training", step, total, loss)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
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
                continue
            if response.cancel:
                logger.warning("coordinator cancelled hop %s", self._task.hop_id)
                self.cancelled.set()
                return


class SiteAgent:
    """Runs hops for one site until stopped."""

    def __init__(
        self, settings: SiteSettings, trainer: SequenceClassificationTrainer | None = None
    ) -> None:
        self.settings = settings
        self._trainer = trainer
        self._stop = threading.Event()
        self._stream: grpc.Call | None = None
        self._datasets: dict[tuple[str, tuple[str, ...], float], TextDataset] = {}
        self.site_name = ""

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def trainer(self) -> SequenceClassificationTrainer:
        """The trainer, with the base model loaded once per process."""
        if self._trainer is None:
            from site_agent._training import SequenceClassificationTrainer

            self._trainer = SequenceClassificationTrainer(
                self.settings.base_model_dir,
                device=self.settings.device,
                num_threads=self.settings.num_threads,
                max_length=self.settings.max_length,
            )
        return self._trainer

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def run(self) -> None:
        """Connects and serves; reconnects with capped exponential backoff until `stop()`."""
        _ = self.trainer.base_model_sha256  # load and hash the base model before saying hello
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._serve_once()
                delay = 0.5
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    break
                logger.warning(
                    "connection to coordinator lost (%s: %s); retrying in %.1f s",
                    exc.code(),
                    exc.details(),
                    delay,
                )
            self._stop.wait(delay)
            delay = min(delay * 2, self.settings.reconnect_max_seconds)

    def _hello(self) -> pb.HelloRequest:
        request = pb.HelloRequest(
            agent_version=AGENT_VERSION,
            capabilities=list(CAPABILITIES),
            protocol_version=PROTOCOL_VERSION,
        )
        request.base_models.add(
            name=self.settings.base_model_dir.name, sha256=self.trainer.base_model_sha256
        )
        for path in sorted(self.settings.data_dir.glob("*.jsonl")):
            try:
                dataset = self._dataset(path.stem, ())
            except DatasetError as exc:
                logger.error("dataset %s is not usable: %s", path.stem, exc)
                continue
            request.datasets.add(
                name=path.stem,
                task="seq-classification",
                train_examples=len(dataset.train),
                validation_examples=len(dataset.validation),
            )
        return request

    def _serve_once(self) -> None:
        with secure_channel(
            self.settings.coordinator, self.settings.tls, server_name=self.settings.server_name
        ) as channel:
            stub = pb_grpc.SiteServiceStub(channel)
            hello = stub.Hello(self._hello(), timeout=30)
            self.site_name = hello.site_name
            logger.info(
                "connected to coordinator %s as site %s",
                self.settings.coordinator,
                hello.site_name,
            )
            stream = stub.StreamTasks(pb.TaskStreamRequest())
            self._stream = stream
            try:
                for task in stream:
                    if task.WhichOneof("kind") == "hop":
                        self._run_hop(stub, task.hop, hello.heartbeat_interval_ms / 1000)
                    if self._stop.is_set():
                        break
            finally:
                self._stream = None

    # ---- one hop ------------------------------------------------------------------------------

    def _run_hop(self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, interval: float) -> None:
        logger.info("hop %d of run %s: starting", task.hop_index, task.run_id)
        with _Heartbeat(stub, task, interval) as beat:
            try:
                result = self._train_hop(stub, task, beat)
            except HopFailure as failure:
                logger.error("hop %s refused: %s (%s)", task.hop_id, failure, failure.code)
                result = pb.HopResult(
                    hop_id=task.hop_id,
                    lease_token=task.lease_token,
                    ok=False,
                    error_code=failure.code,
                    error_message=str(failure),
                )
        if result is None:
            return
        response = stub.ReportHopResult(result, timeout=60)
        logger.info("hop %d of run %s: %s", task.hop_index, task.run_id, response.hop_status)

    def _dataset(self, name: str, labels: tuple[str, ...]) -> TextDataset:
        path = self.settings.data_dir / f"{name}.jsonl"
        if not path.is_file():
            raise HopFailure("dataset-missing", f"this site has no dataset named {name!r}")
        key = (name, labels, path.stat().st_mtime)
        if key not in self._datasets:
            self._datasets[key] = load_text_dataset(
                path,
                labels=labels or None,
                validation_fraction=self.settings.validation_fraction,
                seed=self.settings.split_seed,
                name=name,
            )
        return self._datasets[key]

    def _download(self, stub: pb_grpc.SiteServiceStub, ref: pb.CheckpointRef) -> bytes:
        buffer = bytearray()
        for chunk in stub.DownloadCheckpoint(pb.DownloadRequest(sha256=ref.sha256), timeout=600):
            if chunk.offset != len(buffer) or chunk.total_size != ref.size:
                raise HopFailure("checkpoint-integrity", "download chunks out of order or resized")
            buffer += chunk.data
        return bytes(buffer)

    def _train_hop(
        self, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, beat: _Heartbeat
    ) -> pb.HopResult | None:
        import safetensors.torch

        from site_agent._training import HopCancelled, HopHyperparameters, LoraSettings

        if task.task_type not in CAPABILITIES:
            raise HopFailure("unsupported-task", f"this site cannot run {task.task_type!r} tasks")
        trainer = self.trainer
        if task.base_model_sha256 and task.base_model_sha256 != trainer.base_model_sha256:
            raise HopFailure(
                "base-model-mismatch",
                f"run is pinned to base model {task.base_model_sha256}; this site holds "
                f"{trainer.base_model_sha256}",
            )
        try:
            dataset = self._dataset(task.dataset, tuple(task.labels))
        except DatasetError as exc:
            raise HopFailure("dataset-invalid", str(exc)) from exc

        incoming = None
        parent = ""
        if task.HasField("input_checkpoint"):
            beat.phase("downloading")
            parent = task.input_checkpoint.sha256
            data = self._download(stub, task.input_checkpoint)
            try:
                bundle = inspect_bundle(data, expected_sha256=parent)
            except CheckpointError as exc:
                raise HopFailure("checkpoint-integrity", str(exc)) from exc
            if bundle.manifest.base_model_sha256 != trainer.base_model_sha256:
                raise HopFailure(
                    "base-model-mismatch",
                    f"incoming adapter was trained on base model "
                    f"{bundle.manifest.base_model_sha256}; this site holds "
                    f"{trainer.base_model_sha256}",
                )
            incoming = safetensors.torch.load(data)

        hp = task.hyperparameters
        beat.phase("training")
        try:
            outcome = trainer.run_hop(
                dataset,
                tuple(task.labels),
                LoraSettings(
                    r=task.lora.r,
                    alpha=task.lora.alpha,
                    dropout=task.lora.dropout,
                    target_modules=tuple(task.lora.target_modules),
                ),
                HopHyperparameters(
                    learning_rate=hp.learning_rate,
                    steps=hp.steps,
                    batch_size=hp.batch_size,
                    weight_decay=hp.weight_decay,
                    warmup_steps=hp.warmup_steps,
                    max_grad_norm=hp.max_grad_norm,
                    seed=hp.seed,
                ),
                incoming,
                progress=beat.training_step,
                should_cancel=lambda: beat.cancelled.is_set() or self._stop.is_set(),
            )
        except HopCancelled:
            logger.warning("hop %s cancelled; no result is reported", task.hop_id)
            return None
        except ValueError as exc:
            raise HopFailure("training-failed", str(exc)) from exc

        beat.phase("uploading")
        manifest = CheckpointManifest(
            task_type=task.task_type,
            base_model_sha256=trainer.base_model_sha256,
            run_id=task.run_id,
            hop_id=task.hop_id,
            producer_site=self.site_name,
            parent_sha256=parent,
            created_at=datetime.now(UTC).isoformat(),
        )
        payload = safetensors.torch.save(
            outcome.tensors, metadata=bundle_metadata(manifest, outcome.adapter_config)
        )
        # Egress check: what leaves the site is exactly a well-formed, finite bundle.
        try:
            inspect_bundle(payload)
        except CheckpointError as exc:
            raise HopFailure("egress-refused", str(exc)) from exc
        uploaded = stub.UploadCheckpoint(self._upload_messages(task, payload), timeout=600)
        return pb.HopResult(
            hop_id=task.hop_id,
            lease_token=task.lease_token,
            ok=True,
            output_checkpoint=uploaded.checkpoint,
            metrics=outcome.metrics,
            train_started_at_ns=outcome.train_started_at_ns,
            train_finished_at_ns=outcome.train_finished_at_ns,
        )

    @staticmethod
    def _upload_messages(task: pb.HopTask, payload: bytes) -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(
            header=pb.UploadHeader(
                hop_id=task.hop_id,
                lease_token=task.lease_token,
                total_size=len(payload),
                sha256=sha256_hex(payload),
            )
        )
        view = memoryview(payload)
        for start in range(0, len(payload), CHUNK_BYTES):
            yield pb.UploadRequest(data=bytes(view[start : start + CHUNK_BYTES]))
