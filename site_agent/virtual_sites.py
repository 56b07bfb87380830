"""Virtual sites for simulation: registered data cut into partitions by Flower Datasets'
partitioners (IID, Dirichlet label skew, natural id = the data's source).

The sources' rows are pooled into an in-memory Hugging Face ``datasets.Dataset`` (row index,
source, label; never the features) that the partitioner splits; every row keeps the
train/validation/test assignment its source's registration gave it, so a partition is a
``RegisteredDataset`` with the same splits the rows had. With ``natural`` each source is one
virtual site, unchanged: exactly the dataset a real site loads.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protocols.simulation import PARTITIONERS, DataSource
from site_agent.examples import DatasetError, Example, InstructionExample
from site_agent.registry import RegisteredDataset, load_registered, register_dataset

__all__ = ["VirtualSite", "load_sources", "partition_sources"]

logger = logging.getLogger(__name__)

_SPLITS = ("train", "validation", "test")
# A Dirichlet partition smaller than this is redrawn (Flower Datasets' default is 10).
_DIRICHLET_MIN_ROWS = 10


@dataclass(frozen=True)
class VirtualSite:
    """One simulated site: its name and the dataset it trains on."""

    name: str
    dataset: RegisteredDataset


def load_sources(
    sources: Sequence[DataSource], dataset: str, task_type: str, *, seed: int = 0
) -> list[tuple[str, RegisteredDataset]]:
    """Loads every source as a site would: a data folder's registration of ``dataset``, or a
    source file registered in a throwaway folder with the registry's defaults and ``seed``.

    Raises:
        ValueError: If a source is missing, malformed or registered for another task type.
    """
    if not sources:
        raise ValueError("no data sources given")
    loaded: list[tuple[str, RegisteredDataset]] = []
    for source in sources:
        path = Path(source.path)
        try:
            if path.is_dir():
                registered = load_registered(path, dataset)
            elif path.is_file():
                with tempfile.TemporaryDirectory(prefix="baton-simulate-") as scratch:
                    registered = register_dataset(
                        Path(scratch), dataset, path, task_type=task_type, seed=seed
                    )
            else:
                raise ValueError(f"data source {source.name!r}: {path} does not exist")
        except DatasetError as exc:
            raise ValueError(f"data source {source.name!r}: {exc}") from exc
        if registered.task_type != task_type:
            raise ValueError(
                f"data source {source.name!r} holds {registered.task_type} data; the plan is "
                f"a {task_type} run"
            )
        loaded.append((source.name, registered))
    features = {registered.feature_names for _, registered in loaded}
    if len(features) > 1:
        raise ValueError("the data sources have different feature columns")
    return loaded


def partition_sources(
    sources: Sequence[tuple[str, RegisteredDataset]],
    sites: Sequence[str],
    partitioner: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[VirtualSite]:
    """Cuts the sources' rows into one partition per virtual site.

    Args:
        sources: (source name, its dataset), e.g. from ``load_sources``.
        sites: The virtual sites' names, in partition order; with ``natural``, the source
            names (each source is one site).
        partitioner: ``iid``, ``dirichlet`` (label skew of concentration ``alpha``) or
            ``natural`` (by source).
        alpha: Dirichlet concentration; smaller is more skewed.
        seed: Seeds the IID shuffle and the Dirichlet draws.

    Returns:
        One virtual site per name, in ``sites`` order.

    Raises:
        ValueError: If the partitioner is unknown, names do not fit it, or a site would get no
            training rows.
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r}; expected one of {PARTITIONERS}")
    if not sites or len(set(sites)) != len(sites):
        raise ValueError("virtual site names must be given and unique")
    if partitioner == "natural":
        by_name = dict(sources)
        if sorted(by_name) != sorted(sites) or len(by_name) != len(sources):
            raise ValueError(
                f"the natural partitioner makes one site per data source "
                f"({', '.join(sorted(by_name))}); the sites are {', '.join(sites)}"
            )
        return [VirtualSite(name, by_name[name]) for name in sites]
    rows = [
        (split, example)
        for _, registered in sources
        for split in _SPLITS
        for example in getattr(registered, split)
    ]
    if len(rows) < len(sites):
        raise ValueError(f"{len(rows)} rows cannot be cut into {len(sites)} sites")
    indices = _partition_indices(
        [_label(example) for _, example in rows], len(sites), partitioner, alpha, seed
    )
    first = sources[0][1]
    fingerprint_base = ",".join(registered.fingerprint for _, registered in sources)
    virtual: list[VirtualSite] = []
    for name, chosen in zip(sites, indices, strict=True):
        by_split: dict[str, list[Example]] = {split: [] for split in _SPLITS}
        for index in sorted(chosen):
            split, example = rows[index]
            by_split[split].append(example)
        if not by_split["train"]:
            raise ValueError(
                f"virtual site {name!r} got no training rows ({len(chosen)} rows in all): "
                f"use fewer sites, more data or a larger alpha"
            )
        fingerprint = hashlib.sha256(
            f"baton-virtual:{fingerprint_base}:{partitioner}:{alpha}:{seed}:{name}".encode()
        ).hexdigest()
        labels = {_label(example) for split in _SPLITS for example in by_split[split]}
        virtual.append(
            VirtualSite(
                name,
                RegisteredDataset(
                    name=first.name,
                    task_type=first.task_type,
                    fingerprint=fingerprint,
                    train=tuple(by_split["train"]),
                    validation=tuple(by_split["validation"]),
                    test=tuple(by_split["test"]),
                    feature_names=first.feature_names,
                    labels=tuple(sorted(labels - {""})),
                    seed=first.seed,
                ),
            )
        )
    return virtual


def _partition_indices(
    labels: Sequence[str], partitions: int, partitioner: str, alpha: float, seed: int
) -> list[list[int]]:
    """Row indices of each partition, as Flower Datasets' partitioner cuts them."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = datasets.Dataset.from_dict({"row": list(range(len(labels))), "label": list(labels)})
    # Both cut the rows in their order (IID: contiguous shards; Dirichlet: each label's rows in
    # runs), and the sources' rows come grouped by source and split; Flower Datasets shuffles
    # before partitioning for the same reason.
    table = table.shuffle(seed=seed)
    if partitioner == "iid":
        cutter: IidPartitioner | DirichletPartitioner = IidPartitioner(num_partitions=partitions)
    else:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        cutter = DirichletPartitioner(
            num_partitions=partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(_DIRICHLET_MIN_ROWS, len(labels) // partitions),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    cutter.dataset = table
    try:
        with warnings.catch_warnings():
            # Dirichlet redraws warn on every retry; only running out of retries matters.
            warnings.simplefilter("ignore", UserWarning)
            return [list(cutter.load_partition(i)["row"]) for i in range(partitions)]
    except ValueError as exc:
        raise ValueError(f"the {partitioner} partitioner failed: {exc}") from exc


def _label(example: Example) -> str:
    """The row's label; causal-lm rows have none (one group)."""
    return "" if isinstance(example, InstructionExample) else str(example.label)
