"""Shared fixtures for site-agent tests: a tiny offline base model and synthetic site data."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_agent._data import TextDataset, load_text_dataset
from site_agent._synthetic import SYNTHETIC_LABELS, generate_site_records, write_site_dataset

N_SITES = 3
EXAMPLES_PER_SITE = 40


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT written once per session."""
    from site_agent._tiny_model import write_tiny_base_model

    return write_tiny_base_model(tmp_path_factory.mktemp("tiny_bert"), seed=0)


@pytest.fixture(scope="session")
def labels() -> tuple[str, ...]:
    """The synthetic label set, in classifier output order."""
    return SYNTHETIC_LABELS


@pytest.fixture(scope="session")
def site_datasets(tmp_path_factory: pytest.TempPathFactory) -> list[TextDataset]:
    """One small synthetic dataset per site, loaded through the real JSONL path."""
    directory = tmp_path_factory.mktemp("sites")
    datasets = []
    for site in range(N_SITES):
        records = generate_site_records(site, N_SITES, n=EXAMPLES_PER_SITE, seed=7)
        path = write_site_dataset(directory / f"site{site}.jsonl", records)
        datasets.append(load_text_dataset(path, labels=SYNTHETIC_LABELS, seed=0))
    return datasets
