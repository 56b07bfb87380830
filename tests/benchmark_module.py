"""Loads a script under benchmarks/ as a module for the tests of its pure parts, and the trainer
the tabular benchmarks drive."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

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
