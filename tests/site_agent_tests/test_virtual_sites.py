"""Virtual sites cut from registered data by Flower Datasets' partitioners."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from protocols.simulation import DataSource
from site_agent.examples import TabularExample
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.virtual_sites import VirtualSite, load_sources, partition_sources


def _csv(path: Path, rows: int, seed: int, positive: float = 0.5) -> Path:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(rows):
        lines.append(
            f"{rng.gauss(55, 8):.2f},{rng.gauss(230, 40):.2f},{int(rng.random() < positive)}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sources(tmp_path: Path) -> list[tuple[str, RegisteredDataset]]:
    register_dataset(
        tmp_path / "north", "heart", _csv(tmp_path / "n.csv", 120, 1), task_type="tabular"
    )
    files = [
        DataSource("north", str(tmp_path / "north")),
        DataSource("south", str(_csv(tmp_path / "s.csv", 80, 2))),
    ]
    return load_sources(files, "heart", "tabular", seed=0)


def _rows(sites: list[VirtualSite], split: str) -> Counter[TabularExample]:
    return Counter(row for site in sites for row in getattr(site.dataset, split))  # type: ignore[misc]


def test_natural_partition_is_each_source_unchanged(
    sources: list[tuple[str, RegisteredDataset]],
) -> None:
    sites = partition_sources(sources, ["south", "north"], "natural")
    assert [site.name for site in sites] == ["south", "north"]
    assert sites[0].dataset is dict(sources)["south"]
    assert sites[1].dataset is dict(sources)["north"]


def test_source_files_are_registered_like_a_site_registers_them(
    sources: list[tuple[str, RegisteredDataset]], tmp_path: Path
) -> None:
    registered = register_dataset(
        tmp_path / "site", "heart", tmp_path / "s.csv", task_type="tabular"
    )
    south = dict(sources)["south"]
    assert (south.train, south.validation, south.test) == (
        registered.train,
        registered.validation,
        registered.test,
    )


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_every_row_lands_at_exactly_one_site_in_its_own_split(
    sources: list[tuple[str, RegisteredDataset]], partitioner: str
) -> None:
    names = [f"v{i}" for i in range(5)]
    sites = partition_sources(sources, names, partitioner, alpha=1.0, seed=3)
    assert [site.name for site in sites] == names
    for split in ("train", "validation", "test"):
        expected = Counter(row for _, d in sources for row in getattr(d, split))
        assert _rows(sites, split) == expected, split
    assert all(site.dataset.train for site in sites)


def test_iid_sites_are_about_equal_and_the_seed_fixes_them(
    sources: list[tuple[str, RegisteredDataset]],
) -> None:
    names = [f"v{i}" for i in range(4)]
    sites = partition_sources(sources, names, "iid", seed=1)
    sizes = [len(s.dataset.train) + len(s.dataset.validation) + len(s.dataset.test) for s in sites]
    assert max(sizes) - min(sizes) <= 1
    assert partition_sources(sources, names, "iid", seed=1) == sites
    assert partition_sources(sources, names, "iid", seed=2) != sites


def test_a_small_dirichlet_alpha_skews_the_labels(
    sources: list[tuple[str, RegisteredDataset]],
) -> None:
    names = [f"v{i}" for i in range(4)]

    def positive_shares(alpha: float) -> list[float]:
        shares = []
        for site in partition_sources(sources, names, "dirichlet", alpha=alpha, seed=0):
            rows = site.dataset.train + site.dataset.validation + site.dataset.test
            shares.append(sum(r.label == "1" for r in rows) / len(rows))  # type: ignore[union-attr]
        return shares

    skewed, even = positive_shares(0.1), positive_shares(1000.0)
    assert max(skewed) - min(skewed) > 0.5
    assert max(even) - min(even) < 0.3


def test_a_site_without_training_rows_is_refused(
    sources: list[tuple[str, RegisteredDataset]],
) -> None:
    with pytest.raises(ValueError, match="got no training rows"):
        partition_sources(sources, [f"v{i}" for i in range(190)], "iid")


def test_natural_sites_must_be_the_sources(sources: list[tuple[str, RegisteredDataset]]) -> None:
    with pytest.raises(ValueError, match="one site per data source"):
        partition_sources(sources, ["north", "east"], "natural")


def test_a_source_of_another_task_type_is_refused(tmp_path: Path) -> None:
    register_dataset(
        tmp_path / "site", "heart", _csv(tmp_path / "a.csv", 30, 1), task_type="tabular"
    )
    with pytest.raises(ValueError, match="holds tabular data; the plan is a seq-classification"):
        load_sources([DataSource("site", str(tmp_path / "site"))], "heart", "seq-classification")


def test_a_missing_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_sources([DataSource("x", str(tmp_path / "nowhere"))], "heart", "tabular")
