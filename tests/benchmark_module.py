"""Loads a script under benchmarks/ as a module for the tests of its pure parts; the trainer the
tabular benchmarks drive and small synthetic sites for it."""

from __future__ import annotations

import contextlib
import importlib.util
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from site_agent.examples import TabularExample
from site_agent.registry import RegisteredDataset
from site_agent.tasks import TabularTrainer, create_trainer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(script: str, name: str) -> Iterator[ModuleType]:
    """Imports `benchmarks/<script>` as module ``name``, with benchmarks/ on the import path for
    its sibling helpers; both are undone on exit."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(str(BENCHMARKS))


def tabular_trainer() -> TabularTrainer:
    """The CPU tabular trainer a site builds, which the tabular benchmarks train with."""
    trainer = create_trainer("tabular", base_model_dir=None, device="cpu")
    assert isinstance(trainer, TabularTrainer)
    return trainer


def tabular_site(name: str, rows: int, shift: float, seed: int = 3) -> RegisteredDataset:
    """A site of `rows` two-feature rows, labels 0 and 1 alternating, the first feature shifted
    by its label and `shift`; its first 8 rows are also its test rows."""
    rng = random.Random(f"{name}:{seed}")
    examples = []
    for i in range(rows):
        label = i % 2
        features = (label + shift + rng.gauss(0, 0.8), rng.gauss(0, 1.0))
        examples.append(TabularExample(features=features, label=str(label)))
    return RegisteredDataset(
        name=name, task_type="tabular", fingerprint="0" * 64, train=tuple(examples),
        validation=(), test=tuple(examples[:8]), feature_names=("x", "y"), labels=("0", "1"),
        seed=seed,
    )  # fmt: skip
