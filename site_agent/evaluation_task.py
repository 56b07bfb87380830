"""Evaluation tasks: an adapter scored on this site's validation or test split."""

from __future__ import annotations

import logging

import grpc

from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from site_agent.task_checks import HopFailure, TaskChecks, _task_spec
from site_agent.transfers import _RETRYABLE, Transfers

logger = logging.getLogger("site_agent.agent")


class EvaluationRunner(TaskChecks, Transfers):
    """Runs the evaluation tasks the coordinator gives this site."""

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
