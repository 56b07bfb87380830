"""MedQuAD, paired and equal-tuning, with and without label skew (BENCHMARKS.md §1, issue 17).

Question -> question type (MedQuAD's 16 types) over six sites, in three settings:

* ``sources``: each NIH source (GARD, NIDDK, NINDS, SeniorHealth, CancerGov, NHLBI) is a site;
* ``dirichlet-0.1`` and ``dirichlet-1.0``: the same rows pooled and cut into six sites by Flower
  Datasets' ``DirichletPartitioner`` over the question type (``site_agent.virtual_sites``),
  concentration 0.1 (each site holds one or two types) and 1.0 (milder skew).

Every comparator gets the same trial budget and the same train-only objective (k-fold CV inside
each site's training rows, unweighted mean over the sites), on several resampled splits, and is
scored once on each split's test rows:

* ``searched``: Baton's search (``OrderingStudy``, TPE, its default encoding, size-ordered seed);
* ``random-search``: the same space and executor with a random sampler;
* ``random-order``: the same space, hyperparameters tuned by TPE with the order drawn at random
  in every trial (``sampler="random-order"``); scored as the mean over 24 random orders run at
  its tuned settings (their spread is reported: how much the order matters at tuned settings);
* ``fedavg``: FedAvg aggregated by Flower, learning rate, local steps and rounds tuned by TPE;
* ``pooled``: all training rows in one place, learning rate and steps tuned likewise.

Split s draws each site's rows and its test rows (30%) from an RNG seeded with s, seeds the CV
folds with s and, under label skew, the Dirichlet draw: folds and splits change together.

What is cut to fit 2 shared CPU cores (a LoRA step of MiniLM costs ~0.4 CPU-seconds here, and one
split of one setting needs ~10^4 hops): the model is all-MiniLM-L6-v2 *frozen*, its sentence
embedding (mean-pooled over tokens, L2-normalised, 32 tokens) computed once per question, and a
softmax classifier over the 384 embedding dimensions is what the sites train and pass on (the
site agent's ``tabular`` task, ``model=logistic``, no normalisation), instead of LoRA adapters
plus the head. Rows: at most ``--rows-per-source`` questions per NIH source (drawn once, seed 0);
every row of that pool takes part in every split.

The plan space (``--space``): ``controls`` (default) holds what limits forgetting, as issue 17
asks: each site's step budget (``--max-steps``, default 120) split over 1-12 cycles (more cycles,
shorter visits at equal compute), a per-hop learning-rate decay, a proximal term and a final
consolidation cycle; ``budget`` is ``controls`` at a fixed compute (every trial spends each site's
whole budget, so the sampler trades cycles against visit length, not against compute; per-hop
decay 0.97-1); ``narrow`` is session 5's (1-2 cycles of up to 30 steps per visit).

``--seed-default`` gives every comparator the same kind of first trial, Baton's documented
default start (``ordering.short_cycles_seed``: the space's most cycles, each site's whole budget,
the learning rate at the top of its range decayed to 0.3 of it by the last regular hop, chosen on
development splits 100-101 by ``benchmarks/medquad_default_dev.py``): searched and random search
run that very plan (size order) first, the tuned random order its hyperparameters with a random
order, FedAvg and pooled their counterparts (``baseline_defaults``). ``--plain-random-search``
adds random search without it; ``--startup`` sets TPE's random start-up trials.
``--default-final-fraction`` and ``--default-consolidation STEPS:FACTOR`` change that default
start (its last regular hop's fraction of the learning rate, its consolidation cycle).
``--only-searched`` runs the searched study alone and ``--reuse-baselines REPORT`` (with a run or
with ``--merge``) takes the other methods from an earlier report of the same design and splits:
a default start's variant is then measured at the cost of one study.
``--max-forgetting`` makes the three sequential studies select as ``OrderingStudy`` does under a
forgetting limit (within it first, then by CV value). ``--model lora-top`` trains LoRA on
MiniLM's top layer(s) instead of the head over frozen embeddings (``medquad_lora.py``).
``benchmarks/medquad_gap.py`` splits the gap to pooled into what was never learnt and what was
forgotten, for fixed schedules.

Every run is the in-process twin (``site_agent.simulation``): the sites' own trainer code with
weights moving as tensors; ``benchmarks/heart_disease.py`` checks that twin for the ``tabular``
trainer bit for bit against real site processes. A trial whose model predicts one class on every
held-out row, or whose train loss diverges, fails with its reason and is never selected.

Reported per setting: paired per-split differences (searched minus each comparator) with mean,
95% t-interval over splits, Wilcoxon signed-rank p and wins; the 24 random orders' spread per
split; each site's test score after each visit of the selected schedule and the worst site's
drop from its post-visit peak; Optuna's importances of the order against the hyperparameters
(``ordering.order_importance``) in the searched and random-search studies; the first-three-words
lookup floor.

    .venv/bin/python benchmarks/medquad_paired.py                  # 5 splits x 3 settings
    .venv/bin/python benchmarks/medquad_paired.py --model lora-top --max-steps 60
    .venv/bin/python benchmarks/medquad_paired.py --space budget --seed-default --max-steps 60
    .venv/bin/python benchmarks/medquad_paired.py --quick          # smoke run
    .venv/bin/python benchmarks/medquad_paired.py --render benchmarks/results/medquad_paired.json
    BATON_MEDQUAD_DIR=/path/to/medquad ...                         # data elsewhere

Writes benchmarks/results/medquad_paired.{json,md,png}, after every (setting, split).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from heart_disease_paired import _reordered, paired_summary, study_choice

from coordinator.console.demo import packaged_minilm
from ordering import (
    SHORT_CYCLES_FINAL_FRACTION,
    SHORT_CYCLES_LEARNING_RATE_POSITION,
    CandidatePlan,
    FloatRange,
    IntRange,
    OrderingStudy,
    PlanFailed,
    SearchSpace,
    SiteScore,
    TrialOutcome,
    TrialRecord,
    order_importance,
    random_search,
    short_cycles_seed,
)
from ordering._samplers import is_order_param
from site_agent.examples import TabularExample, TextExample
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.simulation import (
    CrossValidationResult,
    FederatedResult,
    HopRecord,
    SequentialResult,
    cross_validate,
    divergence_reason,
    evaluate_sites,
    train_fedavg,
    train_pooled,
    train_sequential,
)
from site_agent.tasks import HopHyperparameters as SiteHyperparameters
from site_agent.tasks import HopOutcome, TabularTrainer, TaskSpec, Trainer, create_trainer
from site_agent.virtual_sites import partition_sources

logger = logging.getLogger("benchmarks.medquad_paired")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# ../shared/datasets/medquad beside the checkout (a worktree sits one level deeper).
DEFAULT_DATA = next(
    (
        parent / "shared" / "datasets" / "medquad"
        for parent in Path(__file__).resolve().parents[2:4]
        if (parent / "shared" / "datasets" / "medquad").is_dir()
    ),
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad",
)
SOURCES = ("GARD", "NIDDK", "NINDS", "SeniorHealth", "CancerGov", "NHLBI")
SETTINGS = ("sources", "dirichlet-0.1", "dirichlet-1.0")
COMPARATORS = ("random-search", "random-order", "fedavg", "pooled")
# With --seed-default: random search without the enqueued default (the other comparators get it).
PLAIN = "random-search-plain"
METHODS = ("searched", *COMPARATORS)
VIRTUAL_SITES = tuple(f"site-{i}" for i in range(1, 7))
TEST_SHARE = 0.3
MAX_LENGTH = 32
BATCH = 16
N_STARTUP_TRIALS = 3  # the study's default TPE start-up; the tuned baselines get the same
RANDOM_ORDERS = 24
LR = (1e-3, 0.3)
COLLAPSED_KEY = "collapsed"
OPTIONS = {"model": "logistic", "normalisation": "none"}


# ---- data: one frozen MiniLM embedding per question ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    source: str
    text: str
    label: str
    features: tuple[float, ...]

    def example(self) -> TabularExample:
        return TabularExample(features=self.features, label=self.label)


def load_pool(data: Path, rows_per_source: int, cache: Path) -> list[Row]:
    """At most ``rows_per_source`` deduplicated questions per source (drawn with seed 0), each
    with its MiniLM sentence embedding (cached on disk by question text and model)."""
    texts: list[tuple[str, TextExample]] = []
    with tempfile.TemporaryDirectory(prefix="baton-medquad-") as scratch:
        for source in SOURCES:
            registered = register_dataset(
                Path(scratch) / source,
                "medquad",
                data / "medquad.jsonl.gz",
                task_type="seq-classification",
                fmt="medquad",
                validation_fraction=0.0,
                test_fraction=0.0,
                seed=0,
                options={"source": source, "dedupe": "true"},
            )
            rows = [e for e in registered.train + registered.test if isinstance(e, TextExample)]
            rows.sort(key=lambda e: (e.text, e.label))
            random.Random(f"medquad-pool:{source}").shuffle(rows)
            texts += [(source, e) for e in rows[:rows_per_source]]
    vectors = _embed([e.text for _, e in texts], cache)
    return [
        Row(source, e.text, e.label, tuple(float(v) for v in vector))
        for (source, e), vector in zip(texts, vectors, strict=True)
    ]


def _embed(texts: Sequence[str], cache: Path) -> np.ndarray:
    model_dir = packaged_minilm()
    key = hashlib.sha256(("\n".join(texts) + f"|{MAX_LENGTH}|{model_dir}").encode()).hexdigest()
    path = cache / f"medquad-minilm-{key[:16]}.npy"
    if path.exists():
        return np.load(path)
    from transformers import AutoModel, AutoTokenizer

    started = time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            batch = tokenizer(
                list(texts[start : start + 64]),
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    vectors = np.concatenate(out).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    logger.info("embedded %d questions in %.0f CPU s", len(texts), time.process_time() - started)
    return vectors


def _dataset(
    name: str, train: Sequence[Row], test: Sequence[Row], seed: int, labels: Sequence[str]
) -> RegisteredDataset:
    fingerprint = hashlib.sha256(
        f"{name}:{seed}:".encode() + "\n".join(r.text for r in (*train, *test)).encode()
    ).hexdigest()
    return RegisteredDataset(
        name=name,
        task_type="tabular",
        fingerprint=fingerprint,
        train=tuple(r.example() for r in train),
        validation=(),
        test=tuple(r.example() for r in test),
        feature_names=tuple(f"e{i}" for i in range(len(train[0].features))),
        labels=tuple(sorted({r.label for r in (*train, *test)} & set(labels))),
        seed=seed,
    )


def split_sites(
    pool: Sequence[Row], setting: str, split: int
) -> tuple[list[RegisteredDataset], dict[str, list[Row]]]:
    """The six sites of ``setting`` on ``split``: their datasets (test rows drawn with the
    split's RNG, CV folds seeded with it) and their rows (for the lookup floor)."""
    labels = sorted({r.label for r in pool})
    rng = random.Random(f"medquad-split:{split}")
    order = list(range(len(pool)))
    rng.shuffle(order)
    is_test = {index: position < TEST_SHARE * len(pool) for position, index in enumerate(order)}
    if setting == "sources":
        groups = {s.lower(): [i for i in range(len(pool)) if pool[i].source == s] for s in SOURCES}
    else:
        alpha = float(setting.split("-", 1)[1])
        # Partition the pool's rows by question type with Flower Datasets, each row keeping
        # its train/test assignment; row indices ride along as a one-column feature.
        indexed = [
            TabularExample(features=(float(i),), label=pool[i].label) for i in range(len(pool))
        ]
        whole = RegisteredDataset(
            name="medquad",
            task_type="tabular",
            fingerprint="pool",
            train=tuple(e for i, e in enumerate(indexed) if not is_test[i]),
            validation=(),
            test=tuple(e for i, e in enumerate(indexed) if is_test[i]),
            feature_names=("row",),
            labels=tuple(labels),
            seed=split,
        )
        sites = partition_sources(
            [("medquad", whole)], VIRTUAL_SITES, "dirichlet", alpha=alpha, seed=split
        )
        groups = {
            site.name: [int(e.features[0]) for e in (*site.dataset.train, *site.dataset.test)]
            for site in sites
        }
    datasets, rows = [], {}
    for name, members in groups.items():
        train = [pool[i] for i in members if not is_test[i]]
        test = [pool[i] for i in members if is_test[i]]
        datasets.append(_dataset(name, train, test, split, labels))
        rows[name] = [pool[i] for i in members]
    return datasets, rows


def lookup_floor(
    pool: Sequence[Row],
    datasets: Sequence[RegisteredDataset],
    rows: Mapping[str, Sequence[Row]],
    split: int,
) -> float:
    """Test accuracy (mean over sites) of predicting the majority type of a question's first
    three words in all sites' training rows (else the overall majority)."""
    rng = random.Random(f"medquad-split:{split}")
    order = list(range(len(pool)))
    rng.shuffle(order)
    test_texts = {pool[i].text for p, i in enumerate(order) if p < TEST_SHARE * len(pool)}

    def key(text: str) -> str:
        return " ".join(text.lower().split()[:3])

    votes: dict[str, Counter[str]] = {}
    overall: Counter[str] = Counter()
    for site_rows in rows.values():
        for row in site_rows:
            if row.text not in test_texts:
                votes.setdefault(key(row.text), Counter())[row.label] += 1
                overall[row.label] += 1
    fallback = overall.most_common(1)[0][0]
    scores = []
    for dataset in datasets:
        test = [r for r in rows[dataset.name] if r.text in test_texts]
        if not test:
            continue
        hits = [
            (votes[key(r.text)].most_common(1)[0][0] if key(r.text) in votes else fallback)
            == r.label
            for r in test
        ]
        scores.append(statistics.fmean(hits))
    return statistics.fmean(scores)


# ---- the twin under CV ------------------------------------------------------------------------


def _spec(labels: Sequence[str]) -> TaskSpec:
    return TaskSpec("tabular", labels=tuple(labels), options=dict(OPTIONS))


def _site_hp(values: Mapping[str, Any]) -> SiteHyperparameters:
    return SiteHyperparameters(**dict(values))


class Scorer:
    """Predictions of a ``logistic`` / ``normalisation=none`` tabular model, computed as its
    forward pass does (``F.linear`` on the float32 features), without building a model per
    call: the twin's trainer spends most of a trial in ``evaluate``'s model set-up. Every
    final model's test accuracy is also taken from ``Trainer.evaluate`` and checked equal."""

    def __init__(
        self,
        labels: Sequence[str],
        predict: Callable[[Mapping[str, torch.Tensor], Sequence[Any]], torch.Tensor] | None = None,
    ) -> None:
        self.labels = {label: i for i, label in enumerate(labels)}
        self._predict = predict  # another model's predictions (``--model lora-top``)
        # id -> (the examples, kept alive so that the id stays theirs; their feature matrix)
        self._rows: dict[int, tuple[Sequence[Any], torch.Tensor]] = {}

    def predictions(
        self, tensors: Mapping[str, torch.Tensor], examples: Sequence[Any]
    ) -> torch.Tensor:
        if self._predict is not None:
            return self._predict(tensors, examples)
        cached = self._rows.get(id(examples))
        if cached is None or cached[0] is not examples:
            if len(self._rows) > 64:
                self._rows.clear()
            matrix = torch.tensor([e.features for e in examples], dtype=torch.float32)
            cached = self._rows[id(examples)] = (examples, matrix)
        logits = torch.nn.functional.linear(
            cached[1], tensors["linear.weight"], tensors["linear.bias"]
        )
        return logits.argmax(dim=-1)

    def accuracy(self, tensors: Mapping[str, torch.Tensor], examples: Sequence[Any]) -> float:
        predicted = self.predictions(tensors, examples)
        targets = torch.tensor([self.labels[e.label] for e in examples])
        return float((predicted == targets).double().mean())

    def collapse(
        self,
        tensors: Mapping[str, torch.Tensor],
        examples_by_site: Sequence[Sequence[Any]],
        split: str,
    ) -> str | None:
        """``simulation.collapse_reason``'s finding (one label for every row at every site)."""
        predicted = torch.cat([self.predictions(tensors, rows) for rows in examples_by_site])
        if len(predicted) and bool((predicted == predicted[0]).all()):
            label = next(k for k, v in self.labels.items() if v == int(predicted[0]))
            return (
                f"collapsed: predicts label {label!r} for every one of the {len(predicted)} "
                f"{split} rows of {len(examples_by_site)} site(s)"
            )
        return None


def memoise_feature_matrices() -> Callable[[], None]:
    """Makes the tabular trainer build each example tuple's float32 feature matrix once.

    ``TabularTrainer`` turns a dataset's examples into a tensor at every hop and every
    validation pass; with 384 features per row that costs more CPU than the hop's optimizer
    steps. The trainer only reads the matrix (``normalisation=none`` returns it unchanged), so
    one shared tensor per example tuple gives the same values (tests check the tensors a plan
    trains to are identical). Returns the function that undoes it."""
    from site_agent.tasks import _tabular

    original = _tabular._matrix
    built: dict[int, tuple[Sequence[TabularExample], torch.Tensor]] = {}

    def matrix(examples: Sequence[TabularExample]) -> torch.Tensor:
        hit = built.get(id(examples))
        if hit is not None and hit[0] is examples:
            return hit[1]
        if len(built) > 256:
            built.clear()
        value = original(examples)
        built[id(examples)] = (examples, value)  # kept alive so that the id stays theirs
        return value

    def undo() -> None:
        _tabular._matrix = original

    _tabular._matrix = matrix
    return undo


def _scorer(trainer: Trainer, spec: TaskSpec) -> Scorer:
    """The fast scorer of the trainer's model: its own ``predictions`` where it has them."""
    return Scorer(spec.labels, getattr(trainer, "predictions", None))


def _losses(trained: Any) -> list[HopRecord]:
    """The hop records whose train losses the divergence guard reads."""
    if isinstance(trained, SequentialResult):
        return list(trained.visits)
    if isinstance(trained, FederatedResult):
        return [hop for round_ in trained.rounds for hop in round_.hops]
    if isinstance(trained, HopOutcome):
        return [HopRecord("pooled", dict(trained.metrics))]
    return []


def _tensors(trained: Any) -> Mapping[str, torch.Tensor]:
    return trained if isinstance(trained, Mapping) else trained.tensors


def _run_cv(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    folds: int,
    train: Callable[[Sequence[RegisteredDataset]], Any],
    scorer: Scorer,
) -> CrossValidationResult:
    """``cross_validate`` with the collapse and divergence guard applied to every comparator:
    any fold whose model predicts one label for every held-out row, or whose train loss
    diverged, fails the trial (``failure_reason``)."""
    failures: list[str] = []

    def guarded(views: Sequence[RegisteredDataset]) -> Any:
        trained = train(views)
        reason = divergence_reason(_losses(trained), labels=len(spec.labels))
        if reason is None:
            reason = scorer.collapse(_tensors(trained), [v.validation for v in views], "validation")
            if reason is not None:
                reason = f"fold {len(failures_seen)}: {reason}"
        failures_seen.append(reason)
        if reason is not None:
            failures.append(reason)
        return trained if isinstance(trained, SequentialResult) else _tensors(trained)

    failures_seen: list[str | None] = []
    try:
        cv = cross_validate(trainer, spec, datasets, folds, guarded, guard=False)
    except ValueError as exc:
        if "diverged" in str(exc):
            raise PlanFailed(f"diverged: {exc}") from exc
        raise
    return dataclasses.replace(cv, failure_reason=failures[0] if failures else None)


class TwinExecutor:
    """Runs a plan as the in-process twin under k-fold CV (a ``PlanExecutor``)."""

    def __init__(
        self,
        trainer: Trainer,
        spec: TaskSpec,
        datasets: Sequence[RegisteredDataset],
        folds: int,
        scorer: Scorer,
    ) -> None:
        self.trainer, self.spec, self.datasets, self.folds = trainer, spec, datasets, folds
        self.scorer = scorer

    def execute(
        self, plan: CandidatePlan, *, budget: float, report: Callable[[int, float], None]
    ) -> TrialOutcome:
        started = time.perf_counter()

        def train(views: Sequence[RegisteredDataset]) -> Any:
            by_name = {view.name: view for view in views}
            visits = [
                (by_name[hop.site], _site_hp(hop.hyperparameters.model_dump())) for hop in plan.hops
            ]
            return train_sequential(self.trainer, self.spec, visits)

        cv = _run_cv(self.trainer, self.spec, self.datasets, self.folds, train, self.scorer)
        return TrialOutcome(
            tuple(
                SiteScore(site, m["accuracy"], int(m["examples"]), cv.folds)
                for site, m in cv.sites.items()
            ),
            {"in-process": time.perf_counter() - started},
            visit_scores=cv.visit_scores(),
            failure_reason=cv.failure_reason,
        )


SPACES = ("controls", "narrow", "budget")
MAX_CYCLES = 12  # the ``controls`` and ``budget`` spaces' most cycles
FEDAVG_MAX_ROUNDS = {"controls": MAX_CYCLES, "budget": MAX_CYCLES, "narrow": 4}
BUDGET_DECAY = (0.97, 1.0)  # ``budget``: per-hop decay (0.97**71 = 0.11 over 12 cycles)


def search_space(sites: Sequence[str], seed: int, max_steps: int, kind: str) -> SearchSpace:
    """The plan space of ``kind``.

    ``narrow`` (session 5): order, 1-2 cycles, ``max_steps`` steps at most per visit, learning
    rate, its per-hop decay and a proximal term. ``controls`` adds what limits forgetting:
    ``max_steps`` is each site's step budget for the whole run, split over 1-12 cycles (more
    cycles, shorter visits at equal compute), the learning rate decays per hop (up to 72 hops, so
    down to 0.9**71 of its start), and a final consolidation cycle of 1-10 steps per site at
    5-100% of the last hop's learning rate. ``budget`` is ``controls`` at a fixed compute: every
    trial spends each site's whole ``max_steps`` (split over its 1-12 cycles), so the sampler
    trades cycles against visit length rather than against compute, and the per-hop decay is
    0.97-1 (0.9**71 left almost nothing of the learning rate in ``controls``' long plans)."""
    if kind not in SPACES:
        raise ValueError(f"unknown space {kind!r} (known: {', '.join(SPACES)})")
    controls: dict[str, Any] = {}
    if kind == "budget":
        controls = {
            "cycles": IntRange(1, MAX_CYCLES),
            "learning_rate_decay": FloatRange(*BUDGET_DECAY),
            "steps": max_steps,
            "steps_split_over_cycles": True,
            "consolidation_steps": IntRange(1, 10),
            "consolidation_learning_rate_factor": FloatRange(0.05, 1.0),
        }
    if kind == "controls":
        controls = {
            "cycles": IntRange(1, MAX_CYCLES),
            "learning_rate_decay": FloatRange(0.9, 1.0),
            "steps": IntRange(6, max_steps),
            "steps_split_over_cycles": True,
            "consolidation_steps": IntRange(1, 10),
            "consolidation_learning_rate_factor": FloatRange(0.05, 1.0),
        }
    narrow = SearchSpace(
        sites=tuple(sites),
        cycles=IntRange(1, 2),
        learning_rate=FloatRange(*LR, log=True),
        learning_rate_decay=FloatRange(0.7, 1.0),
        steps=IntRange(5, max_steps),
        proximal_mu=FloatRange(0.0, 1.0),
        batch_size=BATCH,
        max_grad_norm=0.0,
        seed=seed,
    )
    return dataclasses.replace(narrow, **controls)


def run_plan_on_test(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    plan: CandidatePlan,
    scorer: Scorer,
) -> dict[str, Any]:
    """Trains the plan on the split's training rows, one visit at a time, and scores every site
    on test after each visit (reported, never used to select)."""
    by_name = {d.name: d for d in datasets}
    tensors: Mapping[str, torch.Tensor] | None = None
    after: list[dict[str, Any]] = []
    for hop in plan.hops:
        visit = [(by_name[hop.site], _site_hp(hop.hyperparameters.model_dump()))]
        tensors = train_sequential(trainer, spec, visit, incoming=tensors).tensors
        after.append(
            {"site": hop.site, "test": {d.name: scorer.accuracy(tensors, d.test) for d in datasets}}
        )
    assert tensors is not None
    final = _final_scores(trainer, spec, datasets, tensors, scorer, after[-1]["test"])
    peak: dict[str, float] = {}
    for visit_scores in after:
        site = visit_scores["site"]
        peak[site] = max(peak.get(site, -1.0), visit_scores["test"][site])
    drops = {site: peak[site] - final[site] for site in peak}
    return {
        "plan": plan.describe(),
        "site_test_accuracy": final,
        "test_avg": statistics.fmean(final.values()),
        "after_each_visit": after,
        "test_forgetting": drops,
        "test_worst_forgetting": max(drops.values()),
        "final_collapsed": scorer.collapse(tensors, [d.test for d in datasets], "test"),
    }


def _final_scores(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    tensors: Mapping[str, torch.Tensor],
    scorer: Scorer,
    fast: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Every site's test accuracy by ``Trainer.evaluate``, checked against the fast scorer."""
    scores = evaluate_sites(trainer, spec, tensors, datasets, "test")
    final = {site: m["accuracy"] for site, m in scores.items()}
    fast = (
        fast if fast is not None else {d.name: scorer.accuracy(tensors, d.test) for d in datasets}
    )
    if any(abs(final[s] - fast[s]) > 1e-9 for s in final):
        raise RuntimeError(f"fast scorer disagrees with Trainer.evaluate: {fast} vs {final}")
    return final


def _study_summary(records: Sequence[TrialRecord], chosen: TrialRecord) -> dict[str, Any]:
    return {
        **study_choice(records, chosen),
        "cv_worst_forgetting": chosen.worst_forgetting,
        "trial_values": [r.value for r in records],
    }


def _best(study: OrderingStudy) -> TrialRecord:
    """The study's own choice (best value; under a forgetting limit, within it first)."""
    try:
        return study.best_record()
    except ValueError as exc:
        raise RuntimeError(f"every trial failed: {exc}") from exc


def _importance(study: OrderingStudy) -> dict[str, Any]:
    measured = order_importance(study)
    return {**measured.to_json_dict(), "order_share": measured.order_share}


def default_start(
    space: SearchSpace,
    order: Sequence[str],
    final_fraction: float | None = None,
    consolidation: tuple[int, float] | None = None,
) -> CandidatePlan:
    """Baton's default start (``short_cycles_seed``) in `order`; `final_fraction` and
    `consolidation` (steps, factor) replace its own (0.3, the space's shortest cycle)."""
    steps, factor = consolidation or (None, None)
    return short_cycles_seed(
        space,
        order,
        final_fraction=SHORT_CYCLES_FINAL_FRACTION if final_fraction is None else final_fraction,
        consolidation_steps=steps,
        consolidation_learning_rate_factor=factor,
    )


def tuned_random_order_study(
    executor: TwinExecutor,
    space: SearchSpace,
    split: int,
    trials: int,
    default: CandidatePlan | None,
    max_forgetting: float | None = None,
    startup: int = N_STARTUP_TRIALS,
) -> tuple[OrderingStudy, list[TrialRecord]]:
    """The random order's study on `split`, run for `trials` trials: hyperparameters tuned by
    TPE, the order drawn at random in every trial; with a `default` its hyperparameters first.
    Returns the study and the records of its trials."""
    study = OrderingStudy.create(
        None,
        f"random-order-{split}",
        space,
        "lehmer",
        "mean",
        seed=split,
        sampler="random-order",
        pruning=None,
        max_forgetting=max_forgetting,
        n_startup_trials=startup,
    )
    if default is not None:
        # The default's hyperparameters; its order parameters are left to the sampler (random).
        study.optuna_study.enqueue_trial(
            {k: v for k, v in study.params_for(default).items() if not is_order_param(k)},
            user_attrs={"enqueued": "seed: short cycles, random order"},
        )
    return study, study.optimize(executor, trials, catch=(PlanFailed,))


def fresh_random_orders(sites: Sequence[str], split: int, count: int) -> list[tuple[str, ...]]:
    """`count` distinct random orders of `sites`, drawn from the split's own RNG (the tuned
    random order is scored on these, never on the orders its study tried)."""
    rng = random.Random(f"random-orders:{split}")
    orders: list[tuple[str, ...]] = []
    while len(orders) < count:
        order = list(sites)
        rng.shuffle(order)
        if tuple(order) not in orders:
            orders.append(tuple(order))
    return orders


def sequential_methods(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    split: int,
    trials: int,
    folds: int,
    max_steps: int,
    random_orders: int,
    space_kind: str = "narrow",
    max_forgetting: float | None = None,
    seed_default: bool = False,
    startup: int = N_STARTUP_TRIALS,
    plain_random_search: bool = False,
    default_final_fraction: float | None = None,
    default_consolidation: tuple[int, float] | None = None,
    only_searched: bool = False,
) -> dict[str, Any]:
    """Searched, random search and random order (tuned) on one split (`only_searched`: the
    searched study alone). With `max_forgetting`
    every one of the three studies selects as ``OrderingStudy`` does under that limit (trials
    whose worst CV forgetting stays within it first, then by value).

    The searched study's first trial is the size-ordered seed: the order alone, or with
    `seed_default` Baton's default starting schedule (``ordering.short_cycles_seed``) in that
    order. With `seed_default` random search runs that same plan first too, and the tuned random
    order its hyperparameters (with a random order); `plain_random_search` adds random search
    without it (``random-search-plain``). `startup`: TPE's random start-up trials.
    `default_final_fraction` and `default_consolidation` (steps, factor) change that default
    start (``short_cycles_seed``'s `final_fraction` and consolidation cycle) for all three."""
    sites = [d.name for d in datasets]
    space = search_space(sites, split, max_steps, space_kind)
    scorer = _scorer(trainer, spec)
    executor = TwinExecutor(trainer, spec, datasets, folds, scorer)
    sizes = {d.name: len(d.train) for d in datasets}
    by_size = tuple(sorted(sites, key=lambda s: (sizes[s], s)))
    default = (
        default_start(space, by_size, default_final_fraction, default_consolidation)
        if seed_default
        else None
    )
    out: dict[str, Any] = {}

    started = time.perf_counter()
    searched = OrderingStudy.create(
        None,
        f"searched-{split}",
        space,
        "auto",
        "mean",
        seed=split,
        pruning=None,
        max_forgetting=max_forgetting,
        n_startup_trials=startup,
    )
    if default is None:
        searched.enqueue(by_size, note="seed: sizes")
    else:
        searched.enqueue(default, note="seed: short cycles, sizes")
    records = searched.optimize(executor, trials, catch=(PlanFailed,))
    chosen = _best(searched)
    assert chosen.plan is not None
    out["searched"] = {
        **_study_summary(records, chosen),
        "importance": _importance(searched),
        **run_plan_on_test(trainer, spec, datasets, chosen.plan, scorer),
        "seconds": time.perf_counter() - started,
    }
    if only_searched:
        return out

    for name, seeded in (("random-search", default), (PLAIN, None)):
        if name == PLAIN and not (plain_random_search and default is not None):
            continue
        started = time.perf_counter()
        if seeded is None:
            study = random_search(
                executor,
                space,
                trials,
                seed=split,
                aggregation="mean",
                max_forgetting=max_forgetting,
            )
        else:
            # ``random_search``'s study, with the searched study's first plan queued first.
            study = OrderingStudy.create(
                None,
                f"random-search-{split}",
                space,
                "lehmer",
                "mean",
                seed=split,
                sampler="random",
                pruning=None,
                max_forgetting=max_forgetting,
            )
            study.enqueue(seeded, note="seed: short cycles, sizes")
            study.optimize(executor, trials, catch=(PlanFailed,))
        records = study.history()
        chosen = _best(study)
        assert chosen.plan is not None
        out[name] = {
            **_study_summary(records, chosen),
            "importance": _importance(study),
            **run_plan_on_test(trainer, spec, datasets, chosen.plan, scorer),
            "seconds": time.perf_counter() - started,
        }

    started = time.perf_counter()
    tuned, records = tuned_random_order_study(
        executor, space, split, trials, default, max_forgetting, startup
    )
    chosen = _best(tuned)
    assert chosen.plan is not None
    # The tuned settings on fresh random orders: the order itself is never selected.
    runs = [
        run_plan_on_test(trainer, spec, datasets, _reordered(chosen.plan, o), scorer)
        for o in fresh_random_orders(sites, split, random_orders)
    ]
    values = [r["test_avg"] for r in runs]
    out["random-order"] = {
        **_study_summary(records, chosen),
        "orders": [
            {
                "plan": r["plan"],
                "test_avg": r["test_avg"],
                "test_worst_forgetting": r["test_worst_forgetting"],
                "final_collapsed": r["final_collapsed"],
            }
            for r in runs
        ],
        "spread": {
            "min": min(values),
            "max": max(values),
            "range": max(values) - min(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        },
        "site_test_accuracy": {
            s: statistics.fmean(r["site_test_accuracy"][s] for r in runs) for s in sites
        },
        "test_avg": statistics.fmean(values),
        "test_worst_forgetting": statistics.fmean(r["test_worst_forgetting"] for r in runs),
        "final_collapsed": next((r["final_collapsed"] for r in runs if r["final_collapsed"]), None),
        "seconds": time.perf_counter() - started,
    }
    return out


def _tuned(
    name: str,
    split: int,
    trials: int,
    suggest: Callable[[optuna.Trial], dict[str, Any]],
    score: Callable[[dict[str, Any]], CrossValidationResult],
    startup: int = N_STARTUP_TRIALS,
    first: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A TPE study with the search's sampler settings over a baseline's own hyperparameters,
    `first` (the baseline's counterpart of the search's default start) queued first."""
    study = optuna.create_study(
        study_name=f"{name}-{split}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=split, n_startup_trials=startup),
    )
    if first is not None:
        study.enqueue_trial(dict(first))
    history: list[dict[str, Any]] = []
    for _ in range(trials):
        trial = study.ask()
        params = suggest(trial)
        try:
            cv = score(params)
            reason = cv.failure_reason
        except PlanFailed as exc:
            reason = exc.reason
        if reason is not None:
            trial.set_user_attr("failure_reason", reason)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            history.append({"params": params, "failure_reason": reason})
            continue
        study.tell(trial, cv.mean["accuracy"])
        history.append({"params": params, "cv_accuracy": cv.mean["accuracy"]})
    complete = [h for h in history if "cv_accuracy" in h]
    if not complete:
        raise RuntimeError(f"every {name} trial failed")
    return max(complete, key=lambda h: h["cv_accuracy"]), history


def _tune_and_score(
    name: str,
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    split: int,
    trials: int,
    folds: int,
    suggest: Callable[[optuna.Trial], dict[str, Any]],
    train: Callable[[Mapping[str, Any], Sequence[RegisteredDataset]], Any],
    startup: int = N_STARTUP_TRIALS,
    first: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    scorer = _scorer(trainer, spec)
    chosen, history = _tuned(
        name,
        split,
        trials,
        suggest,
        lambda p: _run_cv(trainer, spec, datasets, folds, lambda views: train(p, views), scorer),
        startup,
        first,
    )
    tensors = _tensors(train(chosen["params"], datasets))
    final = _final_scores(trainer, spec, datasets, tensors, scorer)
    return {
        "trials": trials,
        "failed": [
            {"params": h["params"], "reason": h["failure_reason"]}
            for h in history
            if "failure_reason" in h
        ],
        "chosen_hyperparameters": chosen["params"],
        "cv_accuracy": chosen["cv_accuracy"],
        "cv_worst_forgetting": None,
        "trial_values": [h.get("cv_accuracy") for h in history],
        "site_test_accuracy": final,
        "test_avg": statistics.fmean(final.values()),
        "test_worst_forgetting": None,
        "final_collapsed": scorer.collapse(tensors, [d.test for d in datasets], "test"),
        "seconds": time.perf_counter() - started,
    }


def fedavg(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    split: int,
    trials: int,
    folds: int,
    max_steps: int,
    max_rounds: int = 4,
    startup: int = N_STARTUP_TRIALS,
    first: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """FedAvg with learning rate, local steps (5 to `max_steps`) and rounds (1 to `max_rounds`)
    tuned by TPE, `first` queued first."""

    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        return {
            "learning_rate": trial.suggest_float("learning_rate", *LR, log=True),
            "steps": trial.suggest_int("steps", 5, max_steps),
            "rounds": trial.suggest_int("rounds", 1, max_rounds),
        }

    def train(params: Mapping[str, Any], views: Sequence[RegisteredDataset]) -> Any:
        def schedule(round_: int, site: str) -> SiteHyperparameters:
            return SiteHyperparameters(
                learning_rate=params["learning_rate"],
                steps=params["steps"],
                batch_size=BATCH,
                max_grad_norm=0.0,
                seed=split + round_ - 1,
            )

        return train_fedavg(trainer, spec, views, rounds=params["rounds"], hyperparameters=schedule)

    return _tune_and_score(
        "fedavg", trainer, spec, datasets, split, trials, folds, suggest, train, startup, first
    )


def pooled(
    trainer: Trainer,
    spec: TaskSpec,
    datasets: Sequence[RegisteredDataset],
    split: int,
    trials: int,
    folds: int,
    max_total_steps: int,
    startup: int = N_STARTUP_TRIALS,
    first: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Pooled training with learning rate and steps (10 to `max_total_steps`) tuned by TPE,
    `first` queued first."""

    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        return {
            "learning_rate": trial.suggest_float("learning_rate", *LR, log=True),
            "steps": trial.suggest_int("steps", 10, max_total_steps, log=True),
        }

    def train(params: Mapping[str, Any], views: Sequence[RegisteredDataset]) -> Any:
        hp = SiteHyperparameters(
            learning_rate=params["learning_rate"],
            steps=params["steps"],
            batch_size=BATCH,
            max_grad_norm=0.0,
            seed=split,
        )
        return train_pooled(trainer, spec, views, hp)

    return _tune_and_score(
        "pooled", trainer, spec, datasets, split, trials, folds, suggest, train, startup, first
    )


def parse_consolidation(text: str | None) -> tuple[int, float] | None:
    """``STEPS:FACTOR`` as (steps, factor); None for ``shortest`` (the space's shortest cycle at
    its lowest factor, the default start's own) or None.

    Raises:
        ValueError: If the text is neither.
    """
    if text is None or text == "shortest":
        return None
    try:
        steps, factor = text.split(":")
        return int(steps), float(factor)
    except ValueError:
        raise ValueError(
            f"a consolidation is 'shortest' or STEPS:FACTOR (e.g. 5:0.3), got {text!r}"
        ) from None


def baseline_defaults(
    site_budget: int, max_local: int, max_rounds: int, max_pooled: int
) -> dict[str, dict[str, Any]]:
    """The tuned baselines' counterparts of the search's default start
    (``ordering.short_cycles_seed``), by the same rule: the learning rate at the same position of
    the same range; FedAvg in its most rounds, each site's budget spread over them (as the
    default's visits); pooled training with every site's budget together."""
    low, high = LR
    rate = math.exp(
        math.log(low) + SHORT_CYCLES_LEARNING_RATE_POSITION * (math.log(high) - math.log(low))
    )
    local = min(max(5, math.ceil(site_budget / max_rounds)), max_local)
    return {
        "fedavg": {"learning_rate": rate, "steps": local, "rounds": max_rounds},
        "pooled": {"learning_rate": rate, "steps": max_pooled},
    }


def run_cell(
    trainer: Trainer,
    pool: Sequence[Row],
    setting: str,
    split: int,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Every method on one split in one setting."""
    started, cpu = time.perf_counter(), time.process_time()
    datasets, rows = split_sites(pool, setting, split)
    spec = _spec(sorted({r.label for r in pool}))
    trials, folds, steps = config["trials"], config["folds"], config["max_steps"]
    kind = config.get("space", "narrow")
    methods = sequential_methods(
        trainer,
        spec,
        datasets,
        split,
        trials,
        folds,
        steps,
        config["random_orders"],
        kind,
        config.get("max_forgetting"),
        bool(config.get("seed_default")),
        int(config.get("startup", N_STARTUP_TRIALS)),
        bool(config.get("plain_random_search")),
        config.get("default_final_fraction"),
        parse_consolidation(config.get("default_consolidation")),
        bool(config.get("only_searched")),
    )
    if config.get("only_searched"):
        return _cell(pool, setting, split, datasets, rows, started, cpu, methods)
    # Equal or larger compute for the baselines: under ``controls`` / ``budget`` `steps` is a
    # site's budget for the whole run, so FedAvg gets up to 12 rounds of up to 30 (``budget``:
    # twice the budget over 12 rounds) local steps and pooled
    # training every site's budget together; under ``narrow`` a visit's (session 5's ranges).
    budgeted = kind in ("controls", "budget")
    local = min(steps, 30) if budgeted else steps
    if kind == "budget":  # at most twice the sequential compute: 12 rounds of up to 10 steps
        local = max(5, math.ceil(2 * steps / FEDAVG_MAX_ROUNDS[kind]))
    pooled_steps = len(datasets) * steps if budgeted else 12 * steps
    startup = int(config.get("startup", N_STARTUP_TRIALS))
    firsts = baseline_defaults(steps, local, FEDAVG_MAX_ROUNDS[kind], pooled_steps)
    seeded = bool(config.get("seed_default"))
    methods["fedavg"] = fedavg(
        trainer, spec, datasets, split, trials, folds, local, FEDAVG_MAX_ROUNDS[kind], startup,
        firsts["fedavg"] if seeded else None,
    )  # fmt: skip
    methods["pooled"] = pooled(
        trainer, spec, datasets, split, trials, folds, pooled_steps, startup,
        firsts["pooled"] if seeded else None,
    )  # fmt: skip
    return _cell(pool, setting, split, datasets, rows, started, cpu, methods)


def _cell(
    pool: Sequence[Row],
    setting: str,
    split: int,
    datasets: Sequence[RegisteredDataset],
    rows: Mapping[str, Sequence[Row]],
    started: float,
    cpu: float,
    methods: dict[str, Any],
) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    logger.info(
        "[%s] split %d in %.0f s: %s",
        setting,
        split,
        seconds,
        ", ".join(f"{m} {v['test_avg']:.3f}" for m, v in methods.items()),
    )
    return {
        "setting": setting,
        "split": split,
        "train_rows": {d.name: len(d.train) for d in datasets},
        "test_rows": {d.name: len(d.test) for d in datasets},
        "site_labels": {
            d.name: dict(Counter(getattr(e, "label", "") for e in d.train)) for d in datasets
        },
        "lookup_floor": lookup_floor(pool, datasets, rows, split),
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "methods": methods,
    }


# ---- statistics and report --------------------------------------------------------------------


def _methods(cells: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The methods every cell measured, in `METHODS` order (random search without the default
    start last): all of them, unless a run ran the searched study alone."""
    return tuple(m for m in (*METHODS, PLAIN) if all(m in c["methods"] for c in cells))


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    measured = [v for v in values if v is not None]
    return statistics.fmean(measured) if measured else None


def summarise(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for setting in SETTINGS:
        rows = sorted((c for c in cells if c["setting"] == setting), key=lambda c: c["split"])
        if not rows:
            continue
        methods = {}
        present = _methods(rows)
        for method in present:
            values = [c["methods"][method]["test_avg"] for c in rows]
            forgetting = [c["methods"][method]["test_worst_forgetting"] for c in rows]
            methods[method] = {
                "test_avg_mean": statistics.fmean(values),
                "test_avg_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "cv_mean": statistics.fmean(c["methods"][method]["cv_accuracy"] for c in rows),
                "test_worst_forgetting_mean": _mean_or_none(forgetting),
                "test_worst_forgetting_max": max(
                    (f for f in forgetting if f is not None), default=None
                ),
                "cv_worst_forgetting_mean": _mean_or_none(
                    [c["methods"][method]["cv_worst_forgetting"] for c in rows]
                ),
                "failed_trials": sum(len(c["methods"][method]["failed"]) for c in rows),
                "final_collapsed": sum(1 for c in rows if c["methods"][method]["final_collapsed"]),
                "trials": sum(c["methods"][method]["trials"] for c in rows),
            }
        paired = {
            other: paired_summary(
                [
                    c["methods"]["searched"]["test_avg"] - c["methods"][other]["test_avg"]
                    for c in rows
                ]
            )
            for other in present[1:]
        }
        spreads = (
            [c["methods"]["random-order"]["spread"] for c in rows]
            if "random-order" in present
            else []
        )
        importance = {
            study: [c["methods"][study]["importance"] for c in rows]
            for study in ("searched", "random-search")
            if study in present
        }
        settings[setting] = {
            "splits": [c["split"] for c in rows],
            "methods": methods,
            "paired": paired,
            "random_order_range_mean": _mean_or_none([s["range"] for s in spreads]),
            "random_order_std_mean": _mean_or_none([s["std"] for s in spreads]),
            "order_share_mean": {
                study: _mean_or_none([i["order_share"] for i in values])
                for study, values in importance.items()
            },
            "importance": importance,
            "lookup_floor": statistics.fmean(c["lookup_floor"] for c in rows),
        }
    return settings


def verdict(settings: Mapping[str, Any]) -> list[str]:
    lines = []
    for setting, s in settings.items():
        p = s["paired"]
        if "random-order" in p:
            ro = p["random-order"]
            lines.append(
                f"- {setting}: searched - random order (tuned) {ro['mean']:+.3f} "
                f"[{ro['low']:+.3f}, {ro['high']:+.3f}]: "
                + ("met (interval above 0)" if ro["low"] > 0 else "not met (interval reaches 0)")
            )
        for name in ("random-search", PLAIN):
            if name not in p:
                continue
            rs = p[name]
            lines.append(
                f"- {setting}: searched - {name} {rs['mean']:+.3f} "
                f"[{rs['low']:+.3f}, {rs['high']:+.3f}]: "
                + ("met" if rs["mean"] >= 0 and rs["low"] >= -0.01 else "not met")
                + " (target: mean >= 0, lower bound >= -0.01)"
            )
        if "pooled" in p:
            pooled_gap = p["pooled"]["mean"]
            lines.append(
                f"- {setting}: searched - pooled (tuned) {pooled_gap:+.3f}: "
                + ("met" if pooled_gap >= -0.01 else "not met")
                + " (target: >= -0.01)"
            )
        worst = s["methods"]["searched"]["test_worst_forgetting_max"]
        lines.append(
            f"- {setting}: selected schedule's worst-site forgetting on test, max over splits "
            f"{worst:.3f} (mean {s['methods']['searched']['test_worst_forgetting_mean']:.3f}): "
            + ("met" if worst <= 0.02 else "not met")
            + " (target <= 0.02)"
        )
    return lines


def _fmt(value: float | None, digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _reuse_note(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    reused = list(dict.fromkeys(m for c in cells for m in c.get("reused_methods", ())))
    if not reused:
        return []
    sources = sorted({Path(c["reused_from"]).name for c in cells if "reused_from" in c})
    return [
        f"Reused from an earlier run of the same design (same splits, trials, folds, rows): "
        f"{', '.join(reused)} ({', '.join(sources)}); only the methods not listed ran here, so "
        "a reused comparator that starts from the default start started from that run's.",
        "",
    ]


def markdown(report: Mapping[str, Any]) -> str:
    config = report["config"]
    lines = [
        "# MedQuAD, paired and equal-tuning, with and without label skew",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['machine']}; "
        f"wall {report['wall_seconds'] / 60:.1f} min"
        + (
            f" (summed over {report['processes']} processes, one per split group)"
            if report.get("processes", 1) > 1
            else ""
        )
        + f", CPU {report['cpu_seconds'] / 60:.1f} min, "
        f"load at start {report['load_start']}, now {report.get('load_now', 'n/a')}. "
        f"{report['pool_rows']} questions ({config['rows_per_source']} at most per NIH source), "
        f"{len(report['labels'])} question types; {config['trials']} trials per comparator, "
        f"{config['folds']}-fold CV, "
        + (
            f"space `controls` (each site's {config['max_steps']} steps at most split over 1-"
            f"{MAX_CYCLES} cycles, lr decay per hop 0.9-1, proximal term 0-1, a consolidation "
            "cycle of 1-10 steps per site at 5-100% of the last learning rate)"
            if config.get("space") == "controls"
            else (
                f"space `budget` (each site's {config['max_steps']} steps exactly, split over 1-"
                f"{MAX_CYCLES} cycles, lr decay per hop {BUDGET_DECAY[0]:g}-{BUDGET_DECAY[1]:g}, "
                "proximal term 0-1, a consolidation cycle of 1-10 steps per site at 5-100% of "
                "the last learning rate)"
            )
            if config.get("space") == "budget"
            else f"space `narrow` (1-2 cycles, up to {config['max_steps']} steps per visit)"
        )
        + (
            "; every comparator's first trial is the default start (searched and random search: "
            "`ordering.short_cycles_seed` in size order; random order: its hyperparameters; "
            "FedAvg and pooled: `baseline_defaults`)"
            + (
                f", the default start's last regular hop at "
                f"{config.get('default_final_fraction', SHORT_CYCLES_FINAL_FRACTION):g} of its "
                "learning rate (clipped into the space's decay range) and consolidation "
                f"{config.get('default_consolidation', 'shortest')} (steps:factor)"
                if "default_final_fraction" in config or "default_consolidation" in config
                else ""
            )
            + (
                f", and `{PLAIN}` is random search without it"
                if config.get("plain_random_search")
                else ""
            )
            if config.get("seed_default")
            else ""
        )
        + f", TPE start-up {config.get('startup', N_STARTUP_TRIALS)} trials"
        + f", batch {BATCH}, max forgetting for selection "
        f"{_fmt(config.get('max_forgetting'))}, "
        f"{config['random_orders']} random orders per split. Model: "
        + (
            f"all-MiniLM-L6-v2 with LoRA (r=8, query/value) on its top {config['top_layers']} "
            "layer(s) + the classification head, lower layers frozen and cached, no dropout "
            "(benchmarks/medquad_lora.py)"
            if config.get("model") == "lora-top"
            else "frozen all-MiniLM-L6-v2 sentence embeddings + a softmax head trained across "
            "the sites (see the script's docstring for what is cut)"
        )
        + ". Score: mean over the six sites of test accuracy.",
        "",
        *_reuse_note(report["cells"]),
        "## Targets",
        "",
        *verdict(report["settings"]),
    ]
    for setting, s in report["settings"].items():
        lines += [
            "",
            f"## {setting} (splits {s['splits']})",
            "",
            f"Lookup floor (first three words): {s['lookup_floor']:.3f}. Spread of "
            f"{config['random_orders']} random orders at tuned settings, mean over splits: range "
            f"{_fmt(s['random_order_range_mean'])}, std {_fmt(s['random_order_std_mean'])}. "
            f"Order's share of the parameter importance (PED-ANOVA): searched study "
            f"{_fmt(s['order_share_mean'].get('searched'), 2)}, random-search study "
            f"{_fmt(s['order_share_mean'].get('random-search'), 2)}.",
            "",
            "| method | test avg (mean ± sd) | CV | searched - method [95% CI] | Wilcoxon p | "
            "wins/ties/losses | worst-site forgetting on test (mean, max) | failed trials | "
            "collapsed finals |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method in s["methods"]:
            m = s["methods"][method]
            if method == "searched":
                paired_cells = "— | — | —"
            else:
                d = s["paired"][method]
                paired_cells = (
                    f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | "
                    f"{_fmt(d['wilcoxon_p'])} | "
                    f"{d['wins']}/{d['ties']}/{d['losses']}"
                )
            lines.append(
                f"| {method} | {m['test_avg_mean']:.3f} ± {m['test_avg_std']:.3f} | "
                f"{m['cv_mean']:.3f} | {paired_cells} | "
                f"{_fmt(m['test_worst_forgetting_mean'])}, "
                f"{_fmt(m['test_worst_forgetting_max'])} | "
                f"{m['failed_trials']}/{m['trials']} | {m['final_collapsed']} |"
            )
        lines += [
            "",
            "| split | searched | random order: mean [min, max] of 24 | order share "
            "(searched, random search) | top importances (random search) |",
            "|---|---|---|---|---|",
        ]
        for cell in report["cells"]:
            if cell["setting"] != setting:
                continue
            ms = cell["methods"]
            order_cell = "n/a"
            if "random-order" in ms:
                spread = ms["random-order"]["spread"]
                order_cell = (
                    f"{ms['random-order']['test_avg']:.3f} "
                    f"[{spread['min']:.3f}, {spread['max']:.3f}]"
                )
            shares = [
                ms[k]["importance"]["order_share"] if k in ms else None
                for k in ("searched", "random-search")
            ]
            top = ", ".join(
                f"{k} {v:.2f}"
                for k, v in list(
                    ms.get("random-search", {}).get("importance", {}).get("importances", {}).items()
                )[:3]
            )
            lines.append(
                f"| {cell['split']} | {ms['searched']['test_avg']:.3f} | {order_cell} | "
                f"{_fmt(shares[0], 2)}, {_fmt(shares[1], 2)} | {top or 'n/a'} |"
            )
        first = next(c for c in report["cells"] if c["setting"] == setting)
        searched = first["methods"]["searched"]
        sites = list(searched["site_test_accuracy"])
        lines += [
            "",
            f"Selected schedule of split {first['split']}: {searched['plan']}. "
            "Each site's test accuracy after each visit"
            + (
                " (after each cycle's last visit shown)"
                if len(searched["after_each_visit"]) > 4 * len(searched["site_test_accuracy"])
                else ""
            )
            + ":",
            "",
            "| visit | " + " | ".join(sites) + " |",
            "|---|" + "---|" * len(sites),
        ]
        visits = searched["after_each_visit"]
        for index, visit in enumerate(visits, start=1):
            # Long plans: the visits that end a cycle (every visit is in the JSON).
            if len(visits) > 4 * len(sites) and index % len(sites) and index != len(visits):
                continue
            lines.append(
                f"| {index} {visit['site']} | "
                + " | ".join(f"{visit['test'][s]:.3f}" for s in sites)
                + " |"
            )
        lines.append("")
        lines.append(
            "Train rows per site (split "
            f"{first['split']}): " + ", ".join(f"{k} {v}" for k, v in first["train_rows"].items())
        )
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], out: Path) -> bool:
    """Top: per-split differences, searched minus each comparator. Bottom: per split, the test
    scores of the 24 random orders at tuned settings (box) and the searched schedule's (star)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    columns = max(1, len(settings))
    figure, axes = plt.subplots(2, columns, figsize=(4.5 * columns, 7.5), squeeze=False)
    for column, (setting, s) in enumerate(settings.items()):
        axis = axes[0][column]
        others = list(s["paired"])
        data = [s["paired"][m]["differences"] for m in others]
        axis.boxplot(data, showmeans=True)
        for i, values in enumerate(data, start=1):
            axis.scatter([i] * len(values), values, s=10, alpha=0.6)
        axis.set_xticks(range(1, len(others) + 1), others, rotation=20)
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_title(f"{setting}: searched - comparator")
        axis.set_ylabel("test accuracy difference (per split)")
        axis = axes[1][column]
        cells = sorted(
            (c for c in report["cells"] if c["setting"] == setting), key=lambda c: c["split"]
        )
        orders = [
            [o["test_avg"] for o in c["methods"].get("random-order", {}).get("orders", [])]
            for c in cells
        ]
        if all(orders):
            axis.boxplot(orders)
        axis.scatter(
            range(1, len(cells) + 1),
            [c["methods"]["searched"]["test_avg"] for c in cells],
            marker="*",
            s=80,
            color="tab:red",
            label="searched",
        )
        axis.set_xticks(range(1, len(cells) + 1), [str(c["split"]) for c in cells])
        axis.set_xlabel("split")
        axis.set_ylabel("test accuracy (mean over sites)")
        axis.set_title(f"{setting}: random orders at tuned settings")
        axis.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return True


def _write(report: dict[str, Any], out: Path, name: str) -> None:
    report["settings"] = summarise(report["cells"])
    report["wall_seconds"] = time.perf_counter() - report.pop("_started", time.perf_counter())
    report["load_now"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")


# What a run of other default-start settings (or of the searched study alone) may take from
# an earlier run of the same design: everything but the default start and the methods run.
REUSE_MAY_DIFFER = ("default_final_fraction", "default_consolidation", "only_searched")


def reuse_methods(cell: dict[str, Any], earlier: Mapping[str, Any], path: Path) -> None:
    """Fills in `cell`'s methods it did not run from `earlier`'s report cell of the same setting
    and split (noted in ``reused_methods``).

    Raises:
        SystemExit: If `earlier` has no such cell.
    """
    match = [
        c
        for c in earlier["cells"]
        if (c["setting"], c["split"]) == (cell["setting"], cell["split"])
    ]
    if not match:
        raise SystemExit(f"{path} has no {cell['setting']} split {cell['split']} to reuse")
    reused = [m for m in match[0]["methods"] if m not in cell["methods"]]
    cell["methods"].update({m: match[0]["methods"][m] for m in reused})
    cell["reused_methods"] = reused
    cell["reused_from"] = str(path)


def check_reusable(config: Mapping[str, Any], earlier: Mapping[str, Any], path: Path) -> None:
    """Refuses to reuse methods from a run of another design (trials, folds, steps, rows...).

    Raises:
        SystemExit: Naming the settings that differ.
    """
    keys = (set(config) | set(earlier["config"])) - set(REUSE_MAY_DIFFER)
    differ = sorted(k for k in keys if config.get(k) != earlier["config"].get(k))
    if differ:
        raise SystemExit(
            f"cannot reuse methods from {path}: its run differs in "
            + ", ".join(f"{k} ({earlier['config'].get(k)} vs {config.get(k)})" for k in differ)
        )


def merge(
    reports: Sequence[Mapping[str, Any]],
    out: Path,
    name: str,
    reuse: tuple[Mapping[str, Any], Path] | None = None,
) -> None:
    """One report from runs of the same configuration over different splits: their cells (a
    (setting, split) measured twice is refused), summed wall and CPU time, every command.
    `reuse`: an earlier report (and its path) to take the methods the runs did not run from
    (`reuse_methods`)."""
    configs = {json.dumps(r["config"], sort_keys=True) for r in reports}
    if len(configs) != 1:
        raise SystemExit(f"cannot merge reports of different configs: {sorted(configs)}")
    cells = [cell for r in reports for cell in r["cells"]]
    keys = [(c["setting"], c["split"]) for c in cells]
    if len(set(keys)) != len(keys):
        raise SystemExit("a (setting, split) appears in more than one report")
    merged = dict(reports[0])
    if reuse is not None:
        check_reusable(reports[0]["config"], *reuse)
        for cell in cells:
            reuse_methods(cell, *reuse)
    merged["cells"] = sorted(cells, key=lambda c: (c["split"], SETTINGS.index(c["setting"])))
    merged["command"] = " + ".join(r["command"] for r in reports)
    merged["cpu_seconds"] = sum(r["cpu_seconds"] for r in reports)
    merged["processes"] = len(reports)
    merged["load_start"] = ", ".join(r["load_start"] for r in reports)
    merged["_started"] = time.perf_counter() - sum(r["wall_seconds"] for r in reports)
    _write(merged, out, name)


def add_report_arguments(parser: argparse.ArgumentParser, name: str, merge: str) -> None:
    """--out, --name (default `name`), --render and --merge (help `merge`): where a MedQuAD
    benchmark writes its report, and its report-only runs."""
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=name)
    parser.add_argument("--render", type=Path, help="re-render a JSON report's Markdown and plot")
    parser.add_argument("--merge", type=Path, nargs="+", help=merge)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("BATON_MEDQUAD_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--splits", type=int, default=5, help="splits first-split .. N-1")
    parser.add_argument("--first-split", type=int, default=0, help="to share splits out")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="a site's step budget for the run (controls, default 120) or per visit (narrow, 30)",
    )
    parser.add_argument("--rows-per-source", type=int, default=300)
    parser.add_argument("--random-orders", type=int, default=RANDOM_ORDERS)
    parser.add_argument(
        "--space",
        choices=SPACES,
        default="controls",
        help="controls: 1-12 cycles sharing each site's --max-steps, lr decay, proximal term, "
        "consolidation cycle; budget: controls with every trial spending the whole --max-steps; "
        "narrow: session 5's 1-2 cycles of up to --max-steps per visit",
    )
    parser.add_argument(
        "--model",
        choices=("frozen", "lora-top"),
        default="frozen",
        help="frozen: a softmax head over frozen MiniLM sentence embeddings; lora-top: LoRA "
        "(r=8, query/value) on MiniLM's top layer(s) + the classification head, lower layers "
        "cached (benchmarks/medquad_lora.py)",
    )
    parser.add_argument("--top-layers", type=int, default=1, help="lora-top: layers with LoRA")
    parser.add_argument(
        "--seed-default",
        action="store_true",
        help="every comparator's first trial is Baton's default start (ordering.short_cycles_seed"
        ", in size order; the tuned baselines get its counterpart, baseline_defaults)",
    )
    parser.add_argument(
        "--plain-random-search",
        action="store_true",
        help="with --seed-default, also random search without the default (random-search-plain)",
    )
    parser.add_argument(
        "--default-final-fraction",
        type=float,
        default=None,
        help="with --seed-default: the default start's last regular hop's fraction of its "
        f"learning rate (default {SHORT_CYCLES_FINAL_FRACTION:g}, clipped into the space's decay)",
    )
    parser.add_argument(
        "--default-consolidation",
        default=None,
        help="with --seed-default: the default start's consolidation cycle, STEPS:FACTOR "
        "(default: the space's shortest at its lowest factor)",
    )
    parser.add_argument(
        "--startup", type=int, default=N_STARTUP_TRIALS, help="TPE's random start-up trials"
    )
    parser.add_argument("--only-searched", action="store_true", help="run the searched study alone")
    parser.add_argument(
        "--reuse-baselines",
        type=Path,
        default=None,
        help="take the methods this run does not run from this earlier report of the same "
        "design (e.g. with --only-searched and another default start)",
    )
    parser.add_argument(
        "--max-forgetting",
        type=float,
        default=None,
        help="select within this worst-site CV forgetting first (OrderingStudy(max_forgetting))",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "baton-medquad-cache"
    )
    parser.add_argument("--quick", action="store_true", help="1 split, 3 trials, 2 folds")
    add_report_arguments(
        parser, "medquad_paired", merge="combine reports of the same config into --out/--name"
    )
    args = parser.parse_args(argv)
    if args.merge:
        reuse = (
            None
            if args.reuse_baselines is None
            else (json.loads(args.reuse_baselines.read_text()), args.reuse_baselines)
        )
        merge([json.loads(path.read_text()) for path in args.merge], args.out, args.name, reuse)
        return 0
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report))
        plot(report, args.render.with_suffix(".png"))
        return 0
    try:
        parse_consolidation(args.default_consolidation)
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_steps is None:
        args.max_steps = 120 if args.space in ("controls", "budget") else 30
    if args.quick:
        args.splits, args.trials, args.folds, args.random_orders = 1, 3, 2, 3
        args.rows_per_source, args.name = 60, f"{args.name}_quick"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("ordering").setLevel(logging.ERROR)
    logging.getLogger("site_agent").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    memoise_feature_matrices()
    started, cpu = time.perf_counter(), time.process_time()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    pool = load_pool(args.data, args.rows_per_source, args.cache)
    trainer: Trainer
    if args.model == "lora-top":
        from medquad_lora import pool_trainer

        trainer, pool = pool_trainer(pool, args.top_layers, MAX_LENGTH)
    else:
        trainer = create_trainer("tabular", base_model_dir=None, device="cpu")
        assert isinstance(trainer, TabularTrainer)
    config = {
        "model": args.model,
        "top_layers": args.top_layers if args.model == "lora-top" else None,
        "trials": args.trials,
        "folds": args.folds,
        "max_steps": args.max_steps,
        "rows_per_source": args.rows_per_source,
        "random_orders": args.random_orders,
        "space": args.space,
        "max_forgetting": args.max_forgetting,
        "seed_default": args.seed_default,
        "plain_random_search": args.plain_random_search and args.seed_default,
        "startup": args.startup,
    }
    # Only when set: reports of runs without them merge with older ones.
    if args.default_final_fraction is not None:
        config["default_final_fraction"] = args.default_final_fraction
    if args.default_consolidation is not None:
        config["default_consolidation"] = args.default_consolidation
    if args.only_searched:
        config["only_searched"] = True
    earlier = None
    if args.reuse_baselines is not None:
        earlier = json.loads(args.reuse_baselines.read_text())
        check_reusable(config, earlier, args.reuse_baselines)
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["medquad_paired.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}",
        "load_start": load_start,
        "config": config,
        "pool_rows": len(pool),
        "pool_sources": dict(Counter(r.source for r in pool)),
        "labels": sorted({r.label for r in pool}),
        "cells": [],
    }
    # Split-major: a run cut short still covers every setting.
    for split in range(args.first_split, args.splits):
        for setting in args.settings:
            cell = run_cell(trainer, pool, setting, split, config)
            if earlier is not None:
                reuse_methods(cell, earlier, args.reuse_baselines)
            report["cells"].append(cell)
            report["cpu_seconds"] = time.process_time() - cpu
            report["_started"] = started
            _write(report, args.out, args.name)
    print((args.out / f"{args.name}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
