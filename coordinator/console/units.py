"""systemd units for the two services: one definition, written by `baton provision`.

`deploy/systemd/` holds these units rendered with the default install paths (a test keeps them
equal), for sites that install by hand.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from string import Template

__all__ = ["DEFAULT_CONFIG_DIR", "DEFAULT_PREFIX", "coordinator_unit", "site_unit"]

DEFAULT_PREFIX = PurePosixPath("/opt/baton")  # the virtual environment the wheelhouse installs
DEFAULT_CONFIG_DIR = PurePosixPath("/etc/baton")

# Shared hardening (systemd.exec(5)): no privileges, a read-only system, the state directory the
# only writable place. Exit codes 2 (bad settings) and 3 (refused coordinator) are not retried:
# restarting cannot fix them, and a loop would hide the one-line error in the journal.
_HARDENING = """\
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RemoveIPC=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
UMask=0027"""

_UNIT = Template("""\
# $description
# Installed by `baton provision` (or copied from deploy/systemd/). See docs/operations.md.
[Unit]
Description=$description
Documentation=file://$config_dir/README.md
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=simple
User=baton
Group=baton
ExecStart=$exec_start
${environment}\
Restart=on-failure
RestartSec=5s
RestartPreventExitStatus=2 3
# SIGTERM first: the service finishes or hands back its current work, then exits.
KillSignal=SIGTERM
TimeoutStopSec=$stop_seconds
StateDirectory=$state_name
StateDirectoryMode=0750
ReadWritePaths=/var/lib/$state_name
${extra}\
$hardening

[Install]
WantedBy=multi-user.target
""")


def coordinator_unit(
    prefix: PurePosixPath = DEFAULT_PREFIX, config_dir: PurePosixPath = DEFAULT_CONFIG_DIR
) -> str:
    """The `baton-coordinator.service` unit; state (SQLite, checkpoints) in /var/lib/baton."""
    return _UNIT.substitute(
        description="Baton coordinator (sequential LoRA training across hospitals)",
        config_dir=config_dir,
        exec_start=f"{prefix}/bin/baton coordinator serve --config {config_dir}/coordinator.toml",
        # Upload checks run on worker threads; glibc's per-thread arenas would keep ~40 MB more
        # resident after a 100 MB transfer, and its sliding mmap threshold would keep freed
        # 1 MiB message buffers in fragmented arenas (benchmarks/transfer.py).
        environment="Environment=MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072\n",
        stop_seconds=60,
        state_name="baton",
        # The coordinator never needs devices nor writable-executable memory.
        extra="PrivateDevices=yes\nMemoryDenyWriteExecute=yes\n",
        hardening=_HARDENING,
    )


def site_unit(
    prefix: PurePosixPath = DEFAULT_PREFIX, config_dir: PurePosixPath = DEFAULT_CONFIG_DIR
) -> str:
    """The `baton-site.service` unit; registrations and site state in /var/lib/baton-site."""
    return _UNIT.substitute(
        description="Baton site agent (outbound only: dials the coordinator)",
        config_dir=config_dir,
        exec_start=f"{prefix}/bin/baton-site serve --config {config_dir}/site.toml",
        # Models and data are local files: never reach for a model hub. Library caches go to
        # the state directory, the only writable place.
        environment="Environment=HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "
        "XDG_CACHE_HOME=/var/lib/baton-site/.cache "
        "HF_HOME=/var/lib/baton-site/.cache/huggingface\n",
        stop_seconds=300,
        state_name="baton-site",
        # No PrivateDevices nor MemoryDenyWriteExecute: CUDA needs /dev/nvidia* and JIT memory.
        # Loads ahead run on a thread at nice +6/+9 and are raised back to nice 0 at the hop:
        # "+0" is a nice level (RLIMIT_NICE 20), so the agent may go back to 0, never below.
        extra="LimitNICE=+0\n",
        hardening=_HARDENING,
    )
