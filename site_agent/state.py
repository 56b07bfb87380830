"""What a site remembers between restarts: the last ledger event hash it acknowledged."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

__all__ = ["SiteState"]

logger = logging.getLogger(__name__)


class SiteState:
    """A small JSON file, replaced atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ledger_head = ""
        if path.is_file():
            try:
                self.ledger_head = str(json.loads(path.read_text()).get("ledger_head", ""))
            except (OSError, ValueError) as exc:
                raise RuntimeError(f"site state file {path} is unreadable: {exc}") from exc

    def acknowledge(self, ledger_head: str) -> None:
        """Records the coordinator's newest ledger event hash this site has seen."""
        self.ledger_head = ledger_head
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"ledger_head": ledger_head}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
