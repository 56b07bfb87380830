"""A site's torch threads sleep between parallel regions unless its administrator says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

from site_agent.openmp import prefer_passive_waits


def test_passive_waits_are_the_default_and_an_administrators_policy_is_kept() -> None:
    environ: dict[str, str] = {}
    assert prefer_passive_waits(environ) == "PASSIVE"
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    dedicated = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert prefer_passive_waits(dedicated) == "ACTIVE"
    assert dedicated == {"OMP_WAIT_POLICY": "ACTIVE"}
    spin = {"GOMP_SPINCOUNT": "10000"}
    assert prefer_passive_waits(spin) == "GOMP_SPINCOUNT=10000"
    assert spin == {"GOMP_SPINCOUNT": "10000"}


def test_the_baton_site_command_sets_the_policy_before_torch_is_loaded() -> None:
    # libgomp reads the variable once, when torch's libraries load: the entry point sets it
    # first. `baton-site --help` exits from inside `main`, after the policy is set.
    script = (
        "import os, sys\n"
        "from site_agent.cli import main\n"
        "sys.argv = ['baton-site', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE False"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "ACTIVE False"
