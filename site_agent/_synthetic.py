"""Seeded synthetic triage notes with per-site label skew and writing style (stdlib only)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

SYNTHETIC_LABELS: tuple[str, ...] = ("cardiac", "respiratory", "neurological")

# Phrases that point at one label: learnable, while the noise below keeps it from being trivial.
_LABEL_PHRASES: dict[str, tuple[str, ...]] = {
    "cardiac": (
        "chest pain radiating to left arm",
        "crushing chest pain",
        "palpitations",
        "troponin elevated",
        "st elevation on ecg",
        "irregular heart rhythm",
        "sweating and pale",
        "swollen ankles",
        "history of heart failure",
        "pain in jaw and left arm",
        "blood pressure very high",
        "new murmur on exam",
    ),
    "respiratory": (
        "shortness of breath",
        "productive cough with green sputum",
        "wheezing",
        "low oxygen saturation",
        "crackles on auscultation",
        "fever and cough",
        "chest x ray shows infiltrate",
        "history of asthma",
        "history of copd",
        "breathing fast",
        "using inhaler more often",
        "coughing up blood",
    ),
    "neurological": (
        "sudden weakness of right side",
        "slurred speech",
        "facial droop",
        "severe headache",
        "seizure at home",
        "new confusion",
        "numbness in left hand",
        "loss of consciousness",
        "blurred vision",
        "unsteady gait",
        "history of stroke",
        "cannot move left leg",
    ),
}

# Phrases that say nothing about the label.
_NONSPECIFIC_PHRASES: tuple[str, ...] = (
    "dizziness",
    "fatigue",
    "nausea",
    "vomiting",
    "chest tightness",
    "anxiety",
    "fall at home",
    "feeling unwell",
    "poor sleep",
    "mild fever",
)

_CONTEXT_PHRASES: tuple[str, ...] = (
    "arrived by ambulance",
    "walked in",
    "accompanied by family",
    "referred by gp",
    "symptoms started this morning",
    "symptoms started two days ago",
    "symptoms for one week",
)

# Some sites write in abbreviations: a vocabulary shift between sites, not between labels.
_ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("shortness of breath", "sob"),
    ("chest pain", "cp"),
    ("on ecg", "on ekg"),
    ("blood pressure", "bp"),
    ("history of", "hx of"),
    ("loss of consciousness", "loc"),
    ("oxygen saturation", "sats"),
    ("chest x ray", "cxr"),
    ("patient", "pt"),
)

_SEXES: tuple[str, ...] = ("male", "female", "man", "woman")

_DOMINANT_LABEL_SHARE = 0.6
_EXTRA_SPECIFIC_PROBABILITY = 0.5
_NONSPECIFIC_PROBABILITY = 0.5
_DISTRACTOR_PROBABILITY = 0.2
_LABEL_NOISE_PROBABILITY = 0.05


def generate_site_records(
    site_index: int, n_sites: int, *, n: int = 200, seed: int = 0
) -> list[dict[str, str]]:
    """Generates synthetic triage notes for one site.

    Site ``i`` over-represents ``SYNTHETIC_LABELS[i % 3]`` (60 % of its rows) and writes in its own
    style (template, abbreviations). Keywords correlate with labels, with distractor keywords and
    5 % label noise.

    Args:
        site_index: Zero-based index of the site, in ``[0, n_sites)``.
        n_sites: Number of sites in the federation.
        n: Number of records to generate.
        seed: Seed; the same ``(site_index, n_sites, n, seed)`` gives the same records.

    Returns:
        Records of the form ``{"text": ..., "label": ...}``.

    Raises:
        ValueError: If the site index is out of range or ``n`` is negative.
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if not 0 <= site_index < n_sites:
        raise ValueError(f"site_index must be in [0, {n_sites}), got {site_index}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")

    rng = random.Random(_derive_seed(seed, site_index, n_sites))
    dominant = SYNTHETIC_LABELS[site_index % len(SYNTHETIC_LABELS)]
    others_share = (1.0 - _DOMINANT_LABEL_SHARE) / (len(SYNTHETIC_LABELS) - 1)
    weights = [
        _DOMINANT_LABEL_SHARE if label == dominant else others_share for label in SYNTHETIC_LABELS
    ]
    style = site_index % 4
    abbreviate = site_index % 2 == 1

    records: list[dict[str, str]] = []
    for _ in range(n):
        label = rng.choices(SYNTHETIC_LABELS, weights=weights)[0]
        text = _compose_note(rng, label, style)
        if abbreviate:
            text = _abbreviate(text)
        if rng.random() < _LABEL_NOISE_PROBABILITY:
            label = rng.choice([other for other in SYNTHETIC_LABELS if other != label])
        records.append({"text": text, "label": label})
    return records


def write_site_dataset(path: Path, records: Iterable[Mapping[str, str]]) -> Path:
    """Writes records as JSON Lines (one ``{"text", "label"}`` object per line).

    Args:
        path: Destination file; parent directories are created.
        records: Records with ``text`` and ``label`` keys.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"text": record["text"], "label": record["label"]}, ensure_ascii=False)
        for record in records
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def synthetic_vocabulary() -> frozenset[str]:
    """Returns every lowercase word the generator can emit (digits excluded)."""
    phrases: list[str] = [p for pool in _LABEL_PHRASES.values() for p in pool]
    phrases += [*_NONSPECIFIC_PHRASES, *_CONTEXT_PHRASES, *_SEXES]
    phrases += [short for _, short in _ABBREVIATIONS]
    phrases += [_template(style, "", "", "", "") for style in range(4)]
    return frozenset(word for phrase in phrases for word in re.findall(r"[a-z]+", phrase))


def _derive_seed(seed: int, site_index: int, n_sites: int) -> int:
    # A hash rather than arithmetic so nearby (seed, site) pairs give unrelated streams.
    digest = hashlib.sha256(f"baton-synthetic:{seed}:{site_index}:{n_sites}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _compose_note(rng: random.Random, label: str, style: int) -> str:
    pool = _LABEL_PHRASES[label]
    count = 2 if rng.random() < _EXTRA_SPECIFIC_PROBABILITY else 1
    phrases = rng.sample(pool, count)
    if rng.random() < _NONSPECIFIC_PROBABILITY:
        phrases.append(rng.choice(_NONSPECIFIC_PHRASES))
    if rng.random() < _DISTRACTOR_PROBABILITY:
        other = rng.choice([candidate for candidate in SYNTHETIC_LABELS if candidate != label])
        phrases.append(rng.choice(_LABEL_PHRASES[other]))
    rng.shuffle(phrases)
    age = str(rng.randint(18, 95))
    sex = rng.choice(_SEXES)
    context = rng.choice(_CONTEXT_PHRASES)
    return _template(style, ", ".join(phrases), age, sex, context)


def _template(style: int, findings: str, age: str, sex: str, context: str) -> str:
    if style == 0:
        return f"patient reports {findings}, {context}"
    if style == 1:
        return f"{age} year old {sex} presents with {findings}. {context}."
    if style == 2:
        return f"triage note: {findings}. {context}. age {age}"
    return f"{sex} aged {age}, complains of {findings}; {context}"


def _abbreviate(text: str) -> str:
    for long_form, short_form in _ABBREVIATIONS:
        text = text.replace(long_form, short_form)
    return text
