"""Content-addressed checkpoint store on disk: bytes are durable (fsync) before any reference."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path

from coordinator.worker_threads import run_to_end, settle

__all__ = ["CheckpointStore", "fsync_write"]

# The temporary file `tempfile.mkstemp` makes beside a bundle while it is written (`put`, `stage`,
# a copy across file systems): `.<sha256>.<8 random characters>.tmp`.
_TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.[a-z0-9_]{8}\.tmp")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_frame(
    fd: int, chunk_bytes: int, offset: int, frame: Callable[[bytes, int], bytes]
) -> tuple[int, bytes]:
    """(length, framed) of the chunk at `offset`; (0, b"") at the end of the file."""
    chunk = os.pread(fd, chunk_bytes, offset)
    return len(chunk), frame(chunk, offset) if chunk else b""


def fsync_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Writes `data` to `path` atomically: temp file, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _durable_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _durable_temp(path: Path, data: bytes, mode: int, *, sync: bool = True) -> Path:
    """`data` written and fsynced (unless `sync` is False) to a new temporary file beside
    `path` (not under its name), with `mode`; nothing is left behind if that fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _fsync_or_drop(path: Path) -> None:
    """fsyncs a file's data; if that fails the file is removed, since its bytes can no longer be
    trusted (a failed fsync's error is not reported again: a second one could pass)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _copy_durably(source: Path, target: Path) -> None:
    """Copies a file across file systems: temp file, fsync, rename, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 4 * 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _drop_pages(path: Path) -> bool:
    """Asks the kernel to drop a file's clean pages from the page cache; False if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _open_sized(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


# Bundles whose page cache use `CheckpointStore` keeps track of, at most (the rest are small).
_MAX_TRACKED = 4096


class CheckpointStore:
    """Stores bundles under `root/ab/abcdef...` by their sha256.

    With `cache_bytes`, the bundles written or read last stay in the page cache up to that many
    bytes and `make_room` drops the older ones' pages for an incoming upload: its writes then
    reuse memory just freed instead of growing the page cache. On a virtual machine whose host
    takes back the memory its guest leaves free (virtio-balloon free page reporting), a page
    cache page the guest has not used lately costs a host fault on its first write (~4 ms of
    CPU per MiB on the development VM, against ~0.3 ms/MiB for a page freed a moment before).
    Only page cache residency changes: a dropped bundle is read from the disk when next read.
    """

    def __init__(self, root: Path, *, cache_bytes: int | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        self._cached: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, last used last
        self._cached_total = 0
        self._cached_lock = threading.Lock()

    def _used(self, sha256: str, size: int) -> None:
        """Notes that a bundle's pages are in the page cache now (written or read)."""
        if self.cache_bytes is None:
            return
        with self._cached_lock:
            self._cached_total += size - self._cached.pop(sha256, 0)
            self._cached[sha256] = size
            while len(self._cached) > _MAX_TRACKED:  # many small bundles: forget the oldest
                self._cached_total -= self._cached.popitem(last=False)[1]

    def _forget(self, sha256: str) -> None:
        with self._cached_lock:
            self._cached_total -= self._cached.pop(sha256, 0)

    def make_room(self, incoming: int) -> list[str]:
        """Drops from the page cache the pages of the least recently used bundles until those
        left and `incoming` more bytes fit in `cache_bytes`; returns the bundles dropped
        (nothing without `cache_bytes`). Blocking (system calls): run it off the event loop."""
        if self.cache_bytes is None or not hasattr(os, "posix_fadvise"):
            return []
        chosen = []
        with self._cached_lock:
            while self._cached and self._cached_total + incoming > self.cache_bytes:
                sha256, size = self._cached.popitem(last=False)
                self._cached_total -= size
                chosen.append(sha256)
        return [sha256 for sha256 in chosen if _drop_pages(self.path(sha256))]

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def __contains__(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes, *, sha256: str | None = None) -> str:
        """Stores bytes durably and returns their sha256 (idempotent).

        Args:
            data: The bytes.
            sha256: Their sha256 when the caller computed it already (it is not checked).
        """
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if not target.is_file():
            fsync_write(target, data, mode=0o444)
            self._used(sha256, len(data))
        else:
            _fsync_dir(target.parent)  # its name, as `place` of None
        return sha256

    def stage(self, data: bytes, sha256: str) -> Path | None:
        """The first half of `put`, for bytes still being checked: written (not fsynced) to a
        temporary file beside their place in the store, not under their name (so not stored:
        `stored` and `path` do not see it; a crash leaves a temporary file that the start-up
        sweep removes). `place` then makes it durable and names it, `unstage` drops it.

        Returns the temporary file, or None if the store holds `sha256` already (a name in the
        store is only ever given to fsynced bytes, so an existing one is trusted).
        """
        target = self.path(sha256)
        if target.is_file():
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        return _durable_temp(target, data, 0o444, sync=False)

    def place(self, staged: Path | None, sha256: str, *, sync: bool = True) -> None:
        """The second half of `put`: a file from `stage` fsynced, then named `sha256` in the
        store (a rename: the bytes are not written again), then its directory fsynced; durable
        when this returns. For None (the store held the bytes already) only the directory is
        fsynced: a process killed between a rename and that fsync leaves a name that may not be
        durable yet. The name never comes before the fsync of the bytes: if that fsync fails,
        the staged file is removed and the error raised (the bytes are to be sent again).

        With `sync` False the directory is not fsynced: the name is durable only once
        `sync_name` has returned (the caller calls it before anything refers to the bytes).
        """
        target = self.path(sha256)
        if staged is None:
            if sync:
                _fsync_dir(target.parent)
            return
        if staged.parent != target.parent or not staged.name.startswith(f".{sha256}."):
            raise ValueError(f"{staged.name} was not staged for checkpoint {sha256}")
        _fsync_or_drop(staged)
        size = staged.stat().st_size
        os.replace(staged, target)
        self._used(sha256, size)
        if sync:
            _fsync_dir(target.parent)

    def sync_name(self, sha256: str) -> None:
        """Makes a stored bundle's name durable (an fsync of its directory)."""
        _fsync_dir(self.path(sha256).parent)

    @staticmethod
    def unstage(staged: Path | None) -> None:
        """Drops a file from `stage` that is not to be stored (its bytes were refused)."""
        if staged is not None:
            staged.unlink(missing_ok=True)

    def adopt(self, path: Path, sha256: str, *, sync: bool = True) -> None:
        """Moves a durable (fsynced) file whose bytes hash to `sha256` into the store.

        A rename on the same file system: the bytes are not written again. Elsewhere they are
        copied in bounded blocks (temp file, fsync, rename). The file is gone afterwards.

        With `sync` False no directory is fsynced: the name is durable only once `sync_name`
        has returned (the caller calls it before anything refers to the bytes; the file's old
        name, should a crash keep it, is a spool file that the spool's sweep removes).
        """
        target = self.path(sha256)
        if target.is_file():
            path.unlink(missing_ok=True)  # content-addressed: the same bytes are stored already
            if sync:
                _fsync_dir(target.parent)  # its name, as `place` of None
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o444)
        size = path.stat().st_size
        try:
            os.replace(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_durably(path, target)
            path.unlink(missing_ok=True)
        else:
            if sync:
                _fsync_dir(path.parent)
        self._used(sha256, size)
        if sync:
            _fsync_dir(target.parent)

    def read(self, sha256: str) -> bytes:
        data = self.path(sha256).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise OSError(f"checkpoint {sha256} is corrupt on disk")
        return data

    async def read_framed(
        self, sha256: str, offset: int, chunk_bytes: int, frame: Callable[[bytes, int], bytes]
    ) -> AsyncGenerator[tuple[int, int, bytes], None]:
        """Yields (offset, length, `frame(chunk, offset)`) for each chunk from `offset` to the
        end of the stored bundle: the chunk read and framed (e.g. serialized into its message)
        on a worker thread, one chunk ahead of the one being sent."""
        fd, size = await run_to_end(
            _open_sized, self.path(sha256), undo=lambda opened: os.close(opened[0])
        )
        self._used(sha256, size)  # its pages are read into the page cache
        loop = asyncio.get_running_loop()
        ahead = loop.run_in_executor(None, _read_frame, fd, chunk_bytes, offset, frame)
        try:
            # Shielded: a cancelled reader never detaches from the read in flight (below).
            while (read := await asyncio.shield(ahead))[0]:
                length, framed = read
                ahead = loop.run_in_executor(
                    None, _read_frame, fd, chunk_bytes, offset + length, frame
                )
                yield offset, length, framed
                offset += length
        finally:
            try:
                await settle(ahead)  # the descriptor stays open until its last read
            finally:
                os.close(fd)

    def delete(self, sha256: str) -> int:
        """Removes a bundle's bytes; returns the bytes freed (0 if it was not stored)."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        path.unlink(missing_ok=True)
        self._forget(sha256)
        return size

    def sweep_temporary(self, before: float) -> tuple[int, int]:
        """Removes the temporary files a crash left beside the bundles (named as this store
        names them, in a shard of the store, last modified before `before`, a `time.time()`):
        only for a store no process writes to meanwhile (the coordinator's, at its start).
        Returns the files and bytes removed."""
        files = freed = 0
        for shard in self.root.iterdir() if self.root.is_dir() else []:
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for path in shard.iterdir():
                if not _TEMPORARY.fullmatch(path.name) or path.name[1:3] != shard.name:
                    continue
                try:
                    stat = path.stat()
                    if stat.st_mtime >= before:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
                files += 1
                freed += stat.st_size
        return files, freed

    def stored(self) -> Iterator[tuple[str, int, float]]:
        """(sha256, size, modification time) of every bundle in the store."""
        for shard in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for path in sorted(shard.iterdir()):
                if len(path.name) == 64 and path.name.startswith(shard.name):
                    stat = path.stat()
                    yield path.name, stat.st_size, stat.st_mtime
