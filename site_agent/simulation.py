"""Baselines simulated in one process with the sites' own ``Trainer`` code: Baton's sequential
schedule, one site alone, pooled data, FedAvg aggregated by Flower, and k-fold cross-validation.

Every schedule trains through ``Trainer.run_hop`` exactly as a site agent does, and weights move
between hops as the tensors a hop returns, so a simulated run differs from a real one only in
transport. FedAvg is driven by Flower's own message-API strategy (``flwr.serverapp.strategy``):
its round loop, its ``configure_train`` and its example-weighted ``aggregate_train``, with the
sites answering as one Flower ``ClientApp`` behind an in-process grid (Flower's own simulation
engine needs Ray). Flower is imported only when FedAvg runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from site_agent.examples import TabularExample, TextExample
from site_agent.registry import RegisteredDataset
from site_agent.tasks import HopHyperparameters, HopOutcome, TaskSpec, Trainer
from site_agent.tasks._metrics import COUNT_KEYS, pool_metrics

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

__all__ = [
    "CrossValidationResult",
    "EvaluationSplit",
    "FederatedResult",
    "FederatedRound",
    "HopRecord",
    "HyperparameterSchedule",
    "SequentialResult",
    "TrainSchedule",
    "collapse_reason",
    "cross_validate",
    "cross_validate_cycles",
    "cyclic_visits",
    "divergence_reason",
    "evaluate_sites",
    "flower_logs_held_back",
    "pool_metrics",
    "pooled_dataset",
    "pooled_normalisation_spec",
    "pooled_normaliser",
    "prediction_shares",
    "record_from_tensors",
    "tensors_from_record",
    "train_fedavg",
    "train_local",
    "train_pooled",
    "train_sequential",
]

logger = logging.getLogger(__name__)

EvaluationSplit = Literal["validation", "test"]
# Hyperparameters of one FedAvg client update: (round, counted from 1; site name) -> settings.
HyperparameterSchedule = Callable[[int, str], HopHyperparameters]
# Trains one schedule on the sites' datasets (in the order given) and returns its final tensors,
# or the whole sequential result (then cross-validation also scores each visit).
TrainSchedule = Callable[
    [Sequence[RegisteredDataset]], "Mapping[str, torch.Tensor] | SequentialResult"
]
# A visit whose train loss exceeds this many times a chance predictor's (ln of the label count)
# has diverged. Not relative to an earlier visit: an easy first site (Switzerland's rows are
# nearly all positive) trains to a loss far below what the next, harder site starts from.
DIVERGENCE_GROWTH = 10.0

# Keys of Flower's records and configs (FedAvg's defaults, written out so that both ends agree).
_WEIGHT_KEY = "num-examples"
_ARRAYS_KEY = "arrays"
_CONFIG_KEY = "config"
_METRICS_KEY = "metrics"
_ROUND_KEY = "server-round"
_PARTITION_KEY = "partition-id"
_RUN_ID = 1


@dataclass(frozen=True)
class HopRecord:
    """One hop of a simulated schedule: where it ran and what ``run_hop`` reported."""

    site: str
    metrics: dict[str, float]  # validation metrics (if any) and train_loss/steps/examples


@dataclass(frozen=True)
class SequentialResult:
    """A simulated Baton run: the tensors after the last visit and one record per visit."""

    tensors: dict[str, torch.Tensor]
    visits: tuple[HopRecord, ...]


@dataclass(frozen=True)
class FederatedRound:
    """One FedAvg round."""

    round: int  # counted from 1
    hops: tuple[HopRecord, ...]  # every site's client update, in site order
    train_metrics: dict[str, float]  # Flower's example-weighted mean of the updates' train_loss
    evaluation: dict[str, dict[str, float]]  # site -> metrics of the round's global model


@dataclass(frozen=True)
class FederatedResult:
    """A simulated FedAvg run: the global tensors after the last round and per-round records."""

    tensors: dict[str, torch.Tensor]
    rounds: tuple[FederatedRound, ...]


@dataclass(frozen=True)
class CrossValidationResult:
    """Scores of one schedule under k-fold cross-validation over several sites.

    Each site's metrics pool its folds with ``pool_metrics``: ``examples`` counts the site's
    held-out rows (every training row once), ``accuracy`` and ``loss`` are its out-of-fold values,
    and other metrics (``macro_f1``, ``auroc``) are example-weighted means of the fold values.
    """

    folds: int
    sites: dict[str, dict[str, float]]  # site -> metrics pooled over its folds
    mean: dict[str, float]  # unweighted mean over sites (counts summed), as FLamby averages
    pooled: dict[str, float]  # every site's held-out rows together (``pool_metrics`` of sites)
    per_fold: tuple[dict[str, dict[str, float]], ...]  # fold -> site -> that fold's metrics
    # (site, metrics) after each visit, pooled over the folds: the visited site's out-of-fold
    # score of the model its visit produced. Empty unless ``train`` returned visits.
    visits: tuple[tuple[str, dict[str, float]], ...] = ()
    # Why the schedule's models must not count (collapsed or diverged), else None.
    failure_reason: str | None = None

    def visit_scores(self, metric: str = "accuracy") -> tuple[tuple[str, float], ...]:
        """(site, score) after each visit, in hop order."""
        return tuple((site, metrics[metric]) for site, metrics in self.visits)

    def forgetting(self, metric: str = "accuracy") -> dict[str, float]:
        """Site -> its best post-visit score minus its final out-of-fold score (larger is
        better for ``metric``); empty without visits."""
        best: dict[str, float] = {}
        for site, value in self.visit_scores(metric):
            best[site] = max(best.get(site, value), value)
        return {site: best[site] - self.sites[site][metric] for site in best}


# ---- sequential, local, pooled ---------------------------------------------------------------


def train_sequential(
    trainer: Trainer,
    spec: TaskSpec,
    visits: Sequence[tuple[RegisteredDataset, HopHyperparameters]],
    *,
    incoming: Mapping[str, torch.Tensor] | None = None,
) -> SequentialResult:
    """Trains one model through the visits in order, each hop starting from the last one's
    tensors: the in-process twin of a Baton run.

    Args:
        trainer: The task's trainer, as a site agent uses it.
        spec: The run's task, identical at every site.
        visits: (site dataset, hop hyperparameters) per hop, in order; a site may recur.
        incoming: Tensors the first hop starts from; None starts it fresh, as a run does.

    Returns:
        The tensors after the last hop and one record per visit.

    Raises:
        ValueError: If there are no visits, or a hop fails as ``Trainer.run_hop`` does.
    """
    if not visits:
        raise ValueError("a sequential schedule needs at least one visit")
    tensors = None if incoming is None else dict(incoming)
    records: list[HopRecord] = []
    for index, (dataset, hyperparameters) in enumerate(visits):
        outcome = trainer.run_hop(spec, dataset, hyperparameters, tensors)
        tensors = outcome.tensors
        records.append(HopRecord(dataset.name, dict(outcome.metrics)))
        logger.info("visit %d of %d done at %s", index + 1, len(visits), dataset.name)
    assert tensors is not None  # at least one hop ran
    return SequentialResult(tensors=tensors, visits=tuple(records))


def cyclic_visits(
    datasets: Sequence[RegisteredDataset], hyperparameters: HopHyperparameters, cycles: int = 1
) -> list[tuple[RegisteredDataset, HopHyperparameters]]:
    """The visits of a plan's ``sites`` x ``cycles`` shorthand: the sites in order, ``cycles``
    times, every hop with the same hyperparameters."""
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    return [(dataset, hyperparameters) for _ in range(cycles) for dataset in datasets]


def train_local(
    trainer: Trainer,
    spec: TaskSpec,
    dataset: RegisteredDataset,
    hyperparameters: HopHyperparameters,
    *,
    incoming: Mapping[str, torch.Tensor] | None = None,
) -> HopOutcome:
    """Trains on one site alone: a single hop of ``hyperparameters`` (use ``epochs`` or
    ``steps`` for the whole training budget)."""
    return trainer.run_hop(spec, dataset, hyperparameters, incoming)


def pooled_dataset(
    datasets: Sequence[RegisteredDataset], name: str = "pooled", *, seed: int = 0
) -> RegisteredDataset:
    """All sites' data as one dataset: train rows concatenated in site order, validation rows
    likewise, and no test rows.

    Args:
        datasets: The sites' datasets, of one task type (and, for tabular, one feature list).
        name: Name of the pooled dataset.
        seed: Seed of its cross-validation folds.

    Returns:
        The pooled dataset; its fingerprint hashes the sites' fingerprints in order.

    Raises:
        ValueError: If there are no datasets, names repeat, or task types or features differ.
    """
    _check_sites(datasets)
    first = datasets[0]
    for dataset in datasets[1:]:
        if dataset.task_type != first.task_type:
            raise ValueError(
                f"cannot pool {first.name!r} ({first.task_type}) with {dataset.name!r} "
                f"({dataset.task_type})"
            )
        if dataset.feature_names != first.feature_names:
            raise ValueError(f"{dataset.name!r} has other features than {first.name!r}")
    fingerprint = hashlib.sha256(
        ("baton-pooled:" + ",".join(d.fingerprint for d in datasets)).encode()
    ).hexdigest()
    return RegisteredDataset(
        name=name,
        task_type=first.task_type,
        fingerprint=fingerprint,
        train=tuple(example for d in datasets for example in d.train),
        validation=tuple(example for d in datasets for example in d.validation),
        test=(),
        feature_names=first.feature_names,
        labels=tuple(sorted({label for d in datasets for label in d.labels})),
        seed=seed,
    )


def train_pooled(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    hyperparameters: HopHyperparameters,
    *,
    incoming: Mapping[str, torch.Tensor] | None = None,
) -> HopOutcome:
    """Trains on every site's data pooled (``pooled_dataset``): the centralised baseline.

    With tabular ``per-site`` normalisation the pool is the site, so features are normalised
    with the pooled train statistics (``pooled_normaliser``).
    """
    return trainer.run_hop(spec, pooled_dataset(datasets), hyperparameters, incoming)


# ---- FedAvg on Flower ------------------------------------------------------------------------


def train_fedavg(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    *,
    rounds: int,
    hyperparameters: HopHyperparameters | HyperparameterSchedule,
    initial: Mapping[str, torch.Tensor] | None = None,
    evaluate_split: EvaluationSplit | None = None,
    flower_logs: bool = False,
) -> FederatedResult:
    """Federated averaging: each round every site trains the global model with ``run_hop``, and
    Flower's ``FedAvg`` averages the updates weighted by the sites' train example counts.

    FedProx needs nothing more: a ``proximal_mu`` in the hyperparameters makes each client update
    pull towards the global model it started from (Flower's FedProx strategy aggregates exactly
    as FedAvg does).

    Args:
        trainer: The task's trainer, as a site agent uses it.
        spec: The task, identical at every site.
        datasets: The sites' datasets; names must be unique.
        rounds: Number of rounds.
        hyperparameters: Each client update's settings, or a function of (round counted from 1,
            site name) giving them, e.g. to vary the batch-order ``seed`` by round: the same
            seed every round makes a site draw the same batches every round.
        initial: The global model before round 1. None: every site starts round 1 fresh from
            its hyperparameters' seed, which must then be the same at every site (so the first
            updates also share their starting point), and round 1 has no proximal term.
        evaluate_split: If set, after each round every site scores the global model on this
            split (Flower's server-side ``evaluate_fn`` hook), recorded per round.
        flower_logs: Let Flower's INFO log lines through (by default, only its errors).

    Returns:
        The global tensors after the last round and a record per round.

    Raises:
        ValueError: If an argument is invalid, round-1 seeds differ without ``initial``, or a
            client update fails as ``Trainer.run_hop`` does (the run stops: no site is dropped).
    """
    _check_sites(datasets)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if initial is not None and not initial:
        raise ValueError("initial tensors are empty; pass None to start from the seed")
    schedule = _schedule(hyperparameters)
    if initial is None:
        seeds = {schedule(1, dataset.name).seed for dataset in datasets}
        if len(seeds) > 1:
            raise ValueError(
                f"without initial tensors every site must start round 1 from the same seed, "
                f"got seeds {sorted(seeds)}"
            )
    return _flower_fedavg(
        trainer,
        spec,
        datasets,
        rounds=rounds,
        schedule=schedule,
        initial=initial,
        evaluate_split=evaluate_split,
        flower_logs=flower_logs,
    )


def _flower_fedavg(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    *,
    rounds: int,
    schedule: HyperparameterSchedule,
    initial: Mapping[str, torch.Tensor] | None,
    evaluate_split: EvaluationSplit | None,
    flower_logs: bool,
) -> FederatedResult:
    """Runs Flower's FedAvg strategy over an in-process grid whose nodes are the sites."""
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp.grid import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.run import Run

    first_node = SUPERLINK_NODE_ID + 1  # the server's own node id is taken
    node_ids = [first_node + index for index in range(len(datasets))]
    hops: dict[tuple[int, int], HopRecord] = {}
    update_names: dict[tuple[int, int], list[str]] = {}
    evaluations: dict[int, dict[str, dict[str, float]]] = {}

    app = ClientApp()

    @app.train()
    def client_update(message: Message, context: Context) -> Message:
        """The sites' side: one ``run_hop`` from the global model Flower sent."""
        index = int(context.node_config[_PARTITION_KEY])
        dataset = datasets[index]
        server_round = message.content.config_records[_CONFIG_KEY][_ROUND_KEY]
        if not isinstance(server_round, int):
            raise ValueError(f"Flower sent round {server_round!r}, not a round number")
        arrays = message.content.array_records[_ARRAYS_KEY]
        incoming = tensors_from_record(arrays) if len(arrays) else None
        outcome = trainer.run_hop(spec, dataset, schedule(server_round, dataset.name), incoming)
        hops[(server_round, index)] = HopRecord(dataset.name, dict(outcome.metrics))
        update_names[(server_round, index)] = sorted(outcome.tensors)
        reply = RecordDict(
            {
                _ARRAYS_KEY: record_from_tensors(outcome.tensors),
                _METRICS_KEY: MetricRecord(
                    {_WEIGHT_KEY: len(dataset.train), "train_loss": outcome.metrics["train_loss"]}
                ),
            }
        )
        return Message(reply, reply_to=message)

    class InProcessGrid(Grid):
        """Hands each message straight to the sites' ``ClientApp`` with the ``Context`` of its
        node (as a SuperNode would), and keeps the reply until the strategy pulls it.

        Nodes run in node order whatever order the strategy sampled them in, and replies come
        back in node order, so Flower sums the updates in site order on every run.
        """

        def __init__(self) -> None:
            self._run = Run.create_empty(run_id=_RUN_ID)
            self._contexts = {
                node: Context(
                    run_id=_RUN_ID,
                    node_id=node,
                    node_config={
                        _PARTITION_KEY: node - first_node,
                        "num-partitions": len(node_ids),
                    },
                    state=RecordDict(),
                    run_config={},
                )
                for node in node_ids
            }
            self._replies: dict[str, Message] = {}
            self._sent = 0

        def set_run(self, run: Run) -> None:
            self._run = run

        @property
        def run(self) -> Run:
            return self._run

        def create_message(
            self,
            content: RecordDict,
            message_type: str,
            dst_node_id: int,
            group_id: str,
            ttl: float | None = None,
        ) -> Message:
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> Iterable[int]:
            return list(node_ids)

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            sent: list[str] = []
            for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
                node = message.metadata.dst_node_id
                if node not in self._contexts:
                    raise ValueError(f"Flower addressed node {node}, which is no site")
                # A failing site raises here: the run stops rather than averaging the others.
                reply = app(message, self._contexts[node])
                self._sent += 1
                message_id = f"in-process-{self._sent}"
                self._replies[message_id] = reply
                sent.append(message_id)
            return sent

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            replies = [self._replies.pop(i) for i in message_ids if i in self._replies]
            return sorted(replies, key=lambda m: m.metadata.src_node_id)

        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> Iterable[Message]:
            return self.pull_messages(self.push_messages(messages))

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if evaluate_split is None or server_round == 0:
            return None
        tensors = tensors_from_record(arrays)
        evaluations[server_round] = evaluate_sites(trainer, spec, tensors, datasets, evaluate_split)
        return None

    with contextlib.nullcontext() if flower_logs else flower_logs_held_back():
        # Every site trains every round and none is optional: a missing one would stall
        # Flower's sampler (it waits for min_available_nodes) instead of being skipped.
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=len(node_ids),
            min_evaluate_nodes=0,
            min_available_nodes=len(node_ids),
            weighted_by_key=_WEIGHT_KEY,
            arrayrecord_key=_ARRAYS_KEY,
            configrecord_key=_CONFIG_KEY,
        )
        # Flower samples nodes with the global `random`, and stamps messages with the identity
        # its runtime gives a ServerApp process; this process plays that part meanwhile.
        with _python_random_state_kept(), _server_app_identity():
            result = strategy.start(
                grid=InProcessGrid(),
                initial_arrays=(ArrayRecord() if initial is None else record_from_tensors(initial)),
                num_rounds=rounds,
                train_config=ConfigRecord(),
                evaluate_fn=evaluate_global,
            )

    records: list[FederatedRound] = []
    for server_round in range(1, rounds + 1):
        missing = [d.name for i, d in enumerate(datasets) if (server_round, i) not in hops]
        if missing:
            raise ValueError(f"round {server_round} lacks the updates of sites {missing}")
        train_metrics = result.train_metrics_clientapp.get(server_round, MetricRecord())
        records.append(
            FederatedRound(
                round=server_round,
                hops=tuple(hops[(server_round, i)] for i in range(len(datasets))),
                train_metrics={
                    key: float(value)
                    for key, value in train_metrics.items()
                    if isinstance(value, (int, float))
                },
                evaluation=evaluations.get(server_round, {}),
            )
        )
    tensors = tensors_from_record(result.arrays)
    expected = update_names[(rounds, 0)]
    if sorted(tensors) != expected:
        raise ValueError(f"Flower returned tensors {sorted(tensors)}, expected {expected}")
    return FederatedResult(tensors=tensors, rounds=tuple(records))


# ---- evaluation and normalisation ------------------------------------------------------------


def evaluate_sites(
    trainer: Trainer,
    spec: TaskSpec,
    tensors: Mapping[str, torch.Tensor],
    datasets: Sequence[RegisteredDataset],
    split: EvaluationSplit,
) -> dict[str, dict[str, float]]:
    """Every site scores the same tensors on its own split with ``Trainer.evaluate``.

    With tabular ``per-site`` normalisation each site normalises with its own train statistics
    (FLamby's evaluation); with ``pooled_normalisation_spec`` every site uses the pooled ones.

    Returns:
        Site name -> metrics, in site order.

    Raises:
        ValueError: If names repeat, or a site cannot evaluate (e.g. the split is empty).
    """
    _check_sites(datasets)
    return {dataset.name: trainer.evaluate(spec, dataset, split, tensors) for dataset in datasets}


def pooled_normaliser(datasets: Sequence[RegisteredDataset]) -> tuple[list[float], list[float]]:
    """Mean and sample standard deviation (``torch.std``'s default, unbiased) of every site's
    train features together: what ``per-site`` normalisation of the pooled dataset uses.

    Returns:
        (mean, std), one value per feature, as JSON-able lists for the task options.

    Raises:
        ValueError: If a dataset is not tabular, has no train rows, or feature counts differ.
    """
    rows: list[tuple[float, ...]] = []
    for dataset in datasets:
        if not dataset.train:
            raise ValueError(f"dataset {dataset.name!r} has no training rows")
        for example in dataset.train:
            if not isinstance(example, TabularExample):
                raise ValueError(f"dataset {dataset.name!r} is not tabular")
            rows.append(example.features)
    if not rows:
        raise ValueError("no datasets to pool")
    if len({len(row) for row in rows}) != 1:
        raise ValueError("the sites' rows have different numbers of features")
    # Float64, as the real statistics round pools the sites' sums (coordinator/statistics.py):
    # the twin's normalisers then equal the real system's to ~1e-12 (the task casts both to
    # float32 when it applies them).
    matrix = torch.tensor(rows, dtype=torch.float64)
    mean = matrix.mean(dim=0)
    std = matrix.std(dim=0) if len(matrix) > 1 else torch.zeros(matrix.shape[1])
    return [float(v) for v in mean], [float(v) for v in std]


def pooled_normalisation_spec(spec: TaskSpec, datasets: Sequence[RegisteredDataset]) -> TaskSpec:
    """``spec`` with ``global`` normalisation by the pooled train statistics of ``datasets``:
    every site then normalises identically (the consistent evaluation of a pooled model)."""
    mean, std = pooled_normaliser(datasets)
    options = {**spec.options, "normalisation": "global", "mean": mean, "std": std}
    return dataclasses.replace(spec, options=options)


# ---- cross-validation ------------------------------------------------------------------------


def cross_validate(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    folds: int,
    train: TrainSchedule,
    *,
    evaluation_spec: Callable[[Sequence[RegisteredDataset]], TaskSpec] | None = None,
    guard: bool = True,
) -> CrossValidationResult:
    """Scores a schedule by k-fold cross-validation over the sites' training rows.

    For fold f every site's dataset becomes ``fold_view(f, folds)`` (train: its rows outside
    fold f; validation: fold f; no test rows, and its own validation rows take no part), the
    schedule trains one model on those views, and each site scores it on its fold with
    ``Trainer.evaluate(..., "validation", ...)``. Over the folds every training row is held out
    exactly once; test rows are never read.

    Args:
        trainer: The task's trainer.
        spec: The task used to score (and, usually, inside ``train``).
        datasets: The sites' datasets; names must be unique.
        folds: Number of folds (>= 2); each site needs at least that many training rows.
        train: Trains the schedule on the fold's views (in ``datasets`` order) and returns the
            tensors, e.g. ``lambda views: train_fedavg(trainer, spec, views, ...).tensors``.
        evaluation_spec: Gives the scoring spec from the fold's views, e.g.
            ``lambda views: pooled_normalisation_spec(spec, views)`` (a normaliser fitted on
            the fold's training rows only); None scores with ``spec``.
        guard: Check every fold's final model for collapse (``collapse_reason`` over all the
            held-out rows) and, when ``train`` returns visits, the train losses for divergence
            (``divergence_reason``); the first finding is ``failure_reason``.

    Returns:
        Per-site and mean scores pooled over the folds, each fold's scores, and, when
        ``train`` returns a ``SequentialResult``, the score after each visit.

    Raises:
        ValueError: If names repeat, ``folds`` is invalid for a site, or training fails.
    """
    _check_sites(datasets)
    per_fold: list[dict[str, dict[str, float]]] = []
    fold_visits: list[tuple[HopRecord, ...]] = []
    failure: str | None = None
    for fold in range(folds):
        views = [dataset.fold_view(fold, folds) for dataset in datasets]
        trained = train(views)
        if isinstance(trained, SequentialResult):
            tensors: Mapping[str, torch.Tensor] = trained.tensors
            fold_visits.append(trained.visits)
            if guard and failure is None:
                failure = divergence_reason(trained.visits, labels=len(spec.labels))
        else:
            tensors = trained
        scoring = spec if evaluation_spec is None else evaluation_spec(views)
        per_fold.append(evaluate_sites(trainer, scoring, tensors, views, "validation"))
        if guard and failure is None:
            failure = collapse_reason(trainer, scoring, tensors, views, "validation")
            if failure is not None:
                failure = f"fold {fold}: {failure}"
        logger.info("cross-validation fold %d of %d done", fold + 1, folds)
    sites = {d.name: pool_metrics([scores[d.name] for scores in per_fold]) for d in datasets}
    visits: list[tuple[str, dict[str, float]]] = []
    if len(fold_visits) == folds:
        for hops in zip(*fold_visits, strict=True):
            names = {hop.site for hop in hops}
            if len(names) != 1 or any("examples" not in hop.metrics for hop in hops):
                visits = []  # folds visited differently or a visit was not scored
                break
            visits.append((hops[0].site, pool_metrics([hop.metrics for hop in hops])))
    return CrossValidationResult(
        folds=folds,
        sites=sites,
        mean=_mean_over_sites(list(sites.values())),
        pooled=pool_metrics(list(sites.values())),
        per_fold=tuple(per_fold),
        visits=tuple(visits),
        failure_reason=failure,
    )


def cross_validate_cycles(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    folds: int,
    cycles: Sequence[Sequence[tuple[str, HopHyperparameters]]],
    *,
    training_spec: Callable[[Sequence[RegisteredDataset]], TaskSpec] | None = None,
    evaluation_spec: Callable[[Sequence[RegisteredDataset]], TaskSpec] | None = None,
    after_cycle: Callable[[int, float], None] | None = None,
    after_hop: Callable[[int, int, float], None] | None = None,
    metric: str = "accuracy",
) -> CrossValidationResult:
    """`cross_validate` of a sequential schedule, run cycle by cycle across the folds so that
    a search can see (and stop) a partial schedule.

    Every fold's model goes through cycle 0 (``train_sequential`` on the fold's views), then
    every fold's through cycle 1 from where it stopped, and so on; after each cycle
    ``after_cycle(cycle, value)`` gets the mean over sites of ``metric`` pooled over the folds'
    held-out rows (the value the final result's ``mean`` holds after the last cycle). It may
    raise to stop the run (a search's pruner); nothing else is trained then. The finished
    result, collapse and divergence guard included, equals ``cross_validate`` with
    ``train_sequential`` over all the visits.

    With ``after_hop`` the schedule runs hop by hop across the folds instead, and after each
    hop ``after_hop(cycle, hop, value)`` gets the same kind of value (``hop`` counted over the
    whole schedule from 0), so a pruner can stop a partial cycle; after a cycle's last hop the
    value equals the one ``after_cycle`` then gets.

    Args:
        trainer, spec, datasets, folds, evaluation_spec: As for `cross_validate`.
        cycles: The schedule's visits, (site name, hyperparameters), grouped by cycle.
        training_spec: The spec a fold trains with, from its views (e.g. a fold-fitted
            normaliser); None trains with ``spec``.
        after_cycle: Called after each cycle, the last included.
        after_hop: Called after each hop, the last included (before ``after_cycle``).
        metric: The metric reported to ``after_cycle``.

    Raises:
        ValueError: As `cross_validate`, or if a cycle is empty or names an unknown site.
    """
    if not cycles or any(not cycle for cycle in cycles):
        raise ValueError("every cycle of a sequential schedule needs at least one visit")
    _check_sites(datasets)
    known = {dataset.name for dataset in datasets}
    unknown = sorted({site for cycle in cycles for site, _ in cycle} - known)
    if unknown:
        raise ValueError(f"the schedule visits unknown sites: {', '.join(unknown)}")
    fold_views = [[dataset.fold_view(fold, folds) for dataset in datasets] for fold in range(folds)]
    trained: list[SequentialResult | None] = [None] * folds
    hops_before = 0
    for index, cycle in enumerate(cycles):
        # Hop by hop when someone listens after each hop, else the whole cycle at once.
        parts = [[visit] for visit in cycle] if after_hop is not None else [list(cycle)]
        specs = [spec if training_spec is None else training_spec(v) for v in fold_views]
        value = math.nan
        for part_index, part in enumerate(parts):
            per_fold: list[dict[str, dict[str, float]]] = []
            for fold, views in enumerate(fold_views):
                by_name = {view.name: view for view in views}
                previous = trained[fold]
                result = train_sequential(
                    trainer,
                    specs[fold],
                    [(by_name[site], hyperparameters) for site, hyperparameters in part],
                    incoming=None if previous is None else previous.tensors,
                )
                earlier = () if previous is None else previous.visits
                trained[fold] = SequentialResult(result.tensors, earlier + result.visits)
                if after_cycle is not None or after_hop is not None:
                    scoring = spec if evaluation_spec is None else evaluation_spec(views)
                    per_fold.append(
                        evaluate_sites(trainer, scoring, result.tensors, views, "validation")
                    )
            if per_fold:
                sites = [pool_metrics([scores[d.name] for scores in per_fold]) for d in datasets]
                value = _mean_over_sites(sites)[metric]
            if after_hop is not None:
                after_hop(index, hops_before + part_index, value)
        hops_before += len(cycle)
        if after_cycle is not None:
            after_cycle(index, value)
    finished = iter(trained)

    def replay(views: Sequence[RegisteredDataset]) -> SequentialResult:
        result = next(finished)
        assert result is not None  # every fold ran every cycle
        return result

    return cross_validate(trainer, spec, datasets, folds, replay, evaluation_spec=evaluation_spec)


# ---- collapse and divergence -----------------------------------------------------------------


def prediction_shares(
    trainer: Trainer,
    spec: TaskSpec,
    tensors: Mapping[str, torch.Tensor],
    dataset: RegisteredDataset,
    split: EvaluationSplit,
) -> dict[str, float]:
    """The share of the split's rows the model predicts as each label.

    Found with the trainer's own ``evaluate``: with every row of the split relabelled as
    label j, its accuracy is the share of rows predicted as j (features and the train split,
    hence the normaliser, are untouched).

    Returns:
        Label -> share, over ``spec.labels``.

    Raises:
        ValueError: If the split is empty or the trainer cannot evaluate.
    """
    rows = dataset.validation if split == "validation" else dataset.test
    if not rows:
        raise ValueError(f"dataset {dataset.name!r} has no {split} rows")
    shares: dict[str, float] = {}
    for label in spec.labels[:-1]:
        relabelled: list[TabularExample | TextExample] = []
        for row in rows:
            if not isinstance(row, TabularExample | TextExample):
                raise ValueError(f"dataset {dataset.name!r} is not a classification dataset")
            relabelled.append(dataclasses.replace(row, label=label))
        if split == "validation":
            view = dataclasses.replace(dataset, validation=tuple(relabelled))
        else:
            view = dataclasses.replace(dataset, test=tuple(relabelled))
        shares[label] = trainer.evaluate(spec, view, split, tensors)["accuracy"]
    # The last label takes the rest (one evaluation fewer); rounding kept at 0.
    shares[spec.labels[-1]] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def collapse_reason(
    trainer: Trainer,
    spec: TaskSpec,
    tensors: Mapping[str, torch.Tensor],
    datasets: Sequence[RegisteredDataset],
    split: EvaluationSplit,
) -> str | None:
    """Says why the model is a constant predictor (one label for every row of ``split`` at
    every site), or None when it predicts at least two labels somewhere."""
    counts: dict[str, float] = {}
    total = 0
    for dataset in datasets:
        rows = len(dataset.validation if split == "validation" else dataset.test)
        for label, share in prediction_shares(trainer, spec, tensors, dataset, split).items():
            counts[label] = counts.get(label, 0.0) + share * rows
        total += rows
    for label, count in counts.items():
        if round(count) == total:
            return (
                f"collapsed: predicts label {label!r} for every one of the {total} {split} rows "
                f"of {len(datasets)} site(s)"
            )
    return None


def divergence_reason(
    visits: Sequence[HopRecord], *, labels: int, growth: float = DIVERGENCE_GROWTH
) -> str | None:
    """Says why the visits' training diverged, or None: a train loss that is not finite, or
    one above ``growth`` times a chance predictor's loss (``ln(labels)``, the cross-entropy of
    uniform predictions; only non-finite losses count with fewer than 2 labels)."""
    bound = growth * math.log(labels) if labels >= 2 else math.inf
    for index, visit in enumerate(visits):
        loss = visit.metrics.get("train_loss")
        if loss is None:
            continue
        if not math.isfinite(loss):
            return f"diverged: train loss {loss} at visit {index + 1} ({visit.site})"
        if loss > bound:
            return (
                f"diverged: train loss {loss:.4g} at visit {index + 1} ({visit.site}) is above "
                f"{growth:g} times a chance predictor's {math.log(labels):.4g}"
            )
    return None


def _mean_over_sites(sites: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over sites of the metrics every site has; counts summed."""
    keys = set.intersection(*(set(site) for site in sites))
    return {
        key: sum(site[key] for site in sites) / (1 if key in COUNT_KEYS else len(sites))
        for key in sorted(keys)
    }


# ---- helpers ---------------------------------------------------------------------------------


def _check_sites(datasets: Sequence[RegisteredDataset]) -> None:
    if not datasets:
        raise ValueError("no site datasets given")
    names = [dataset.name for dataset in datasets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"site dataset names must be unique; repeated: {repeated}")


def _schedule(
    hyperparameters: HopHyperparameters | HyperparameterSchedule,
) -> HyperparameterSchedule:
    if isinstance(hyperparameters, HopHyperparameters):
        fixed = hyperparameters
        return lambda server_round, site: fixed
    return hyperparameters


def record_from_tensors(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as a Flower ``ArrayRecord``, keyed by name in sorted order."""
    from flwr.app import ArrayRecord

    return ArrayRecord.from_torch_state_dict({name: tensors[name] for name in sorted(tensors)})


def tensors_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A Flower ``ArrayRecord`` as CPU tensors, keyed by name in sorted order."""
    state = record.to_torch_state_dict()
    return {name: state[name].contiguous() for name in sorted(state)}


@contextlib.contextmanager
def flower_logs_held_back() -> Iterator[None]:
    """Flower logs a dozen INFO lines a round to its own console handler; let only errors by."""
    flower = logging.getLogger("flwr")
    previous = flower.level
    flower.setLevel(logging.ERROR)
    try:
        yield
    finally:
        flower.setLevel(previous)


@contextlib.contextmanager
def _python_random_state_kept() -> Iterator[None]:
    """Leaves the global ``random`` generator as it was, whatever the block draws from it."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


@contextlib.contextmanager
def _server_app_identity() -> Iterator[None]:
    """Gives this process the task identity Flower's runtime sets for a ServerApp, then puts
    the previous one back."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = {key: TaskIdentity.__dict__[key] for key in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = _RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(TaskIdentity, key, value)
