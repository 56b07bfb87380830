"""What this site has released in answer to statistics requests, and the guards built on it.

Per dataset the site keeps, in ``<state_dir>/statistics_releases.json`` under a file lock, how
many requests it answered, the privacy loss its noised answers spent (zero-concentrated
differential privacy, rho), and for each answered row set a salted digest of every row and the
histogram bins released over it, and, once a per-fold answer covered it, the digests of its
fold partition's training parts. Before computing an answer it refuses when the dataset's
answer budget or privacy budget is spent, when the rows differ from an already answered row
set by fewer rows than the minimum count (differencing), or when a per-fold answer would
partition rows already released per fold in another way (another fold count); over rows
answered before, it releases histogram bins no finer than those released then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock

from site_agent.examples import Example
from site_agent.registry import RegisteredDataset
from site_agent.statistics import (
    BelowMinimumCount,
    SiteAggregates,
    check_fold_sizes,
    coarsened_histogram,
    compute_statistics,
    l2_sensitivity,
    noised,
)

if TYPE_CHECKING:  # numpy is imported where a release is noised, not by a site's hello
    import numpy as np

__all__ = [
    "ReleaseLimits",
    "ReleaseRefused",
    "StatisticsReleases",
    "answer_request",
    "epsilon_of",
    "gaussian_rho",
]

logger = logging.getLogger(__name__)


class ReleaseRefused(Exception):
    """A guard refuses the release; ``code`` is the reason code reported to the coordinator."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ReleaseLimits:
    """The site's limits on statistics answers, per dataset."""

    max_answers: int = 20
    epsilon: float = 1.0  # privacy budget of noised answers, as (epsilon, delta)-DP
    delta: float = 1e-6


def gaussian_rho(sensitivity: float, noise_std: float) -> float:
    """zCDP cost of the Gaussian mechanism: rho = sensitivity^2 / (2 std^2) (Bun & Steinke 2016)."""
    return sensitivity**2 / (2.0 * noise_std**2)


def epsilon_of(rho: float, delta: float) -> float:
    """The epsilon that rho-zCDP implies at ``delta``: rho + 2 sqrt(rho ln(1/delta))."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


@dataclass
class StatisticsReleases:
    """The site's record of statistics answers, in ``path`` (JSON, written atomically)."""

    path: Path
    limits: ReleaseLimits = dataclasses.field(default_factory=ReleaseLimits)

    def release(
        self,
        dataset: str,
        rows: Sequence[Example],
        *,
        min_count: int,
        compute: Callable[[list[list[int]]], tuple[SiteAggregates, float]],
        fold_parts: Sequence[Sequence[Example]] = (),
    ) -> SiteAggregates:
        """Checks the guards, computes the answer and records it, under the file lock.

        Args:
            dataset: The dataset's registered name.
            rows: The rows the answer covers (the training split).
            min_count: The minimum count the answer applies (differencing threshold).
            compute: Given the histogram bin edges already released over these exact rows,
                returns the answer and its privacy cost rho (0 without noise); it is called
                only when the answer and differencing guards pass.
            fold_parts: The further row sets a per-fold answer covers (each cross-validation
                fold's training part, in fold order); each is checked and recorded like
                ``rows``, and the partition is recorded with ``rows``: a later per-fold answer
                over the same rows (under any name) must cover exactly these parts.

        Raises:
            ReleaseRefused: ``statistics-budget-exhausted``, ``fold-count-released`` (the
                rows were released per fold at another fold count or in another partition),
                ``differencing-risk`` or ``privacy-budget-exhausted``; nothing is recorded
                then.
        """
        with self._locked():
            document = self._read()
            spent = document["datasets"].setdefault(dataset, {"answers": 0, "rho": 0.0})
            if spent["answers"] >= self.limits.max_answers:
                raise ReleaseRefused(
                    "statistics-budget-exhausted",
                    f"this site has answered {spent['answers']} statistics requests about "
                    f"dataset {dataset!r}, its limit (max_statistics_answers "
                    f"{self.limits.max_answers})",
                )
            digests = _row_digests(document["salt"], rows)
            row_set = hashlib.sha256("\n".join(digests).encode()).hexdigest()
            parts = []
            for part in fold_parts:
                part_digests = _row_digests(document["salt"], part)
                part_set = hashlib.sha256("\n".join(part_digests).encode()).hexdigest()
                parts.append((part_set, part_digests))
            partition = [part_set for part_set, _ in parts]
            if partition:
                self._check_partition(document, dataset, row_set, partition)
            self._check_differencing(document, dataset, digests, row_set, min_count)
            for part_set, part_digests in parts:
                self._check_differencing(document, dataset, part_digests, part_set, min_count)
            previous = document["row_sets"].get(row_set, {}).get("edges", [])
            answer, rho = compute(previous)
            if rho > 0:
                total = spent["rho"] + rho
                epsilon = epsilon_of(total, self.limits.delta)
                if epsilon > self.limits.epsilon:
                    raise ReleaseRefused(
                        "privacy-budget-exhausted",
                        f"answering would spend rho {total:.4g} on dataset {dataset!r} "
                        f"(epsilon {epsilon:.4g} at delta {self.limits.delta:g}), beyond this "
                        f"site's budget of epsilon {self.limits.epsilon:g}",
                    )
                spent["rho"] = total
            spent["answers"] += 1
            recorded = document["row_sets"].setdefault(
                row_set,
                {"dataset": dataset, "min_count": min_count, "digests": digests, "edges": []},
            )
            recorded["min_count"] = max(recorded["min_count"], min_count)
            edges = list(answer.length_bin_edges)
            if edges and edges not in recorded["edges"]:
                recorded["edges"].append(edges)
            if partition:
                recorded.setdefault(
                    "folds", {"count": len(partition), "parts": partition, "dataset": dataset}
                )
            for part_set, part_digests in parts:
                part_record = document["row_sets"].setdefault(
                    part_set,
                    {"dataset": dataset, "min_count": min_count, "digests": part_digests,
                     "edges": []},
                )  # fmt: skip
                part_record["min_count"] = max(part_record["min_count"], min_count)
            self._write(document)
            logger.info("statistics answer %d about %s recorded (rho spent %.4g)",
                        spent["answers"], dataset, spent["rho"])  # fmt: skip
            return answer

    def spent(self, dataset: str) -> tuple[int, float]:
        """Answers given and rho spent for ``dataset``."""
        return self.listing().get(dataset, (0, 0.0))

    def listing(self) -> dict[str, tuple[int, float]]:
        """Answers given and rho spent, per dataset that was ever asked about."""
        with self._locked():
            datasets = self._read()["datasets"]
        return {name: (int(v["answers"]), float(v["rho"])) for name, v in sorted(datasets.items())}

    @staticmethod
    def _check_partition(
        document: dict[str, Any], dataset: str, row_set: str, partition: list[str]
    ) -> None:
        """Refuses per-fold statistics over training rows already released in another partition.

        Each partition of the same rows passes the differencing guard on its own, but the
        training parts of many partitions together (K = 2, 3, ...) form a system of sums that
        nearly determines single rows; so these rows get one fold count, dealt one way, ever.
        """
        released = document["row_sets"].get(row_set, {}).get("folds")
        if released is None or released["parts"] == partition:
            return
        count = int(released["count"])
        how = (
            f"at {count} folds"
            if count != len(partition)
            else f"in another {count}-fold partition (a registration with another seed)"
        )
        raise ReleaseRefused(
            "fold-count-released",
            f"per-fold statistics of the training rows of dataset {dataset!r} were already "
            f"released {how} as dataset {released['dataset']!r}, and this site releases one "
            "fold partition per training set (several together would describe single rows): "
            f"request --cv-folds {count}, or re-register the dataset with a new split "
            "(`baton-site register --replace --seed N`) to choose again",
        )

    @staticmethod
    def _check_differencing(
        document: dict[str, Any], dataset: str, digests: list[str], row_set: str, min_count: int
    ) -> None:
        if row_set in document["row_sets"]:
            return  # the same rows again: no finer bins than before, noise is budgeted
        mine = Counter(digests)
        for recorded in document["row_sets"].values():
            theirs = Counter(recorded["digests"])
            differing = sum(((mine - theirs) + (theirs - mine)).values())
            threshold = max(min_count, int(recorded["min_count"]))
            if differing < threshold:
                raise ReleaseRefused(
                    "differencing-risk",
                    f"the training rows of dataset {dataset!r} differ by {differing} rows from "
                    f"those of an answered request about dataset {recorded['dataset']!r}, fewer "
                    f"than the minimum count {threshold}: the two answers together would "
                    "describe those rows",
                )

    def _locked(self) -> filelock.BaseFileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.path) + ".lock", timeout=30)

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"salt": secrets.token_hex(16), "datasets": {}, "row_sets": {}}
        try:
            document: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            # Never answer on a lost record: the guards would start from nothing.
            raise ReleaseRefused(
                "statistics-failed", f"statistics release record {self.path} is unreadable: {exc}"
            ) from exc
        return document

    def _write(self, document: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".releases.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(document, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def answer_request(
    dataset: RegisteredDataset,
    releases: StatisticsReleases,
    *,
    min_count: int,
    noise_std: float = 0.0,
    base_model_dir: Path | None = None,
    rng: np.random.Generator | None = None,
    cv_folds: int = 0,
) -> SiteAggregates:
    """A statistics request's answer, behind every guard of the site's release record.

    Refuses below the minimum count first, then past the dataset's answer budget, on a
    differencing risk, or past its privacy budget (``StatisticsReleases.release``). Computes
    the exact aggregates (small cells suppressed or merged); over rows answered before, joins
    histogram bins so that only edges every earlier answer released remain (two groupings of
    the same rows would otherwise give the counts of their finer common grouping); with noise,
    charges the Gaussian mechanism's zCDP cost, rho = sensitivity^2 / (2 noise_std^2), before
    adding the noise. With ``cv_folds`` the answer also holds each fold's training-part
    aggregates (``compute_statistics``); every fold must hold ``min_count`` rows, and each
    fold's training part passes the differencing guard and is recorded like the split.
    Those guards bound each difference of two released aggregates, not what many partitions
    of the same rows reveal together, so the training rows are released per fold in one
    partition only: the first per-fold answer fixes the fold count (and deal) for those rows,
    under any dataset name, and another is refused as ``fold-count-released``.
    One answer, whatever the folds, counts once against the answer budget.

    Raises:
        BelowMinimumCount: Fewer training rows than ``min_count``, or a fold holds fewer.
        ReleaseRefused: A guard refuses; nothing is released or recorded.
        ValueError: As ``compute_statistics``.
    """
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
    if len(dataset.train) < min_count:
        raise BelowMinimumCount(
            f"dataset {dataset.name!r} has {len(dataset.train)} training rows, fewer than the "
            f"{min_count} any released aggregate must cover"
        )
    fold_parts: list[tuple[Example, ...]] = []
    if cv_folds:
        check_fold_sizes(dataset, cv_folds, min_count)
        fold_parts = [dataset.fold_view(fold, cv_folds).train for fold in range(cv_folds)]

    def compute(previous_edges: list[list[int]]) -> tuple[SiteAggregates, float]:
        exact = compute_statistics(
            dataset, min_count=min_count, base_model_dir=base_model_dir, cv_folds=cv_folds
        )
        for edges in previous_edges:
            exact = coarsened_histogram(exact, edges)
        if noise_std == 0:
            return exact, 0.0
        import numpy as np

        rho = gaussian_rho(l2_sensitivity(dataset, exact), noise_std)
        return noised(exact, noise_std, rng or np.random.default_rng()), rho

    return releases.release(
        dataset.name, dataset.train, min_count=min_count, compute=compute, fold_parts=fold_parts
    )


def _row_digests(salt: str, rows: Sequence[Example]) -> list[str]:
    """Salted, sorted digests of the rows' contents (a multiset: duplicates are kept).

    The salt is random per site, so the record cannot be matched against digests of guessed
    rows computed elsewhere.
    """
    digests = []
    for row in rows:
        content = json.dumps([type(row).__name__, dataclasses.asdict(row)], sort_keys=True)
        digests.append(hashlib.sha256(f"{salt}\n{content}".encode()).hexdigest()[:32])
    return sorted(digests)
