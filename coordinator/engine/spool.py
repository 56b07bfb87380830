"""The upload spool: at most one partial upload per hop, keyed by the hop's lease, never orphaned.

A partial file is named by its hop, a digest of the lease token it was sent under and the
digest its header declared. Starting an upload removes every other file of the hop (an older
lease's, or another declared digest's), so a site holds at most one partial per hop; the engine
removes a hop's files when the hop ends, and `sweep` removes any whose lease is no longer live.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from coordinator.errors import InvalidInput, UploadBusy

__all__ = ["UploadSpool"]

_HEX = re.compile(r"[0-9a-f]{1,64}")
_SUFFIX = ".part"


def _lease_key(lease_token: str) -> str:
    """The token itself stays out of file names: it is the site's credential for the hop."""
    return hashlib.sha256(lease_token.encode()).hexdigest()[:16]


class UploadSpool:
    """Partial uploads under `root`, one per hop, resumable under the same lease and digest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._writing: set[str] = set()  # hops with an upload stream open now

    def path(self, hop_id: str, lease_token: str, sha256: str) -> Path:
        if len(sha256) != 64 or not _HEX.fullmatch(sha256):
            raise InvalidInput(f"upload header sha256 is not a hex digest: {sha256[:80]!r}")
        if not _HEX.fullmatch(hop_id):
            raise InvalidInput(f"not a hop id: {hop_id[:80]!r}")
        return self.root / f"{hop_id}.{_lease_key(lease_token)}.{sha256}{_SUFFIX}"

    def received(self, hop_id: str, lease_token: str, sha256: str) -> int:
        """Bytes already held of this upload (0 if the spool holds another or none)."""
        partial = self.path(hop_id, lease_token, sha256)
        return partial.stat().st_size if partial.is_file() else 0

    @contextmanager
    def writing(self, hop_id: str) -> Iterator[None]:
        """Admits one upload stream per hop at a time.

        Raises:
            UploadBusy: Another stream for the hop is open (it must end or be cut first).
        """
        if hop_id in self._writing:
            raise UploadBusy(
                f"another upload for hop {hop_id} is in progress; one upload per hop at a time"
            )
        self._writing.add(hop_id)
        try:
            yield
        finally:
            self._writing.discard(hop_id)

    def claim(self, hop_id: str, lease_token: str, sha256: str) -> Path:
        """The partial file for this upload, after removing every other file of the hop."""
        partial = self.path(hop_id, lease_token, sha256)
        for path in self._files(hop_id):
            if path != partial:
                path.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        return partial

    def discard(self, hop_id: str) -> int:
        """Removes every file of the hop; returns the bytes freed."""
        freed = 0
        for path in self._files(hop_id):
            freed += _unlink(path)
        return freed

    def sweep(self, live: Mapping[str, str]) -> tuple[int, int]:
        """Removes files of hops not in `live` (hop id -> lease token) or of an older lease.

        Hops with an upload stream open are left alone. Returns the files and bytes freed.
        """
        files = freed = 0
        for path in self._all_files():
            hop_id, lease_key = path.name.split(".")[:2]
            if hop_id in self._writing:
                continue
            token = live.get(hop_id)
            if token is None or _lease_key(token) != lease_key:
                files += 1
                freed += _unlink(path)
        return files, freed

    def _files(self, hop_id: str) -> list[Path]:
        """The hop's files: one listing of the spool, names compared as strings (a glob
        compiles its pattern for every hop id: 0.16 against 0.02 ms, twice per handoff)."""
        if not _HEX.fullmatch(hop_id):
            return []
        prefix = f"{hop_id}."
        try:
            with os.scandir(self.root) as entries:
                return [self.root / e.name for e in entries if e.name.startswith(prefix)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _all_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        # Every partial, including `<hop>.<sha256>.part` files of earlier versions (no lease key).
        return [path for path in self.root.iterdir() if path.name.endswith(_SUFFIX)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _unlink(path: Path) -> int:
    size = _size(path)
    path.unlink(missing_ok=True)
    return size
