"""A venv holding only what `pip install baton-fl[site]` installs, for benchmarks that start sites
as a hospital deploys them (the site image installs `.[site]` only).

The benchmark's own venv also holds the dev, demo and coordinator extras: scipy (through
sentence-transformers), trio (selenium), scikit-learn... transformers and httpcore import some
of them whenever they are installed (transformers' `is_scipy_available()` has no switch), which
costs a site's first load ~0.45 s of CPU a deployed site does not pay (session 14's profile).

The venv is made without pip, and its site-packages holds symlinks to the distributions of
`baton-fl[site]`'s dependency closure in this interpreter's site-packages (same versions, no
download); the project itself comes from PYTHONPATH. Cached under ``cache_dir``, by the
closure's names and versions: made again when one changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

__all__ = ["site_closure", "site_python"]


def site_closure(pyproject: Path, extra: str = "site") -> list[metadata.Distribution]:
    """The installed distributions `baton-fl[EXTRA]` depends on, directly or not.

    Raises:
        metadata.PackageNotFoundError: One of them is not installed here.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    own = canonicalize_name(project["name"])

    def of_project(extras: tuple[str, ...]) -> list[tuple[Requirement, str]]:
        texts = [*project["dependencies"]]
        for name in extras:
            texts += project["optional-dependencies"][name]
        return [(Requirement(text), "") for text in texts]

    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    # (a requirement, the extra of the distribution requiring it that brought it in)
    pending = of_project((extra,))
    while pending:
        requirement, because = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": because}):
            continue
        name = canonicalize_name(requirement.name)
        if name == own:
            pending += of_project(tuple(requirement.extras))
            continue
        if name not in found:
            found[name] = metadata.distribution(name)
        for wanted in ("", *sorted(requirement.extras)):
            if (name, wanted) not in seen:
                seen.add((name, wanted))
                pending += [(Requirement(text), wanted) for text in found[name].requires or []]
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def site_python(checkout: Path, cache_dir: Path) -> Path:
    """The interpreter of a venv with only `baton-fl[site]`'s dependencies (made once)."""
    closure = site_closure(checkout / "pyproject.toml")
    stamp = hashlib.sha256(
        "\n".join([sys.version, *(f"{d.metadata['Name']}=={d.version}" for d in closure)]).encode()
    ).hexdigest()[:16]
    venv = cache_dir / f"site-{stamp}"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    for dist in closure:
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if Path(str(f)).parts[0] != ".."}
        for top in sorted(tops):
            source, target = base / top, purelib / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
    return python
