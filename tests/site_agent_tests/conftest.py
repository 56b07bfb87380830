"""Shared fixtures for site-agent tests: tiny offline base models and small registered datasets."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from site_agent._synthetic import SYNTHETIC_LABELS, generate_site_records, write_site_dataset
from site_agent.registry import RegisteredDataset, register_dataset
from tests.site_agent_tests.helpers import instruction_rows

N_SITES = 3
EXAMPLES_PER_SITE = 40


@pytest.fixture(autouse=True)
def _unfrozen_heap() -> Iterator[None]:
    """A test whose agent loads a trainer freezes the heap (`settle_heap`): the next test
    starts with every object collectable again."""
    yield
    gc.unfreeze()


class CountedCollector:
    """`gc` as `site_agent.hop_runner` sees it, noting the collections and freezes it makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def collect(self, *args: Any) -> int:
        self.calls.append("collect")
        return gc.collect(*args)

    def freeze(self) -> None:
        self.calls.append("freeze")
        gc.freeze()

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)


@pytest.fixture
def counted_collector(monkeypatch: pytest.MonkeyPatch) -> CountedCollector:
    """The agent's heap settling (`site_agent.hop_runner.settle_heap`), counted."""
    from site_agent import hop_runner

    collector = CountedCollector()
    monkeypatch.setattr(hop_runner, "gc", collector)
    return collector


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT written once per session."""
    from site_agent._tiny_model import write_tiny_base_model

    return write_tiny_base_model(tmp_path_factory.mktemp("tiny_bert"), seed=0)


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama-style causal LM written once per session."""
    from site_agent._tiny_model import write_tiny_causal_lm

    return write_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def labels() -> tuple[str, ...]:
    """The synthetic label set, in classifier output order."""
    return SYNTHETIC_LABELS


@pytest.fixture(scope="session")
def site_datasets(tmp_path_factory: pytest.TempPathFactory) -> list[RegisteredDataset]:
    """One small synthetic triage dataset per site, registered through the real registry."""
    directory = tmp_path_factory.mktemp("sites")
    datasets = []
    for site in range(N_SITES):
        records = generate_site_records(site, N_SITES, n=EXAMPLES_PER_SITE, seed=7)
        path = write_site_dataset(directory / f"site{site}.jsonl", records)
        datasets.append(
            register_dataset(
                directory / "registry",
                f"site{site}",
                path,
                task_type="seq-classification",
                options={"dedupe": "true"},
            )
        )
    return datasets


@pytest.fixture(scope="session")
def instruction_dataset(tmp_path_factory: pytest.TempPathFactory) -> RegisteredDataset:
    """A small registered causal-lm dataset."""
    directory = tmp_path_factory.mktemp("instructions")
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in instruction_rows(40)))
    return register_dataset(directory / "registry", "pairs", path, task_type="causal-lm")
