"""The newest signed ledger head this site received: its copy of the coordinator's anchor.

A coordinator that later drops events after this head, or rewrites them, no longer matches the
copy kept here; `baton-site ledger-head` exports it for `baton ledger verify --anchor`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from protocols.ledger_head import HeadError, SignedHead
from protocols.v1 import baton_pb2 as pb

__all__ = ["HEAD_FILE", "KeptHead"]

logger = logging.getLogger(__name__)

HEAD_FILE = "ledger-head.json"


class KeptHead:
    """The newest verified signed head, in one JSON file replaced atomically."""

    def __init__(self, path: Path, ca_certificate: Path | None) -> None:
        self.path = path
        self._ca_certificate = ca_certificate  # None: export only, nothing is kept

    def load(self) -> SignedHead | None:
        """The kept head, or None when none was received yet.

        Raises:
            HeadError: If the file is there but unreadable.
        """
        if not self.path.is_file():
            return None
        try:
            return SignedHead.from_json(json.loads(self.path.read_text()))
        except (OSError, ValueError) as exc:
            raise HeadError(f"kept ledger head {self.path} is unreadable: {exc}") from exc

    def load_or_none(self) -> SignedHead | None:
        """The kept head; None (logged) when there is none or it is unreadable."""
        try:
            return self.load()
        except HeadError as exc:
            logger.error("%s; not presenting it", exc)
            return None

    def keep(self, message: pb.SignedLedgerHead) -> SignedHead | None:
        """Keeps a received head if it verifies and is newer; returns the head now kept."""
        if self._ca_certificate is None:
            raise HeadError("a head is kept only after it is checked against the CA")
        try:
            head = SignedHead.from_proto(message)
            head.verify(self._ca_certificate.read_bytes())
        except (HeadError, OSError) as exc:
            logger.error("refused a signed ledger head from the coordinator: %s", exc)
            return None
        try:
            kept = self.load()
        except HeadError as exc:
            logger.error("%s; replacing it", exc)
            kept = None
        if kept is not None and head.seq < kept.seq:
            logger.error(
                "coordinator sent %s, older than the kept %s: its ledger may have been "
                "truncated; keeping #%d",
                head.describe(),
                kept.describe(),
                kept.seq,
            )
            return kept
        if kept is not None and head.seq == kept.seq:
            if head.hash != kept.hash:
                logger.error(
                    "coordinator sent %s, but the kept head names a different hash at "
                    "that event: its history was rewritten; keeping the first",
                    head.describe(),
                )
            return kept
        self._write(head)
        return head

    def _write(self, head: SignedHead) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".head.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(head.to_json(), fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
