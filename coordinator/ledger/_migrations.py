"""Where the Alembic migration scripts live, and their heads read without Alembic."""

from __future__ import annotations

import re
from pathlib import Path

_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


# `revision = "0015"` / `down_revision = "0011"` (or None) in a migration script.
_REVISION_LINE = re.compile(
    r"^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(?:['\"]([\w-]+)['\"]|(None))\s*(?:#.*)?$",
    re.MULTILINE,
)


def script_heads() -> set[str] | None:
    """The head revisions of the migration scripts, read from the files without Alembic.

    None when a script does not name its revisions in the plain form (a merge revision's tuple,
    say): the caller then asks Alembic itself.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (_MIGRATIONS / "versions").glob("*.py"):
        found = {name: value or None for name, value, _ in _REVISION_LINE.findall(path.read_text())}
        if "revision" not in found or "down_revision" not in found:
            return None
        revision, parent = found["revision"], found["down_revision"]
        assert revision is not None
        revisions.add(revision)
        if parent is not None:
            parents.add(parent)
    return revisions - parents
