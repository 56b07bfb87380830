"""Domain errors of the coordinator; the servicer maps each to one gRPC status code."""

from __future__ import annotations

__all__ = [
    "CoordinatorError",
    "InvalidInput",
    "NotFound",
    "PermissionDenied",
    "PreflightFailed",
    "ResumePointLost",
    "StaleLease",
    "StorageFault",
    "UploadBusy",
]


class CoordinatorError(Exception):
    """Base class: a request the coordinator refuses, with a message fit for the caller."""


class NotFound(CoordinatorError):
    pass


class PermissionDenied(CoordinatorError):
    pass


class StaleLease(CoordinatorError):
    """The caller's lease token is not the hop's current lease (fencing)."""


class InvalidInput(CoordinatorError):
    """Malformed plan, corrupt checkpoint, non-finite metrics and the like."""


class ResumePointLost(CoordinatorError):
    """An upload resumes past the bytes the coordinator holds (e.g. it restarted with a shorter
    partial file): the sender starts again from byte 0."""


class StorageFault(CoordinatorError):
    """The coordinator's disk or database cannot write now (full, quota, I/O error): retryable."""


class UploadBusy(CoordinatorError):
    """Another upload for the same hop is in progress (one upload per hop at a time)."""


class PreflightFailed(CoordinatorError):
    """A run would not go through: its sites are offline, lack its data, or did not approve it.

    The message is one problem per line.
    """
