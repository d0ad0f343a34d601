"""Which shard errors end the run and which are worth another attempt: the executors' rule.

Kept apart from ``base`` so that modules the executors import (``pipeline.lease``, the shard
functions) can raise :class:`FatalShardError` without importing the executors.
"""

from __future__ import annotations

from typing import Any

from ..failures import TRANSIENT, shard_error_class


class FatalShardError(RuntimeError):
    """A shard error that no retry can fix (e.g. the loaded model is not the run's codec)."""


def is_retryable(exc: BaseException) -> bool:
    """Whether retrying the shard could help: not for missing/forbidden inputs or fatal errors
    (the classes of every failure: ``pipeline.failures``)."""
    return not isinstance(exc, FatalShardError) and shard_error_class(exc) == TRANSIENT


def check_fingerprint(model: Any, expected: str | None, worker: str, expected_from: str = "the run expects") -> str:
    """The loaded model's fingerprint (hex); FatalShardError when it is not the one the run was set up with
    (a worker on a node whose model directory differs must stop the run, not write other bytes)."""
    fingerprint: str = model.fingerprint.hex()
    if expected and fingerprint != expected:
        raise FatalShardError(f"worker {worker or '?'} loaded codec {fingerprint}, but {expected_from} {expected}; "
                              "is the model directory the same on every node?")
    return fingerprint
