"""How a site's torch threads wait between parallel regions: set before torch is loaded.

torch's CPU kernels run on OpenMP threads (GNU libgomp in torch's CPU wheels, MKL's GEMMs
included). By default libgomp's threads *spin* after each parallel region before they sleep:
about 5-10 ms of a core each time on this project's 2-core reference host. A site's work is
bursty on a shared host: a hop's last step, then the hand back, the coordinator and the next
site (on a hospital's shared server, other services) all want the cores the spinning threads
hold, and a spinning team waiting at a barrier for a descheduled member makes a loaded host's
training steps several times slower (`benchmarks/openmp_wait.py`). So a site asks for passive
waits (threads sleep at once) unless its administrator set ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` already. The price is on a quiet host: a MiniLM step took 240-278 ms
against 196 ms with the default spin (`benchmarks/results/openmp-quiet-session17.md`); a
dedicated CPU host sets ``GOMP_SPINCOUNT=10000`` instead (threads spin about 0.3 ms, then
sleep: 196 ms quiet, and no idle spin after a step).

libgomp reads the variable once, when torch's libraries are loaded: this must run before the
process imports torch (the ``baton-site`` entry point calls it first).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"
SITE_DEFAULT = "PASSIVE"


def prefer_passive_waits(environ: MutableMapping[str, str] | None = None) -> str:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` unless it or ``GOMP_SPINCOUNT`` is set; returns the
    policy in effect (``GOMP_SPINCOUNT=N`` for an administrator's spin count)."""
    environ = os.environ if environ is None else environ
    if WAIT_POLICY not in environ and SPIN_COUNT in environ:
        return f"{SPIN_COUNT}={environ[SPIN_COUNT]}"
    return environ.setdefault(WAIT_POLICY, SITE_DEFAULT)
