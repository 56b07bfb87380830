"""Small data builders shared by the site-agent tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
