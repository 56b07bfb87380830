"""The site's dataset registry: validates a source file once, fingerprints it and fixes its split.

A registration is ``<data_dir>/<name>/registration.json``: the source's absolute path and sha256,
the format and options, the seeded train/validation/test assignment (row indices) and aggregate
counts. The data itself is never copied; loading refuses the source if its bytes changed, and the
hello's listing reports it ``changed`` (hashed again, or its file identity unchanged since a hash
matched: `_source_identity`). Only aggregate counts ever leave this module's callers. Stdlib only;
the parsers (`site_agent.loaders`) are imported when a file is registered or loaded (the hello's
listing loads a legacy ``<name>.jsonl``, to follow its changes), not by listing registrations; numpy
only by FLamby's heart-disease split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from site_agent.examples import (
    TASK_TYPES,
    DatasetError,
    Example,
    InstructionExample,
    TabularExample,
    TextExample,
)

if TYPE_CHECKING:
    from site_agent.loaders import SourceRows

__all__ = [
    "REGISTRATION_FILE",
    "DatasetError",
    "InstructionExample",
    "RegisteredDataset",
    "TabularExample",
    "TextExample",
    "list_registered",
    "load_registered",
    "register_dataset",
]

logger = logging.getLogger(__name__)

REGISTRATION_FILE = "registration.json"
_REGISTRATION_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Options the registry itself reads, whatever the format.
_REGISTRY_OPTIONS = ("dedupe", "labels")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_ECHO_CHARS = 40
# The agent's old layout: <data_dir>/<name>.jsonl, registered on first use with these settings.
_LEGACY_SUFFIX = ".jsonl"
_LEGACY_OPTIONS = {"dedupe": "true"}
# Parsed datasets kept by `load_registered`, at most this many (a site trains on a few).
_PARSED_ENTRIES = 4
# Sources whose matching hash is kept (`_HashVouches`), at most this many.
_HASHED_ENTRIES = 256


@dataclass(frozen=True)
class RegisteredDataset:
    """A registered dataset, loaded: its examples split into train, validation and test."""

    name: str
    task_type: str
    fingerprint: str  # sha256 of the source file's bytes
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    feature_names: tuple[str, ...] = ()  # tabular
    labels: tuple[str, ...] = ()  # sorted label set seen (classification tasks)
    seed: int = 0  # the registration's split seed; also seeds the cross-validation folds

    def fold_ids(self, folds: int) -> tuple[int, ...]:
        """The cross-validation fold (0 .. folds - 1) of each training row, in ``train`` order.

        Stratified and fixed by the registration: within each label (one group for
        ``causal-lm``), rows are shuffled by an RNG seeded from the registration seed, the fold
        count and the label, then dealt round-robin, the deal continuing from label to label in
        sorted order, so fold sizes differ by at most one and each fold holds about 1/folds of
        every label. The same registration always gives the same folds; another fold count
        gives an independent partition, which is why a site releases per-fold statistics of a
        training set at one fold count only (``site_agent.releases``).

        Raises:
            ValueError: If ``folds`` < 2 or there are fewer training rows than folds.
        """
        if folds < 2:
            raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
        if len(self.train) < folds:
            raise ValueError(
                f"dataset {self.name!r} has {len(self.train)} training rows, fewer than the "
                f"{folds} folds asked for"
            )
        groups: dict[str, list[int]] = {}
        for index, example in enumerate(self.train):
            groups.setdefault(_group(example), []).append(index)
        assignment = [0] * len(self.train)
        dealt = 0
        for group in sorted(groups):
            rows = list(groups[group])
            random.Random(_split_seed(self.seed, f"folds-{folds}", group)).shuffle(rows)
            for row in rows:
                assignment[row] = dealt % folds
                dealt += 1
        return tuple(assignment)

    def fold_view(self, fold: int, folds: int) -> RegisteredDataset:
        """This dataset as fold ``fold`` of ``folds`` sees it: training rows outside the fold
        as ``train``, the fold's rows as ``validation``, and no test rows at all.

        Raises:
            ValueError: As ``fold_ids``, or if ``fold`` is not in [0, folds).
        """
        if not 0 <= fold < folds:
            raise ValueError(f"fold {fold} is not within [0, {folds})")
        ids = self.fold_ids(folds)
        return dataclasses.replace(
            self,
            train=tuple(e for e, f in zip(self.train, ids, strict=True) if f != fold),
            validation=tuple(e for e, f in zip(self.train, ids, strict=True) if f == fold),
            test=(),
        )

    def without_test(self) -> RegisteredDataset:
        """The same dataset with its test split removed (what a search may see)."""
        return dataclasses.replace(self, test=())


# A source whose last change (mtime or ctime) is less than this old when it is hashed is hashed
# again at every load (see `_source_identity`): filesystem timestamps advance in ticks (a few
# milliseconds on Linux' local filesystems, 1-2 s on some others), and a change within the tick
# of the hashed bytes' own change would leave its timestamps as they were.
_RECENT_CHANGE_NS = 3_000_000_000
# How long after a hash matched a file's identity stands in for the next hash: a hop prepared
# ("you are next", which hashes) starts well within it; one that was not, or that comes long
# after, hashes the source in full.
_VOUCHED_FOR_NS = 600_000_000_000

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of a source file.
_SourceIdentity = tuple[int, int, int, int, int]


def _source_identity(path: Path) -> _SourceIdentity | None:
    """What a load and the hello's listing compare instead of hashing a source again; None if
    unreadable.

    Caught without a hash: any write (mtime and ctime move), truncation or extension (size),
    the file replaced by another (device, inode, ctime), its mtime set back by hand (ctime moves
    with it, and only the kernel sets ctime). Not caught, so a hash is what decides there: a
    change within one timestamp tick of the change before it (a source changed less than
    ``_RECENT_CHANGE_NS`` before it was hashed is never vouched for by its identity). Not
    caught by the identity: a change on a filesystem that keeps no mtime/ctime (some FUSE and
    network mounts) or whose clock lags this host's by more than ``_RECENT_CHANGE_NS``, writes
    through a shared writable mapping to a page already dirty (the kernel moves mtime at the
    first write after a writeback only), and anyone who can set the system clock. A hop's
    preparation hashes the source in full all the same (``rehash``), so such a change is
    refused from the next preparation on (a hop that was not prepared trusts the identity if
    a hash matched less than ``_VOUCHED_FOR_NS`` before).
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class _ParsedDatasets:
    """Datasets parsed by `load_registered`, so that a site's hops do not parse the same file
    again and again: a few, the most recently used.

    A key is the registration file (its path and exact text, which holds the source's sha256)
    and the source path. An entry is used only once the caller has found the registered sha256
    in the source: by reading and hashing it again, or by finding the source's identity what it
    was when such a hash matched (`_HashVouches`). A changed file, or a registration written
    again, is parsed afresh (or refused), never served from here. A `RegisteredDataset` is
    immutable (frozen, tuples of frozen examples), so hops may share one.
    """

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._lock = threading.Lock()
        self._parsed: OrderedDict[tuple[str, str, str], RegisteredDataset] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> RegisteredDataset | None:
        with self._lock:
            dataset = self._parsed.get(key)
            if dataset is not None:
                self._parsed.move_to_end(key)
            return dataset

    def get_or_parse(
        self, key: tuple[str, str, str], parse: Callable[[], RegisteredDataset]
    ) -> RegisteredDataset:
        """The entry's dataset (parsed now if there is none), once the caller hashed the source
        and found the registered sha256."""
        known = self.get(key)
        if known is not None:
            return known
        dataset = parse()  # outside the lock: another dataset's hop need not wait for it
        with self._lock:
            self._parsed[key] = dataset
            self._parsed.move_to_end(key)
            while len(self._parsed) > self._entries:
                self._parsed.popitem(last=False)
        return dataset


class _HashVouches:
    """Sources found to hold a registered sha256, by (path, sha256): the identity each had
    then (the same before and after the read) and when (monotonic ns). A load (every hop) and
    the hello's listing (every hello) compare the identity instead of hashing the whole file
    again (`_vouches`); the most recent ones (a site has a few datasets; a source registered
    again leaves its old key behind).
    """

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._lock = threading.Lock()
        self._matched: OrderedDict[tuple[str, str], tuple[_SourceIdentity, int]] = OrderedDict()

    def vouched(self, source: Path, fingerprint: str, identity: _SourceIdentity | None) -> bool:
        """Whether a hash found `fingerprint` in `source` while it had `identity`, less than
        ``_VOUCHED_FOR_NS`` ago."""
        if identity is None:
            return False
        with self._lock:
            return _vouches(self._matched.get((str(source), fingerprint)), identity)

    def matched(self, source: Path, fingerprint: str, identity: _SourceIdentity | None) -> None:
        """A hash just found `fingerprint` in `source`; ``identity``: the source's around that
        read, or None if it moved during it. Vouched for only if its last change is old enough
        for the next one to show (`_changed_long_ago`); else every check hashes it."""
        key = (str(source), fingerprint)
        with self._lock:
            if identity is None or not _changed_long_ago(identity):
                self._matched.pop(key, None)
                return
            self._matched[key] = (identity, time.monotonic_ns())
            self._matched.move_to_end(key)
            while len(self._matched) > self._entries:
                self._matched.popitem(last=False)

    def unmatched(self, source: Path, fingerprint: str) -> None:
        """`source` no longer hashes to `fingerprint`: vouched for no more."""
        with self._lock:
            self._matched.pop((str(source), fingerprint), None)


_PARSED = _ParsedDatasets(_PARSED_ENTRIES)
_HASHED = _HashVouches(_HASHED_ENTRIES)


def register_dataset(
    data_dir: Path,
    name: str,
    source: Path,
    *,
    task_type: str,
    fmt: str = "auto",
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    options: Mapping[str, str] | None = None,
    replace: bool = False,
) -> RegisteredDataset:
    """Validates a source file and registers it under ``name``.

    The split is stratified by label (one group for ``causal-lm``) and depends only on the file's
    bytes and ``seed``: each label keeps about ``test_fraction`` of its rows for test and
    ``validation_fraction`` for validation, always leaving one for training. For the
    ``heart-disease`` format the test split is FLamby's (``test_fraction`` is ignored) and
    ``validation_fraction`` is carved, stratified, from FLamby's train part.

    Options (all strings): ``dedupe=true`` drops exact duplicate rows of text tasks instead of
    refusing them; ``labels=a,b,c`` refuses any other label; format options as in
    ``site_agent.loaders.FORMAT_OPTIONS`` (``source``/``target`` for MedQuAD, ``label_column``
    for CSV, ``center`` for heart disease).

    Args:
        data_dir: The site's data folder; the registration goes to ``data_dir/name/``.
        name: Dataset name: letters, digits, ``.``, ``_``, ``-``; at most 64 characters.
        source: The source file; stored as an absolute path, never copied.
        task_type: One of ``TASK_TYPES``.
        fmt: One of ``site_agent.loaders.FORMATS``, or ``auto`` to pick by file name.
        validation_fraction: Share of each label's rows held out for validation, in [0, 1).
        test_fraction: Share of each label's rows held out for test, in [0, 1).
        seed: Seed of the split.
        options: Registry and format options.
        replace: Overwrite an existing registration of the same name.

    Returns:
        The registered dataset, loaded.

    Raises:
        DatasetError: If an argument is invalid, the name is taken, or the file is malformed.
    """
    return _register(
        Path(data_dir),
        name,
        Path(source),
        task_type=task_type,
        fmt=fmt,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        seed=seed,
        options=dict(options or {}),
        replace=replace,
        auto=False,
    )


def load_registered(data_dir: Path, name: str, *, rehash: bool = False) -> RegisteredDataset:
    """Loads a registered dataset, refusing its source file if it changed since registration.

    The source is read and hashed again unless its identity (device, inode, size, mtime,
    ctime) is what it was when a hash of it last matched, long enough after its last change
    for a later change to show (`_source_identity` says what that does and does not catch);
    ``rehash`` hashes it in any case (a hop's preparation does, off the handoff). The
    registration file itself is read at every load (its parse is kept per exact text).

    A name with no registration but a ``<data_dir>/<name>.jsonl`` file is registered on the
    spot as ``seq-classification`` JSON Lines (seed 0, 0.2 validation, 0.2 test, duplicates
    dropped), and re-registered whenever that file changes: the layout the demo writes.

    Args:
        data_dir: The site's data folder.
        name: The dataset name.
        rehash: Hash the source even if its identity is unchanged.

    Returns:
        The dataset with the splits fixed at registration.

    Raises:
        DatasetError: If there is no such dataset, the source is missing or changed since it was
            registered, or the registration is corrupt.
    """
    data_dir = Path(data_dir)
    _check_name(name)
    registration_path = data_dir / name / REGISTRATION_FILE
    legacy = data_dir / f"{name}{_LEGACY_SUFFIX}"
    if not registration_path.is_file():
        if legacy.is_file():
            return _register_legacy(data_dir, name, legacy)
        raise DatasetError(f"no dataset named {name!r} is registered in {data_dir}")
    registration_text = _read_registration_text(registration_path)
    registration = _parsed_registration(registration_text, str(registration_path))
    source = Path(str(registration["source"]))
    # The exact registration text holds the source's path and sha256: an entry under this key
    # is a parse of bytes that hashed to that sha256, under this exact registration.
    key = (str(registration_path), registration_text, str(source))
    fingerprint = str(registration["fingerprint"])
    if not rehash and _HASHED.vouched(source, fingerprint, _source_identity(source)):
        known = _PARSED.get(key)
        if known is not None:
            return known
    before = _source_identity(source)
    data = _read_bytes(source)
    if _sha256(data) != fingerprint:
        _HASHED.unmatched(source, fingerprint)
        if registration.get("auto") and source == legacy.resolve():
            logger.info("dataset %s: %s changed; registering it again", name, source.name)
            return _register_legacy(data_dir, name, legacy)
        raise DatasetError(
            f"{source}: file changed since dataset {name!r} was registered (sha256 "
            f"{fingerprint}); register it again with --replace"
        )
    # What the next loads (and listings) compare: the identity the file had around the read,
    # if it did not move during it and its last change is old enough for the next one to show.
    _HASHED.matched(source, fingerprint, before if before == _source_identity(source) else None)
    return _PARSED.get_or_parse(key, lambda: _load(registration, data, source, registration_path))


def _vouches(vouch: tuple[_SourceIdentity, int] | None, identity: _SourceIdentity) -> bool:
    """Whether a file read (and hashed) when it had identity ``vouch[0]``, at monotonic time
    ``vouch[1]``, still stands for the file that has ``identity`` now."""
    return (
        vouch is not None
        and vouch[0] == identity
        and time.monotonic_ns() - vouch[1] < _VOUCHED_FOR_NS
    )


def _changed_long_ago(identity: _SourceIdentity) -> bool:
    """Whether a file's last change (mtime or ctime) lies ``_RECENT_CHANGE_NS`` or more in the
    past: a change from now on moves one of them."""
    return time.time_ns() - max(identity[3], identity[4]) >= _RECENT_CHANGE_NS


def list_registered(data_dir: Path) -> list[dict[str, object]]:
    """Summarises the registered datasets: names, formats and aggregate counts only.

    Legacy ``<name>.jsonl`` files are registered on first sight (and followed when they
    change), as ``load_registered`` does.

    Args:
        data_dir: The site's data folder.

    Returns:
        One dict per dataset, sorted by name: ``name``, ``task_type``, ``format``,
        ``fingerprint``, ``rows``, ``counts`` (per split), ``label_counts`` (per split),
        ``features``, ``registered_at`` and ``status`` (``ok``, ``changed`` or ``missing``:
        whether the source still has the registered bytes).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    for legacy in sorted(data_dir.glob(f"*{_LEGACY_SUFFIX}")):
        name = legacy.name.removesuffix(_LEGACY_SUFFIX)
        if _NAME.fullmatch(name):
            try:
                load_registered(data_dir, name)  # registers it, or follows a changed file
            except DatasetError as error:
                logger.error("dataset %s is not usable: %s", name, error)

    summaries: list[dict[str, object]] = []
    for path in sorted(data_dir.glob(f"*/{REGISTRATION_FILE}")):
        try:  # parsed once per exact text (a large dataset's split is a long list of rows)
            registration = _parsed_registration(_read_registration_text(path), str(path))
        except DatasetError as error:
            logger.error("%s", error)
            continue
        status = _source_status(Path(str(registration["source"])), str(registration["fingerprint"]))
        summaries.append(
            {
                "name": registration["name"],
                "task_type": registration["task_type"],
                "format": registration["format"],
                "fingerprint": registration["fingerprint"],
                "rows": registration["rows"],
                "counts": registration["counts"],
                "label_counts": registration["label_counts"],
                "features": len(_string_list(registration.get("feature_names", []), path)),
                "registered_at": registration["registered_at"],
                "status": status,
            }
        )
    return summaries


def _source_status(source: Path, fingerprint: str) -> str:
    """``ok`` if `source` holds the registered bytes, ``changed`` if not (or unreadable),
    ``missing`` if it is gone. Hashed as a stream (no copy of the file in memory), and not
    again while its identity holds what it was when a hash matched (`_HASHED`, as a load)."""
    if not source.is_file():
        return "missing"
    before = _source_identity(source)
    if _HASHED.vouched(source, fingerprint, before):
        return "ok"
    try:
        same = _file_sha256(source) == fingerprint
    except DatasetError:
        same = False
    if not same:
        _HASHED.unmatched(source, fingerprint)
        return "changed"
    _HASHED.matched(source, fingerprint, before if before == _source_identity(source) else None)
    return "ok"


# ---- registration ----------------------------------------------------------------------------


def _register(
    data_dir: Path,
    name: str,
    source: Path,
    *,
    task_type: str,
    fmt: str,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    options: dict[str, str],
    replace: bool,
    auto: bool,
) -> RegisteredDataset:
    _check_name(name)
    if task_type not in TASK_TYPES:
        raise DatasetError(f"unknown task type {task_type!r}; expected one of {list(TASK_TYPES)}")
    for label, fraction in (("validation", validation_fraction), ("test", test_fraction)):
        if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
            raise DatasetError(f"{label} fraction must be in [0, 1), got {fraction}")
    if validation_fraction + test_fraction >= 1.0:
        raise DatasetError("validation and test fractions must leave rows for training")
    from site_agent.loaders import FLAMBY_TRAIN_FRACTION, FORMATS, detect_format

    source = source.resolve()
    if fmt == "auto":
        fmt = detect_format(source, task_type)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {list(FORMATS)} or 'auto'")
    _check_options(options, fmt)
    registration_path = data_dir / name / REGISTRATION_FILE
    if registration_path.exists() and not replace:
        raise DatasetError(
            f"dataset {name!r} is already registered in {data_dir}; pass --replace to overwrite"
        )

    data = _read_bytes(source)
    rows, dropped = _usable_rows(data, source, task_type, fmt, options)
    labels = _label_groups(rows.examples)
    if rows.fixed_test_rows is not None:
        test = set(rows.fixed_test_rows)
        remaining = [index for index in range(len(rows.examples)) if index not in test]
        validation = _stratified_sample(
            rows.examples, remaining, validation_fraction, seed, "validation"
        )
        test_fraction = 1.0 - FLAMBY_TRAIN_FRACTION
    else:
        everything = list(range(len(rows.examples)))
        test = _stratified_sample(rows.examples, everything, test_fraction, seed, "test")
        remaining = [index for index in everything if index not in test]
        # The validation share is of the whole file, so scale it to what test left over.
        share = validation_fraction / (1.0 - test_fraction) if validation_fraction else 0.0
        validation = _stratified_sample(rows.examples, remaining, share, seed, "validation")
    train = [i for i in range(len(rows.examples)) if i not in test and i not in validation]
    if not train:
        raise DatasetError(f"{source}: no rows left for training")
    assignment = {
        "train": train,
        "validation": sorted(validation),
        "test": sorted(test),
    }
    registration: dict[str, object] = {
        "registration_version": _REGISTRATION_VERSION,
        "name": name,
        "task_type": task_type,
        "source": str(source),
        "fingerprint": _sha256(data),
        "format": fmt,
        "options": dict(sorted(options.items())),
        "seed": seed,
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "auto": auto,
        "rows": len(rows.examples),
        "feature_names": list(rows.feature_names),
        "labels": sorted(labels),
        "flamby_split": rows.fixed_test_rows is not None,
        "details": {**rows.details, **dropped},
        "counts": {split: len(indices) for split, indices in assignment.items()},
        "label_counts": {
            split: _label_counts(rows.examples, indices) for split, indices in assignment.items()
        },
        "split": assignment,
    }
    _write_json(registration_path, registration)
    logger.info(
        "registered dataset %s (%s, %s): %d train, %d validation, %d test",
        name,
        task_type,
        fmt,
        len(train),
        len(validation),
        len(test),
    )
    return _dataset(registration, rows.examples, rows.feature_names, assignment)


def _register_legacy(data_dir: Path, name: str, path: Path) -> RegisteredDataset:
    return _register(
        data_dir,
        name,
        path,
        task_type="seq-classification",
        fmt="jsonl",
        validation_fraction=0.2,
        test_fraction=0.2,
        seed=0,
        options=dict(_LEGACY_OPTIONS),
        replace=True,
        auto=True,
    )


def _load(
    registration: Mapping[str, object], data: bytes, source: Path, registration_path: Path
) -> RegisteredDataset:
    options = registration["options"]
    if not isinstance(options, dict):
        raise DatasetError(f"{registration_path}: 'options' must be an object")
    rows, _ = _usable_rows(
        data,
        source,
        str(registration["task_type"]),
        str(registration["format"]),
        {str(k): str(v) for k, v in options.items()},
    )
    if len(rows.examples) != registration["rows"]:
        raise DatasetError(
            f"{registration_path}: the source now parses to {len(rows.examples)} rows, "
            f"{registration['rows']} were registered; register it again with --replace"
        )
    split = registration["split"]
    if not isinstance(split, dict):
        raise DatasetError(f"{registration_path}: 'split' must be an object")
    assignment: dict[str, list[int]] = {}
    for name in ("train", "validation", "test"):
        indices = split.get(name)
        if not isinstance(indices, list) or not all(
            isinstance(i, int) and 0 <= i < len(rows.examples) for i in indices
        ):
            raise DatasetError(f"{registration_path}: split {name!r} is not a list of row indices")
        assignment[name] = indices
    return _dataset(registration, rows.examples, rows.feature_names, assignment)


def _dataset(
    registration: Mapping[str, object],
    examples: Sequence[Example],
    feature_names: Sequence[str],
    assignment: Mapping[str, Sequence[int]],
) -> RegisteredDataset:
    task_type = str(registration["task_type"])
    labels = () if task_type == "causal-lm" else tuple(sorted(_label_groups(examples)))
    return RegisteredDataset(
        name=str(registration["name"]),
        task_type=task_type,
        fingerprint=str(registration["fingerprint"]),
        train=tuple(examples[i] for i in assignment["train"]),
        validation=tuple(examples[i] for i in assignment["validation"]),
        test=tuple(examples[i] for i in assignment["test"]),
        feature_names=tuple(feature_names),
        labels=labels,
        seed=int(str(registration.get("seed", 0))),
    )


def _usable_rows(
    data: bytes, source: Path, task_type: str, fmt: str, options: Mapping[str, str]
) -> tuple[SourceRows, dict[str, int]]:
    """Parses the file and applies the registry options: label set, duplicates."""
    from site_agent.loaders import SourceRows, parse_source

    rows = parse_source(data, path=source, task_type=task_type, fmt=fmt, options=options)
    allowed = _allowed_labels(options)
    if allowed is not None:
        for example, line in zip(rows.examples, rows.lines, strict=True):
            if isinstance(example, (TextExample, TabularExample)) and example.label not in allowed:
                raise DatasetError(
                    f"{source}:{line}: label {_echo(example.label)} is not one of {sorted(allowed)}"
                )
    if task_type == "tabular":
        # Repeated measurements are real rows (FLamby keeps them).
        return rows, {}
    seen: dict[Example, int] = {}
    keep: list[int] = []
    for index, (example, line) in enumerate(zip(rows.examples, rows.lines, strict=True)):
        first = seen.setdefault(example, line)
        if first == line:
            keep.append(index)
        elif not _flag(options, "dedupe"):
            raise DatasetError(
                f"{source}:{line}: duplicate of line {first}; remove it or register with "
                f"--option dedupe=true"
            )
    if len(keep) == len(rows.examples):
        return rows, {"dropped_duplicates": 0}
    if rows.fixed_test_rows is not None:
        raise DatasetError(f"{source}: cannot drop duplicates from a file with a fixed split")
    deduplicated = SourceRows(
        examples=tuple(rows.examples[i] for i in keep),
        lines=tuple(rows.lines[i] for i in keep),
        feature_names=rows.feature_names,
        fixed_test_rows=None,
        details=rows.details,
    )
    return deduplicated, {"dropped_duplicates": len(rows.examples) - len(keep)}


# ---- splits ----------------------------------------------------------------------------------


def _stratified_sample(
    examples: Sequence[Example],
    candidates: Sequence[int],
    fraction: float,
    seed: int,
    purpose: str,
) -> set[int]:
    """About ``fraction`` of each label's candidate rows, leaving each label one row or more."""
    if fraction <= 0.0:
        return set()
    groups: dict[str, list[int]] = {}
    for index in candidates:
        groups.setdefault(_group(examples[index]), []).append(index)
    chosen: set[int] = set()
    for group in sorted(groups):
        indices = groups[group]
        count = _held_out_count(len(indices), fraction)
        # One RNG per label, so rows of one label never shift another label's split.
        rng = random.Random(_split_seed(seed, purpose, group))
        shuffled = list(indices)
        rng.shuffle(shuffled)
        chosen.update(shuffled[:count])
    return chosen


def _held_out_count(rows: int, fraction: float) -> int:
    if rows < 2:
        return 0
    return min(rows - 1, max(1, math.floor(rows * fraction + 0.5)))


def _split_seed(seed: int, purpose: str, group: str) -> int:
    digest = hashlib.sha256(f"baton-split:{seed}:{purpose}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _group(example: Example) -> str:
    return "" if isinstance(example, InstructionExample) else example.label


def _label_groups(examples: Sequence[Example]) -> set[str]:
    return {e.label for e in examples if isinstance(e, (TextExample, TabularExample))}


def _label_counts(examples: Sequence[Example], indices: Sequence[int]) -> dict[str, int]:
    counts = Counter(_group(examples[i]) for i in indices)
    counts.pop("", None)
    return dict(sorted(counts.items()))


# ---- files and checks ------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DatasetError(
            f"dataset name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit"
        )


def _check_options(options: Mapping[str, str], fmt: str) -> None:
    from site_agent.loaders import FORMAT_OPTIONS

    known = set(_REGISTRY_OPTIONS) | set(FORMAT_OPTIONS[fmt])
    unknown = sorted(set(options) - known)
    if unknown:
        raise DatasetError(
            f"unknown option(s) {unknown} for format {fmt!r}; known options: {sorted(known)}"
        )
    for key, value in options.items():
        if not isinstance(value, str):
            raise DatasetError(f"option {key!r} must be a string")
    _flag(options, "dedupe")
    _allowed_labels(options)


def _flag(options: Mapping[str, str], key: str) -> bool:
    value = options.get(key, "false").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise DatasetError(f"option {key!r} must be true or false, got {value!r}")


def _allowed_labels(options: Mapping[str, str]) -> frozenset[str] | None:
    if "labels" not in options:
        return None
    labels = [label.strip() for label in options["labels"].split(",")]
    if not all(labels) or len(set(labels)) != len(labels):
        raise DatasetError("option 'labels' must list unique, non-empty labels separated by ','")
    return frozenset(labels)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read dataset: {error.strerror or error}") from error


def _read_registration(path: Path) -> dict[str, object]:
    return _parse_registration(_read_registration_text(path), path)


def _read_registration_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: unreadable registration: {error}") from error


@functools.lru_cache(maxsize=_PARSED_ENTRIES)
def _parsed_registration(text: str, path: str) -> Mapping[str, object]:
    """`_parse_registration`, once per exact text (a hop reads the registration again, which
    rarely changes); a refusal raises, so it is never cached. Read only: callers share it."""
    return _parse_registration(text, Path(path))


def _parse_registration(text: str, path: Path) -> dict[str, object]:
    try:
        registration = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: unreadable registration: {error}") from error
    if not isinstance(registration, dict):
        raise DatasetError(f"{path}: registration must be a JSON object")
    if registration.get("registration_version") != _REGISTRATION_VERSION:
        raise DatasetError(
            f"{path}: registration version {registration.get('registration_version')!r} is not "
            f"{_REGISTRATION_VERSION}; register the dataset again"
        )
    required = ("name", "task_type", "source", "fingerprint", "format", "rows", "split")
    missing = [key for key in required if key not in registration]
    if missing:
        raise DatasetError(f"{path}: registration lacks {missing}")
    return registration


def _string_list(value: object, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DatasetError(f"{path}: expected a list of strings")
    return value


def _write_json(path: Path, document: Mapping[str, object]) -> None:
    """Writes atomically: a reader sees the old registration or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".registration-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=1, sort_keys=False)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    """A file's sha256, read in blocks."""
    try:
        with path.open("rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read dataset: {error.strerror or error}") from error


def _echo(value: str) -> str:
    """A field value shortened for an error message."""
    return repr(value[:_ECHO_CHARS] + ("..." if len(value) > _ECHO_CHARS else ""))
