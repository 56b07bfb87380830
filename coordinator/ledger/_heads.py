"""Signed head checkpoints: the coordinator signs its ledger's head, keeps and hands out the heads.

A head is signed at every run transition and at least every `every` events (off the committing
thread), appended (fsync'd) to ``ledger-heads.jsonl`` in the state directory, and passed to
listeners (the engine sends it to every connected site). `check_heads` holds a ledger against
the heads it can find.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from coordinator.ledger._integrity import MISMATCH_EVENT
from coordinator.ledger._repository import Ledger
from protocols.ledger_head import HeadError, SignedHead, sign_head
from protocols.signing import SignatureError

__all__ = ["HEADS_FILE", "HeadProblem", "HeadSigner", "check_heads", "read_heads"]

logger = logging.getLogger(__name__)

HEADS_FILE = "ledger-heads.jsonl"


def _signs_now(kind: str) -> bool:
    return kind.startswith("run.") or kind == MISMATCH_EVENT


class HeadSigner:
    """Signs the ledger head when due; appends each signed head to the heads file.

    The signing, the fsync of the heads file and the listeners run on a thread of their own,
    in the order the heads fell due: a ledger transaction that makes a head due returns at its
    commit, not one signature and one fsync later (a hand back's answer waits for its commit).
    The thread is not a daemon: an orderly exit keeps every head that fell due.
    """

    def __init__(
        self, path: Path, *, private_key_pem: bytes, certificate_pem: bytes, every: int = 100
    ) -> None:
        self.path = path
        self.every = every
        self._key = private_key_pem
        self._certificate = certificate_pem
        self._lock = threading.Lock()
        self.listeners: list[Callable[[SignedHead], None]] = []
        self.newest: SignedHead | None = None
        if path.is_file():
            for head in read_heads(path):
                if self.newest is None or head.seq >= self.newest.seq:
                    self.newest = head
        # The heads due and not yet signed, oldest first; the seq of the newest head that fell
        # due; the thread signing them (None when none are waiting).
        self._due_changed = threading.Condition()
        self._due: deque[tuple[int, str]] = deque()
        self._handed = self.newest.seq if self.newest is not None else 0
        self._worker: threading.Thread | None = None

    def observe(self, seq: int, head_hash: str, kinds: tuple[str, ...]) -> None:
        """Called after each ledger transaction commits (a `Ledger.head_observers` entry)."""
        with self._due_changed:
            if not any(_signs_now(kind) for kind in kinds) and seq - self._handed < self.every:
                return
            self._handed = seq
            self._due.append((seq, head_hash))
            if self._worker is None:
                self._worker = threading.Thread(target=self._sign_due, name="ledger-head-signer")
                self._worker.start()

    def wait(self) -> None:
        """Returns once every head that fell due so far is signed, kept and handed out."""
        with self._due_changed:
            self._due_changed.wait_for(lambda: self._worker is None)

    def _next_due(self) -> tuple[int, str] | None:
        with self._due_changed:
            if self._due:
                return self._due.popleft()
            self._worker = None
            self._due_changed.notify_all()
            return None

    def _sign_due(self) -> None:
        try:
            while (due := self._next_due()) is not None:
                try:
                    self.sign(*due)
                except (OSError, SignatureError) as exc:
                    # The event is committed already; a head that cannot be kept must not undo
                    # it. The next transaction tries again (as if this head were never due).
                    logger.error("could not sign or keep ledger head #%d: %s", due[0], exc)
                    with self._due_changed:
                        self._handed = self.newest.seq if self.newest is not None else 0
        finally:
            with self._due_changed:
                if self._worker is threading.current_thread():  # left by an error: free
                    self._worker = None
                    self._due_changed.notify_all()

    def sign(self, seq: int, head_hash: str) -> SignedHead:
        """Signs event `seq`, appends the head to the file (fsync'd), then tells the listeners."""
        head = sign_head(
            seq, head_hash, private_key_pem=self._key, certificate_pem=self._certificate
        )
        line = json.dumps(head.to_json(), sort_keys=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self.newest = head
        for listener in self.listeners:
            listener(head)
        return head

    def sign_current(self, ledger: Ledger) -> SignedHead | None:
        """Signs the ledger's newest event unless it is signed already (e.g. at start-up)."""
        last = ledger.last_event()
        if last is None or (
            self.newest is not None
            and self.newest.seq == last.seq
            and self.newest.hash == last.hash
        ):
            return self.newest
        return self.sign(last.seq, last.hash)


def read_heads(path: Path) -> Iterator[SignedHead]:
    """The heads in a heads file (JSON lines) or an anchor file (one JSON object).

    Raises:
        HeadError: If a line is not a signed head (names the file and line).
    """
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise HeadError(f"cannot read {path}: {exc}") from exc
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):  # an anchor file (or a heads file of one line)
        try:
            yield SignedHead.from_json(whole)
        except HeadError as exc:
            raise HeadError(f"{path}: {exc}") from exc
        return
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for number, line in lines:
        try:
            yield SignedHead.from_json(json.loads(line))
        except (ValueError, HeadError) as exc:
            raise HeadError(f"{path} line {number}: {exc}") from exc


@dataclass(frozen=True)
class HeadProblem:
    """A signed head the ledger does not reach or does not match, or one that does not verify."""

    source: str  # the file it came from
    message: str


def check_heads(
    ledger: Ledger,
    heads: Iterable[tuple[str, SignedHead]],
    *,
    ca_pem: bytes | None,
    last_seq: int,
) -> tuple[list[HeadProblem], SignedHead | None]:
    """Holds the ledger against signed heads: each must verify and name an event it holds.

    Args:
        heads: (source file, head) pairs, from the heads file and any anchors.
        ca_pem: The consortium CA; None: signatures are not checked (the coordinator's own
            heads file, when no CA is at hand: truncation is still detected).
        last_seq: The ledger's newest event's seq (0 when empty).

    Returns:
        The problems found, and the newest head that verified.
    """
    problems: list[HeadProblem] = []
    newest: SignedHead | None = None
    for source, head in heads:
        try:
            if ca_pem is not None:
                head.verify(ca_pem)
        except HeadError as exc:
            problems.append(HeadProblem(source, f"{source}: refused: {exc}"))
            continue
        if newest is None or head.seq > newest.seq:
            newest = head
        if head.seq > last_seq:
            continue  # reported once, for the newest head, below
        event = ledger.event_at(head.seq)
        if event is None:
            problems.append(
                HeadProblem(
                    source, f"ledger event #{head.seq} is missing: {head.describe()} names it"
                )
            )
        elif event.hash != head.hash:
            problems.append(
                HeadProblem(
                    source,
                    f"history rewritten: {head.describe()} but the ledger's event #{head.seq} "
                    f"has hash {event.hash[:12]}...",
                )
            )
    if newest is not None and newest.seq > last_seq:
        ends = f"ends at #{last_seq}" if last_seq else "is empty"
        problems.append(
            HeadProblem("", f"ledger truncated: {newest.describe()} but the ledger {ends}")
        )
    return problems, newest
