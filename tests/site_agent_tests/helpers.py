"""Small data builders shared by the site-agent tests."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from protocols.v1 import baton_pb2 as pb
from site_agent.agent import SiteAgent
from site_agent.registry import register_dataset
from site_agent.settings import SiteSettings

# The read-only shared datasets (../shared/datasets from the repository root); overridable.
SHARED_DATASETS = Path(
    os.environ.get(
        "BATON_SHARED_DATASETS", Path(__file__).resolve().parents[3] / "shared" / "datasets"
    )
)
HEART_DISEASE_DIR = SHARED_DATASETS / "heart_disease"
MEDQUAD_FILE = SHARED_DATASETS / "medquad" / "medquad.jsonl.gz"

# A small instruction/response set whose words the tiny causal LM knows.
_TOPICS = ("fever", "cough", "headache", "rash", "nausea", "fatigue", "dizziness", "seizure")
_CAUSES = ("infection", "asthma", "stroke", "allergy", "sepsis", "anxiety")


def instruction_rows(count: int, *, offset: int = 0) -> list[dict[str, str]]:
    """Distinct instruction/response rows in the tiny causal LM's vocabulary."""
    rows = []
    for index in range(offset, offset + count):
        topic = _TOPICS[index % len(_TOPICS)]
        cause = _CAUSES[(index // len(_TOPICS)) % len(_CAUSES)]
        other = _TOPICS[(index + 3) % len(_TOPICS)]
        rows.append(
            {
                "instruction": f"what causes {topic} in patient {index} ?",
                "response": f"{topic} is often from {cause} and not {other} .",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    """Writes rows as JSON Lines."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_age_chol_csv(path: Path, seed: int, rows: int = 90) -> Path:
    """A CSV of ``rows`` rows (age, chol, a random 0/1 label) drawn with ``seed``."""
    rng = random.Random(seed)
    lines = ["age,chol,label"] + [
        f"{rng.gauss(55, 8):.3f},{rng.gauss(230, 40):.3f},{rng.randint(0, 1)}" for _ in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def statistics_agent(
    tmp_path: Path, *, csv_seed: int, dataset_seed: int = 0, **settings: object
) -> SiteAgent:
    """A site agent (never connected) whose data directory holds the tabular dataset "heart"."""
    source = write_age_chol_csv(tmp_path / "heart.csv", csv_seed)
    register_dataset(tmp_path / "data", "heart", source, task_type="tabular", seed=dataset_seed)
    return SiteAgent(SiteSettings(
        coordinator="localhost:1", ca_certificate=tmp_path / "ca.crt",
        certificate=tmp_path / "site.crt", private_key=tmp_path / "site.key",
        data_dir=tmp_path / "data", require_approval=False, **settings,
    ))  # fmt: skip


class RecordingStub:
    """Stands in for the coordinator's stub: keeps the statistics results a site reports."""

    def __init__(self) -> None:
        self.results: list[pb.StatisticsResult] = []

    def ReportStatistics(self, result: pb.StatisticsResult, timeout: float) -> None:
        self.results.append(result)
