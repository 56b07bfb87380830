"""Plans simulated at scale on Flower's simulation engine (Ray): every virtual site trains with
the sites' own ``Trainer`` code in a Flower ClientApp, in a Ray actor with its own CPU/GPU share.

This is the simulator ``baton simulate`` loads through the ``baton.simulators`` entry point
(``protocols.simulation``). A sequential plan is a Flower ``ServerApp`` that sends the hops, in
the plan's order and with the plan's hyperparameters, to the ClientApps, and passes the
returned tensors on unchanged, as the coordinator passes a checkpoint on. Federated
and hybrid plans train each round's members in parallel (a hybrid group as a chain) and
aggregate with the plan's Flower strategy, as the engine does. Every site then scores the
final model. Data is cut by ``site_agent.virtual_sites`` and put
into Ray's object store once; each actor loads it (and builds its trainer) once per job.

Work goes to the SuperNodes in batches, so that a thousand virtual sites cost a handful of
Flower messages a round rather than a thousand: a message names the chains it runs (each chain
its sites and every hop's hyperparameters, from one input), and its reply carries every hop's
metrics and every chain's output. A round's members are split over the engine's lanes (the Ray
actors that can run at once), at most ``_CHAINS_PER_MESSAGE`` chains a message; a sequential
chain goes ``_HOPS_PER_MESSAGE`` hops a message; the final scoring is batched the same way.
Flower runs as many SuperNodes as the largest exchange has messages (``_supernodes``).
Every hop runs exactly as it would one message a hop (its input passes through a Flower
``ArrayRecord`` either way), so the metrics do not change; Flower's simulation engine scans every
queued message for every node every 0.1 s, which a message per virtual site made quadratic.
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
from typing import TYPE_CHECKING, Any, Literal

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
_SITES = "sites"
_CHAINS = "chains"
_WEIGHT = "num-examples"
_NODE_WAIT_SECONDS = 600.0
# Batching (module docstring): chains a training message runs, hops of a sequential chain a
# message runs, sites a scoring message covers.
_CHAINS_PER_MESSAGE = 128
_HOPS_PER_MESSAGE = 128
_SITES_PER_MESSAGE = 128

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

        lanes = _lanes(ray.cluster_resources(), job.cpus_per_site, job.gpus_per_site)
        try:
            run_simulation(
                server_app=(
                    _sequential_server_app(job, hops, chain, lanes)
                    if job.mode == "sequential"
                    else _rounds_server_app(job, chain, lanes)
                ),
                client_app=_client_app(actor_job),
                num_supernodes=_supernodes(len(sites), lanes),
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


@dataclass(frozen=True)
class _Work:
    """Chains one message runs: each chain's sites and their hops' hyperparameters, each chain
    from one of the message's input records (an empty one: fresh tensors from the first hop's
    seed)."""

    chains: tuple[tuple[tuple[str, Mapping[str, Any]], ...], ...]
    inputs: tuple[int, ...]  # per chain, an index into the message's input records


@dataclass(frozen=True)
class _ChainResult:
    """One chain's output and every hop's metrics (with the examples the hop trained on)."""

    output: ArrayRecord
    hops: tuple[tuple[str, dict[str, float]], ...]


def _work_message(work: _Work, inputs: Sequence[ArrayRecord], node: int) -> Message:
    """A training message: ``chains`` and, per chain, its sites, input and hop values."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    config: dict[str, Any] = {_CHAINS: len(work.chains)}
    for c, (hops, source) in enumerate(zip(work.chains, work.inputs, strict=True)):
        config[f"{c}.{_SITES}"] = [site for site, _ in hops]
        config[f"{c}.input"] = source
        for j, (_, values) in enumerate(hops):
            for name in HOP_FIELDS:
                config[f"{c}.{j}.{name}"] = values[name]
    records: dict[str, Any] = {f"{_ARRAYS}.{i}": record for i, record in enumerate(inputs)}
    records[_CONFIG] = ConfigRecord(config)
    return Message(RecordDict(records), dst_node_id=node, message_type=MessageType.TRAIN)


def _chain_results(reply: Message, work: _Work) -> list[_ChainResult]:
    content = reply.content
    results = []
    for c, hops in enumerate(work.chains):
        found = [
            (site, _scalars(content.metric_records[f"{_METRICS}.{c}.{j}"]))
            for j, (site, _) in enumerate(hops)
        ]
        results.append(_ChainResult(content.array_records[f"{_ARRAYS}.{c}"], tuple(found)))
    return results


def _batches(count: int, lanes: int, largest: int) -> list[range]:
    """``range(count)`` cut into contiguous batches: one per lane, at most ``largest`` each."""
    if count <= 0:
        return []
    size = min(largest, max(1, -(-count // max(1, lanes))))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _sequential_server_app(
    job: SimulationJob, hops: Sequence[tuple[str, HopHyperparameters]], chain: _Chain, lanes: int
) -> ServerApp:
    """Sends the hops in order, ``_HOPS_PER_MESSAGE`` a message, each segment from the last
    one's tensors, then has every site score the final model on ``job.evaluate_split``."""
    from flwr.app import ArrayRecord
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        nodes = _nodes(grid, _supernodes(len(job.sites), lanes))
        arrays = ArrayRecord()  # empty: the first hop starts fresh from its seed, as in a run
        for segment in _batches(len(hops), 1, _HOPS_PER_MESSAGE):
            part = tuple(
                (site, {name: getattr(hp, name) for name in HOP_FIELDS})
                for site, hp in hops[segment.start : segment.stop]
            )
            work = _Work((part,), (0,))
            what = f"hops {segment.start}-{segment.stop - 1}"
            message = _work_message(work, [arrays], nodes[0])
            (reply,) = _exchange(grid, [message], what)
            (result,) = _chain_results(reply, work)
            arrays = result.output
            chain.hops.extend(
                SimulatedHop(site, {k: v for k, v in metrics.items() if k != _WEIGHT})
                for site, metrics in result.hops
            )
            logger.info("hops %d of %d done", segment.stop, len(hops))
        _finish(grid, job, nodes, arrays, chain, lanes)

    return app


def _rounds_server_app(job: SimulationJob, chain: _Chain, lanes: int) -> ServerApp:
    """Federated and hybrid rounds: every selected member trains its chain from the round's
    input (members in parallel, each chain one site after another), and the plan's Flower
    strategy aggregates the chains' outputs weighted by the examples each chain trained on."""
    from flwr.app import ArrayRecord
    from flwr.serverapp import Grid, ServerApp

    assert job.round_hyperparameters is not None and job.aggregation is not None
    hyperparameters = _hop_hyperparameters(job.round_hyperparameters)
    config = {name: getattr(hyperparameters, name) for name in HOP_FIELDS}
    aggregation = job.aggregation
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        nodes = _nodes(grid, _supernodes(len(job.sites), lanes))
        aggregator = _Aggregator(aggregation)
        arrays = ArrayRecord()  # round 1 starts fresh from the hyperparameters' seed
        for number, members in enumerate(job.rounds, start=1):
            works = [
                _Work(
                    tuple(tuple((site, config) for site in members[i][1]) for i in batch),
                    tuple(0 for _ in batch),
                )
                for batch in _batches(len(members), lanes, _CHAINS_PER_MESSAGE)
            ]
            messages = [
                _work_message(w, [arrays], nodes[k % len(nodes)]) for k, w in enumerate(works)
            ]
            replies = _exchange(grid, messages, f"round {number}")
            results = [
                result
                for work, reply in zip(works, replies, strict=True)
                for result in _chain_results(reply, work)
            ]
            outputs, weights, metrics = [], [], []
            for result in results:  # the engine's hop order: member by member, in chain order
                chain.hops.extend(
                    SimulatedHop(site, {k: v for k, v in m.items() if k != _WEIGHT})
                    for site, m in result.hops
                )
                outputs.append(result.output)
                weights.append(sum(m.get("train_examples", 0.0) for _, m in result.hops))
                last = result.hops[-1][1]
                metrics.append({k: v for k, v in last.items() if k != _WEIGHT})
            arrays, aggregated = aggregator.aggregate(
                number, outputs, weights, metrics, current=arrays if len(arrays) else None
            )
            chain.rounds.append(
                SimulatedRound(number, tuple(n for n, _ in members), tuple(weights), aggregated)
            )
            logger.info("round %d of %d aggregated", number, len(job.rounds))
        _finish(grid, job, nodes, arrays, chain, lanes)

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
    grid: Any,
    job: SimulationJob,
    nodes: Sequence[int],
    arrays: ArrayRecord,
    chain: _Chain,
    lanes: int,
) -> None:
    """Keeps the final tensors and has every site score them on ``job.evaluate_split``,
    ``_SITES_PER_MESSAGE`` sites a message."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    chain.tensors = tensors_from_record(arrays)
    if job.evaluate_split is None:
        return
    batches = [
        list(job.sites[b.start : b.stop])
        for b in _batches(len(job.sites), lanes, _SITES_PER_MESSAGE)
    ]
    messages = [
        Message(
            RecordDict(
                {
                    _ARRAYS: arrays,
                    _CONFIG: ConfigRecord({_SPLIT: job.evaluate_split, _SITES: sites}),
                }
            ),
            dst_node_id=nodes[index % len(nodes)],
            message_type=MessageType.EVALUATE,
        )
        for index, sites in enumerate(batches)
    ]
    replies = _exchange(grid, messages, "the final evaluation")
    for sites, reply in zip(batches, replies, strict=True):
        content = reply.content
        for k, site in enumerate(sites):
            metrics = content.metric_records[f"{_METRICS}.{k}"]
            if len(metrics):
                chain.evaluation[site] = _scalars(metrics)


def _supernodes(sites: int, lanes: int) -> int:
    """Flower SuperNodes to start: as many as the largest exchange sends messages at once.

    A SuperNode is a slot for a message, not a site: every actor holds every partition and a
    message names its sites, so any node serves any site. Flower's engine walks every queued
    message for every node every 0.1 s, so a node per virtual site would cost
    O(sites x messages) a tick for nothing.
    """
    largest = max(
        len(_batches(sites, lanes, _CHAINS_PER_MESSAGE)),
        len(_batches(sites, lanes, _SITES_PER_MESSAGE)),
    )
    return max(1, min(sites, largest))


def _nodes(grid: Any, count: int) -> list[int]:
    """The SuperNodes' ids, in id order, once all ``count`` have come up."""
    deadline = time.monotonic() + _NODE_WAIT_SECONDS
    nodes = list(grid.get_node_ids())
    while len(nodes) < count:
        if time.monotonic() > deadline:
            raise ValueError(f"only {len(nodes)} of {count} Flower SuperNodes came up")
        time.sleep(0.1)
        nodes = list(grid.get_node_ids())
    return sorted(nodes)


def _exchange(grid: Any, messages: list[Message], what: str) -> list[Message]:
    """Sends and waits for every reply, returned in the messages' order; a site's error stops
    the run with its reason."""
    replies = list(grid.send_and_receive(messages))
    if len(replies) != len(messages):
        raise ValueError(f"{what}: {len(replies)} of {len(messages)} messages were answered")
    for reply in replies:
        if reply.has_error():
            raise ValueError(f"{what}: {reply.error.reason}")
    by_message = {reply.metadata.reply_to_message_id: reply for reply in replies}
    return [by_message[message.metadata.message_id] for message in messages]


def _lanes(resources: Mapping[str, float], cpus_per_site: float, gpus_per_site: float) -> int:
    """How many virtual sites Ray can run at once: its actors, one per site's resources."""
    lanes = int(float(resources.get("CPU", 1.0)) // cpus_per_site)
    if gpus_per_site > 0:
        lanes = min(lanes, int(float(resources.get("GPU", 0.0)) // gpus_per_site))
    return max(1, lanes)


# ---- the ClientApp: the sites' part ----------------------------------------------------------


def _client_app(actor_job: _ActorJob) -> ClientApp:
    """The sites' ClientApp; it runs in Ray actors, so it carries only ``actor_job``."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return _train(actor_job, message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _evaluate(actor_job, message)

    return app


def _train(actor_job: _ActorJob, message: Message) -> Message:
    """Runs the message's chains: every hop ``run_hop`` at its site from the last hop's
    tensors, passed on through an ``ArrayRecord`` as a message would carry them."""
    from flwr.app import Message, MetricRecord, RecordDict

    content = message.content
    config = content.config_records[_CONFIG]
    reply = RecordDict()
    for c in range(_int(config[_CHAINS])):
        arrays = content.array_records[f"{_ARRAYS}.{_int(config[f'{c}.input'])}"]
        for j, site in enumerate(_names(config[f"{c}.{_SITES}"])):
            values = {name: config.get(f"{c}.{j}.{name}") for name in HOP_FIELDS}
            try:
                dataset, trainer = _site(actor_job, site)
                hyperparameters = _hop_hyperparameters(
                    {name: value for name, value in values.items() if value is not None}
                )
                incoming = tensors_from_record(arrays) if len(arrays) else None
                outcome = trainer.run_hop(actor_job.spec, dataset, hyperparameters, incoming)
            except ValueError as exc:
                return _failure(message, f"hop at {site}: {exc}")
            arrays = record_from_tensors(outcome.tensors)
            metrics = {**outcome.metrics, _WEIGHT: len(dataset.train)}
            reply[f"{_METRICS}.{c}.{j}"] = MetricRecord(metrics)  # type: ignore[arg-type]
        reply[f"{_ARRAYS}.{c}"] = arrays
    return Message(reply, reply_to=message)


def _evaluate(actor_job: _ActorJob, message: Message) -> Message:
    """Scores the tensors sent on each named site's split; no metrics if a split is empty."""
    from flwr.app import Message, MetricRecord, RecordDict

    config = message.content.config_records[_CONFIG]
    split: Literal["test", "validation"] = "test" if config[_SPLIT] == "test" else "validation"
    tensors = tensors_from_record(message.content.array_records[_ARRAYS])
    reply = RecordDict()
    for k, site in enumerate(_names(config[_SITES])):
        metrics: dict[str, float] = {}
        try:
            dataset, trainer = _site(actor_job, site)
            if dataset.test if split == "test" else dataset.validation:
                metrics = trainer.evaluate(actor_job.spec, dataset, split, tensors)
        except ValueError as exc:
            return _failure(message, f"scoring at {site}: {exc}")
        reply[f"{_METRICS}.{k}"] = MetricRecord(metrics)  # type: ignore[arg-type]
    return Message(reply, reply_to=message)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"a simulation message holds {value!r} where a count belongs")
    return value


def _names(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"a simulation message holds {value!r} where site names belong")
    return [str(v) for v in value]


def _failure(message: Message, reason: str) -> Message:
    from flwr.app import Error, Message

    return Message(Error(code=0, reason=reason), reply_to=message)


def _site(actor_job: _ActorJob, site: str) -> tuple[RegisteredDataset, Trainer]:
    """The site's dataset and the actor's trainer, loaded on the actor's first message."""
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
    if site not in datasets:
        raise ValueError(f"no virtual site {site!r} in this job")
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
