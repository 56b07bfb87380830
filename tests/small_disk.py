"""A small tmpfs and a ballast file that fills it: disk-full faults on demand (root only)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["Ballast", "small_disk"]


@contextmanager
def small_disk(mount: Path, size: str = "24m") -> Iterator[Path]:
    """Mounts a tmpfs of `size` at `mount`; skips the test, with the reason, where it cannot."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Ballast:
    """Fills a file system with one file, leaving `room` bytes; `free()` deletes it."""

    def __init__(self, disk: Path) -> None:
        self.path = disk / "ballast"

    def fill(self, room: int = 0) -> None:
        with self.path.open("ab", buffering=0) as fh:
            for block in (1024 * 1024, 64 * 1024, 4096, 512):
                try:
                    while True:
                        fh.write(b"\0" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        if room:
            os.truncate(self.path, self.path.stat().st_size - room)

    def free(self) -> None:
        self.path.unlink(missing_ok=True)
