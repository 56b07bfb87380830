"""Plans simulated at scale on Flower's simulation engine (Ray): every virtual site is a Flower
SuperNode running the sites' own ``Trainer`` code in a Ray actor with its own CPU/GPU share.

This is the simulator ``baton simulate`` loads through the ``baton.simulators`` entry point
(``protocols.simulation``). A sequential plan is a Flower ``ServerApp`` that sends each hop, in
the plan's order and with the plan's hyperparameters, to the node holding that hop's site, and
passes the returned tensors on unchanged, as the coordinator passes a checkpoint on. Federated
and hybrid plans train each round's members in parallel (a hybrid group as a chain) and
aggregate with the plan's Flower strategy, as the engine does. Every site then scores the
final model. Data is cut by ``site_agent.virtual_sites`` and put
into Ray's object store once; each actor loads it (and builds its trainer) once per job.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from protocols.simulation import SimulatedHop, SimulatedRound, SimulationJob, SimulationReport
from site_agent.registry import RegisteredDataset
from site_agent.simulation import flower_logs_held_back, record_from_tensors, tensors_from_record
from site_agent.tasks import (
    CrossValidatedTrainer,
    HopHyperparameters,
    LoraSettings,
    TaskSpec,
    Trainer,
    create_trainer,
)
from site_agent.virtual_sites import load_sources, partition_sources

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

__all__ = ["simulate"]

logger = logging.getLogger(__name__)

# The hyperparameters a hop task carries (protocols/v1/baton.proto Hyperparameters), which the
# site agent turns into ``HopHyperparameters`` field by field; the simulator does the same.
HOP_FIELDS = (
    "learning_rate",
    "steps",
    "epochs",
    "batch_size",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "seed",
    "proximal_mu",
)
_ARRAYS = "arrays"
_CONFIG = "config"
_METRICS = "metrics"
_SPLIT = "split"
_PARTITION = "partition-id"
_WEIGHT = "num-examples"
_NODE_WAIT_SECONDS = 600.0

# Per Ray actor: job token -> (datasets by site, trainer), loaded on the actor's first message.
_ACTOR_JOBS: dict[str, tuple[dict[str, RegisteredDataset], Trainer]] = {}
_ACTOR_LOCK = threading.Lock()


@dataclass
class _Chain:
    """What the ServerApp thread hands back to the caller."""

    hops: list[SimulatedHop] = field(default_factory=list)
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rounds: list[SimulatedRound] = field(default_factory=list)


@dataclass(frozen=True)
class _ActorJob:
    """What every actor needs to serve a job: small, pickled with each message."""

    token: str
    data: Any  # ray.ObjectRef of {site: RegisteredDataset}
    sites: tuple[str, ...]
    spec: TaskSpec
    cross_validation: Mapping[str, int] | None
    base_model_dir: str | None
    device: str
    threads: int


def simulate(job: SimulationJob) -> SimulationReport:
    """Runs a plan (sequential chain, or federated / hybrid rounds) over virtual sites on
    Flower's simulation engine.

    Args:
        job: The plan as ``baton simulate`` expanded it, the data sources and the engine's
            settings.

    Returns:
        Every hop's metrics in order, each site's evaluation of the final model and its hash.

    Raises:
        ValueError: One line, if the job, the data or a hop is invalid, or Ray fails to start.
    """
    started = time.monotonic()
    spec = _task_spec(job)
    hops = [(site, _hop_hyperparameters(values)) for site, values in job.hops]
    if job.mode == "sequential":
        if not hops:
            raise ValueError("the plan has no hops")
        named = {site for site, _ in hops}
    else:
        if not job.rounds or job.round_hyperparameters is None or not job.aggregation:
            raise ValueError(f"a {job.mode} job needs rounds, their hyperparameters and a strategy")
        _strategy(job.aggregation)  # an unknown strategy fails before Ray starts
        named = {site for members in job.rounds for _, chain in members for site in chain}
    strangers = sorted(named - set(job.sites))
    if strangers:
        raise ValueError(f"hops name sites that are not simulated: {', '.join(strangers)}")
    sources = load_sources(job.sources, job.dataset, job.task_type, seed=job.seed)
    sites = partition_sources(sources, job.sites, job.partitioner, alpha=job.alpha, seed=job.seed)
    site_rows = {
        site.name: {
            "train": len(site.dataset.train),
            "validation": len(site.dataset.validation),
            "test": len(site.dataset.test),
        }
        for site in sites
    }
    chain = _Chain()
    with _quiet_flower(), _ray_session(job) as ray:
        actor_job = _ActorJob(
            token=uuid.uuid4().hex,
            data=ray.put({site.name: site.dataset for site in sites}),
            sites=tuple(job.sites),
            spec=spec,
            cross_validation=job.cross_validation,
            base_model_dir=job.base_model_dir,
            device="cuda" if job.gpus_per_site > 0 else "cpu",
            threads=max(1, int(job.cpus_per_site)),
        )
        from flwr.simulation import run_simulation

        try:
            run_simulation(
                server_app=(
                    _sequential_server_app(job, hops, chain)
                    if job.mode == "sequential"
                    else _rounds_server_app(job, chain)
                ),
                client_app=_client_app(actor_job),
                num_supernodes=len(sites),
                backend_config={
                    "client_resources": {
                        "num_cpus": job.cpus_per_site,
                        "num_gpus": job.gpus_per_site,
                    }
                },
            )
        except RuntimeError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise ValueError(f"the simulation failed: {cause}") from exc
    return SimulationReport(
        hops=tuple(chain.hops),
        evaluation=chain.evaluation,
        tensors_sha256=tensors_sha256(chain.tensors),
        site_rows=site_rows,
        wall_seconds=time.monotonic() - started,
        rounds=tuple(chain.rounds),
    )


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, shapes and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# ---- the ServerApp: the coordinator's part ---------------------------------------------------


def _sequential_server_app(
    job: SimulationJob, hops: Sequence[tuple[str, HopHyperparameters]], chain: _Chain
) -> ServerApp:
    """Sends the hops in order, each from the last one's tensors, then has every site score
    the final model on ``job.evaluate_split``."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        node_of = _nodes_by_site(grid, job.sites)
        arrays = ArrayRecord()  # empty: the first hop starts fresh from its seed, as in a run
        for index, (site, hyperparameters) in enumerate(hops):
            config = {name: getattr(hyperparameters, name) for name in HOP_FIELDS}
            message = Message(
                RecordDict({_ARRAYS: arrays, _CONFIG: ConfigRecord(config)}),
                dst_node_id=node_of[site],
                message_type=MessageType.TRAIN,
            )
            (reply,) = _exchange(grid, [message], f"hop {index} at {site}")
            arrays = reply.content.array_records[_ARRAYS]
            metrics = reply.content.metric_records[_METRICS]
            chain.hops.append(
                SimulatedHop(site, {k: v for k, v in _scalars(metrics).items() if k != _WEIGHT})
            )
            logger.info("hop %d of %d done at %s", index + 1, len(hops), site)
        _finish(grid, job, node_of, arrays, chain)

    return app


def _rounds_server_app(job: SimulationJob, chain: _Chain) -> ServerApp:
    """Federated and hybrid rounds: every selected member trains its chain from the round's
    input (members in parallel, each chain one site after another), and the plan's Flower
    strategy aggregates the chains' outputs weighted by the examples each chain trained on."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp

    assert job.round_hyperparameters is not None and job.aggregation is not None
    hyperparameters = _hop_hyperparameters(job.round_hyperparameters)
    config = {name: getattr(hyperparameters, name) for name in HOP_FIELDS}
    aggregation = job.aggregation
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        node_of = _nodes_by_site(grid, job.sites)
        aggregator = _Aggregator(aggregation)
        arrays = ArrayRecord()  # round 1 starts fresh from the hyperparameters' seed
        for number, members in enumerate(job.rounds, start=1):
            outputs = [arrays] * len(members)
            weights = [0.0] * len(members)
            metrics: list[dict[str, float]] = [{} for _ in members]
            hops: list[list[SimulatedHop]] = [[] for _ in members]
            for step in range(max(len(sites) for _, sites in members)):
                active = [i for i, (_, sites) in enumerate(members) if step < len(sites)]
                messages = [
                    Message(
                        RecordDict({_ARRAYS: outputs[i], _CONFIG: ConfigRecord(config)}),
                        dst_node_id=node_of[members[i][1][step]],
                        message_type=MessageType.TRAIN,
                    )
                    for i in active
                ]
                replies = _exchange(grid, messages, f"round {number}, hop {step + 1} of chains")
                by_node = {reply.metadata.src_node_id: reply for reply in replies}
                for i in active:
                    site = members[i][1][step]
                    reply = by_node[node_of[site]]
                    outputs[i] = reply.content.array_records[_ARRAYS]
                    found = _scalars(reply.content.metric_records[_METRICS])
                    metrics[i] = {k: v for k, v in found.items() if k != _WEIGHT}
                    weights[i] += metrics[i].get("train_examples", 0.0)
                    hops[i].append(SimulatedHop(site, metrics[i]))
            for member_hops in hops:  # the engine's hop order: member by member, in chain order
                chain.hops.extend(member_hops)
            arrays, aggregated = aggregator.aggregate(
                number, outputs, weights, metrics, current=arrays if len(arrays) else None
            )
            chain.rounds.append(
                SimulatedRound(number, tuple(n for n, _ in members), tuple(weights), aggregated)
            )
            logger.info("round %d of %d aggregated", number, len(job.rounds))
        _finish(grid, job, node_of, arrays, chain)

    return app


class _Aggregator:
    """The plan's Flower strategy, kept across rounds (FedAdam and FedYogi carry moments).

    A first round that started from fresh tensors has no global model to take a server step
    from: it is averaged as FedAvg does, as the engine aggregates it.
    """

    def __init__(self, aggregation: Mapping[str, Any]) -> None:
        from flwr.serverapp.strategy import FedAvg

        self.name = str(aggregation["strategy"])
        self.strategy = _strategy(aggregation)
        self.first = FedAvg(min_train_nodes=1, min_available_nodes=1)

    def aggregate(
        self,
        number: int,
        outputs: Sequence[ArrayRecord],
        weights: Sequence[float],
        metrics: Sequence[Mapping[str, float]],
        *,
        current: ArrayRecord | None,
    ) -> tuple[ArrayRecord, dict[str, float]]:
        from flwr.app import Message, MessageType, MetricRecord, RecordDict

        optimiser = self.name in _SERVER_OPTIMISERS
        strategy: Any = self.first if optimiser and current is None else self.strategy
        if optimiser and current is not None:
            # The global model the server optimiser steps from (Flower sets it in start()).
            strategy.current_arrays = {k: a.numpy() for k, a in current.items()}
        # Flower aggregates only metrics every reply has (a site without validation rows
        # reports no validation metrics): the keys all chains share.
        shared = set.intersection(*(set(m) for m in metrics)) if metrics else set()
        replies = [
            Message(
                RecordDict(
                    {
                        _ARRAYS: output,
                        _METRICS: MetricRecord(
                            {**{k: m[k] for k in sorted(shared)}, _WEIGHT: weight}  # type: ignore[dict-item]
                        ),
                    }
                ),
                dst_node_id=0,
                message_type=MessageType.TRAIN,
            )
            for output, weight, m in zip(outputs, weights, metrics, strict=True)
        ]
        arrays, aggregated = strategy.aggregate_train(number, replies)
        if arrays is None:
            raise ValueError(f"round {number}: Flower's {self.name} returned no aggregate")
        return arrays, _scalars(aggregated or {})


_SERVER_OPTIMISERS = ("fedadam", "fedyogi")


def _strategy(aggregation: Mapping[str, Any]) -> Any:
    """Flower's strategy for the plan's ``federation`` (its options as the plan filled them)."""
    from flwr.serverapp import strategy

    name = aggregation.get("strategy")
    if name == "fedavg":
        return strategy.FedAvg(min_train_nodes=1, min_available_nodes=1)
    if name == "fedprox":
        return strategy.FedProx(
            min_train_nodes=1,
            min_available_nodes=1,
            proximal_mu=float(aggregation["proximal_mu"]),
        )
    if name in _SERVER_OPTIMISERS:
        kind = strategy.FedAdam if name == "fedadam" else strategy.FedYogi
        return kind(
            min_train_nodes=1,
            min_available_nodes=1,
            eta=float(aggregation["eta"]),
            beta_1=float(aggregation["beta_1"]),
            beta_2=float(aggregation["beta_2"]),
            tau=float(aggregation["tau"]),
        )
    raise ValueError(f"unknown aggregation strategy {name!r}")


def _finish(
    grid: Any, job: SimulationJob, node_of: Mapping[str, int], arrays: ArrayRecord, chain: _Chain
) -> None:
    """Keeps the final tensors and has every site score them on ``job.evaluate_split``."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    chain.tensors = tensors_from_record(arrays)
    if job.evaluate_split is None:
        return
    messages = [
        Message(
            RecordDict({_ARRAYS: arrays, _CONFIG: ConfigRecord({_SPLIT: job.evaluate_split})}),
            dst_node_id=node_of[site],
            message_type=MessageType.EVALUATE,
        )
        for site in job.sites
    ]
    site_of = {node: site for site, node in node_of.items()}
    for reply in _exchange(grid, messages, "the final evaluation"):
        metrics = reply.content.metric_records[_METRICS]
        if len(metrics):
            chain.evaluation[site_of[reply.metadata.src_node_id]] = _scalars(metrics)
    chain.evaluation = {s: chain.evaluation[s] for s in job.sites if s in chain.evaluation}


def _nodes_by_site(grid: Any, sites: Sequence[str]) -> dict[str, int]:
    """Asks every SuperNode which partition it holds: site name -> node id."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    deadline = time.monotonic() + _NODE_WAIT_SECONDS
    nodes = list(grid.get_node_ids())
    while len(nodes) < len(sites):
        if time.monotonic() > deadline:
            raise ValueError(f"only {len(nodes)} of {len(sites)} virtual sites came up")
        time.sleep(0.1)
        nodes = list(grid.get_node_ids())
    messages = [
        Message(
            RecordDict({_CONFIG: ConfigRecord()}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in nodes
    ]
    node_of: dict[str, int] = {}
    for reply in _exchange(grid, messages, "the roll call"):
        partition = reply.content.config_records[_CONFIG][_PARTITION]
        assert isinstance(partition, int)
        node_of[sites[partition]] = reply.metadata.src_node_id
    return node_of


def _exchange(grid: Any, messages: list[Message], what: str) -> list[Message]:
    """Sends and waits for every reply; a site's error stops the run with its reason."""
    replies = list(grid.send_and_receive(messages))
    if len(replies) != len(messages):
        raise ValueError(f"{what}: {len(replies)} of {len(messages)} sites replied")
    for reply in replies:
        if reply.has_error():
            raise ValueError(f"{what}: {reply.error.reason}")
    return replies


# ---- the ClientApp: the sites' part ----------------------------------------------------------


def _client_app(actor_job: _ActorJob) -> ClientApp:
    """The sites' ClientApp; it runs in Ray actors, so it carries only ``actor_job``."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def roll_call(message: Message, context: Context) -> Message:
        return _answer_roll_call(message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return _train(actor_job, message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _evaluate(actor_job, message, context)

    return app


def _answer_roll_call(message: Message, context: Any) -> Message:
    from flwr.app import ConfigRecord, Message, RecordDict

    partition = int(context.node_config[_PARTITION])
    return Message(RecordDict({_CONFIG: ConfigRecord({_PARTITION: partition})}), reply_to=message)


def _train(actor_job: _ActorJob, message: Message, context: Any) -> Message:
    """One hop at this node's site: ``run_hop`` from the tensors the ServerApp sent."""
    from flwr.app import Message, MetricRecord, RecordDict

    dataset, trainer = _site(actor_job, context)
    config = message.content.config_records[_CONFIG]
    try:
        hyperparameters = _hop_hyperparameters(dict(config))
        arrays = message.content.array_records[_ARRAYS]
        incoming = tensors_from_record(arrays) if len(arrays) else None
        outcome = trainer.run_hop(actor_job.spec, dataset, hyperparameters, incoming)
    except ValueError as exc:
        return _failure(message, str(exc))
    metrics = {**outcome.metrics, _WEIGHT: len(dataset.train)}
    reply = RecordDict(
        {_ARRAYS: record_from_tensors(outcome.tensors), _METRICS: MetricRecord(metrics)}  # type: ignore[arg-type]
    )
    return Message(reply, reply_to=message)


def _evaluate(actor_job: _ActorJob, message: Message, context: Any) -> Message:
    """Scores the tensors sent on this site's split; no metrics if the split is empty."""
    from flwr.app import Message, MetricRecord, RecordDict

    dataset, trainer = _site(actor_job, context)
    split = message.content.config_records[_CONFIG][_SPLIT]
    rows = dataset.test if split == "test" else dataset.validation
    metrics: dict[str, float] = {}
    if rows:
        try:
            metrics = trainer.evaluate(
                actor_job.spec,
                dataset,
                "test" if split == "test" else "validation",
                tensors_from_record(message.content.array_records[_ARRAYS]),
            )
        except ValueError as exc:
            return _failure(message, str(exc))
    return Message(RecordDict({_METRICS: MetricRecord(metrics)}), reply_to=message)  # type: ignore[arg-type]


def _failure(message: Message, reason: str) -> Message:
    from flwr.app import Error, Message

    return Message(Error(code=0, reason=reason), reply_to=message)


def _site(actor_job: _ActorJob, context: Any) -> tuple[RegisteredDataset, Trainer]:
    """This node's dataset and the actor's trainer, loaded on the actor's first message."""
    with _ACTOR_LOCK:
        if actor_job.token not in _ACTOR_JOBS:
            import ray

            _ACTOR_JOBS.clear()  # one job at a time per actor
            datasets: dict[str, RegisteredDataset] = ray.get(actor_job.data)
            trainer = create_trainer(
                actor_job.spec.task_type,
                base_model_dir=(
                    Path(actor_job.base_model_dir) if actor_job.base_model_dir else None
                ),
                device=actor_job.device,
                num_threads=actor_job.threads,
            )
            if actor_job.cross_validation is not None:
                trainer = CrossValidatedTrainer(
                    trainer,
                    int(actor_job.cross_validation["folds"]),
                    int(actor_job.cross_validation["min_validation_rows"]),
                )
            _ACTOR_JOBS[actor_job.token] = (datasets, trainer)
        datasets, trainer = _ACTOR_JOBS[actor_job.token]
    site = actor_job.sites[int(context.node_config[_PARTITION])]
    return datasets[site], trainer


# ---- values and records ----------------------------------------------------------------------


def _task_spec(job: SimulationJob) -> TaskSpec:
    """The run's ``TaskSpec`` from the plan's values, as the site agent builds it from a task."""
    lora = job.lora
    return TaskSpec(
        task_type=job.task_type,
        labels=tuple(job.labels),
        lora=LoraSettings(
            r=int(lora.get("r") or 8),
            alpha=int(lora.get("alpha") or 16),
            dropout=float(lora.get("dropout") or 0.0),
            target_modules=tuple(lora.get("target_modules") or ("query", "value")),
        ),
        options=dict(job.options),
    )


def _hop_hyperparameters(values: Mapping[str, Any]) -> HopHyperparameters:
    missing = sorted(set(HOP_FIELDS) - set(values))
    if missing:
        raise ValueError(f"a hop lacks hyperparameters: {', '.join(missing)}")
    return HopHyperparameters(**{name: values[name] for name in HOP_FIELDS})


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A Flower MetricRecord's numbers as floats (lists are not metrics of a hop)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


# ---- Ray and Flower's process-wide settings --------------------------------------------------


@contextlib.contextmanager
def _ray_session(job: SimulationJob) -> Iterator[Any]:
    """Starts (or joins, with ``job.address``) Ray for one job and stops it afterwards."""
    import ray

    if ray.is_initialized():
        raise ValueError("Ray is already initialised in this process; one simulation at a time")
    # Ray's workers import the site package from this interpreter's path.
    path = os.pathsep.join(p for p in sys.path if p)
    arguments: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "runtime_env": {"env_vars": {"PYTHONPATH": path, "FLWR_TELEMETRY_ENABLED": "0"}},
    }
    if job.address:
        arguments["address"] = job.address
    else:
        arguments["address"] = "local"  # a fresh instance, never one `ray start` left running
        if job.ray_cpus is not None:
            arguments["num_cpus"] = job.ray_cpus
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(**arguments)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = job.address or "a local Ray instance"
        raise ValueError(f"cannot start Ray at {where}: {str(exc).splitlines()[0]}") from exc
    try:
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """No telemetry leaves this machine, and Flower logs only its errors."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    from flwr.supercore import telemetry

    telemetry.FLWR_TELEMETRY_ENABLED = "0"  # read at every event; set once at import
    with flower_logs_held_back():
        yield
