"""Which failures a retry can fix: every failure of the archive classified in one place.

Two levels, two rules:

* **Shard attempts** (:func:`shard_error_class`). An exception that escapes ``process_shard`` fails
  the whole attempt and nothing of it counts. Storage trouble (``StorageReadError``, resets,
  throttling, timeouts) and device trouble are *transient*: the executor retries the shard
  (``--max-shard-retries``), and a shard that still fails is not done, so a plain rerun redoes it.
  A missing or forbidden input is *permanent*: no retry is spent on it.
* **Rows** (:func:`failure_class`). A sample that cannot be archived is still a row, ``failed``
  with a reason code (``pipeline.types.REASONS``). Most reasons are facts about the sample's bytes
  (truncated, corrupt, too many pixels, a mode that cannot become RGB...): the same bytes fail the
  same way every time, so they are *permanent*. ``out_of_memory`` is about the worker, not the
  sample: the same image may well fit on a retry, so it is *transient*, and
  ``rdeic archive --retry-failed`` redoes exactly those rows (``pipeline.retry``).

Rows written before ``out_of_memory`` existed recorded an out-of-memory as ``encode_error`` with
the exception's type first in ``error`` (``"MemoryError: ..."``, ``"OutOfMemoryError: ..."``);
those are transient too. Any other ``encode_error`` (the codec refused the image: ``ValueError``)
is permanent. A reason this table does not know is treated as permanent: a retry must never
rewrite rows it cannot vouch for.
"""

from __future__ import annotations

from collections.abc import Mapping

from .types import REASONS

TRANSIENT = "transient"
PERMANENT = "permanent"

# reason code -> class. Every code of pipeline.types.REASONS is listed (tests/jobs/test_retry_failed.py).
ROW_FAILURE_CLASSES: dict[str, str] = {
    "no_image": PERMANENT,
    "empty_file": PERMANENT,
    "not_an_image": PERMANENT,
    "truncated_image": PERMANENT,
    "corrupt_image": PERMANENT,
    "too_large": PERMANENT,
    "member_too_large": PERMANENT,
    "unsupported_mode": PERMANENT,
    "unsupported_member": PERMANENT,
    "duplicate_key": PERMANENT,
    # only for bytes the store confirms are the whole object (short reads are retried, never damage)
    "shard_damaged": PERMANENT,
    "encode_error": PERMANENT,  # except an out-of-memory recorded by older versions (see the module doc)
    "out_of_memory": TRANSIENT,
}
assert set(ROW_FAILURE_CLASSES) == set(REASONS), "classify every failure reason"

# Exception type names that mean "out of resources right now", not "this input is bad".
OUT_OF_MEMORY_ERRORS = ("MemoryError", "OutOfMemoryError")
# Reasons whose rows may be transient; a done marker's failed_by_reason tells the driver which
# shards are worth opening (the rows' own error text decides).
MAYBE_TRANSIENT_REASONS = frozenset(r for r, c in ROW_FAILURE_CLASSES.items() if c == TRANSIENT) | {"encode_error"}

# Shard-level errors no retry can fix (the input is missing or forbidden; the path is a directory).
PERMANENT_SHARD_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError)


def is_out_of_memory(exc: BaseException) -> bool:
    """A host ``MemoryError`` or a device out-of-memory (``torch.cuda.OutOfMemoryError``, by name)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ in OUT_OF_MEMORY_ERRORS


def failure_class(reason: str | None, error: str | None = None) -> str:
    """``TRANSIENT`` when retrying the failed row could archive it, else ``PERMANENT``."""
    cls = ROW_FAILURE_CLASSES.get(reason or "", PERMANENT)
    if reason == "encode_error" and error and error.split(":", 1)[0].strip() in OUT_OF_MEMORY_ERRORS:
        return TRANSIENT
    return cls


def is_transient(reason: str | None, error: str | None = None) -> bool:
    return failure_class(reason, error) == TRANSIENT


def may_have_transient(failed_by_reason: Mapping[str, int]) -> bool:
    """Whether a done shard's failure counts include rows a retry might fix (its rows decide)."""
    return any(n and r in MAYBE_TRANSIENT_REASONS for r, n in failed_by_reason.items())


def shard_error_class(exc: BaseException) -> str:
    """``PERMANENT`` for a missing/forbidden input, else ``TRANSIENT`` (the attempt is retried).

    Fatal errors of the run (``pipeline.executors.errors.FatalShardError``: the wrong model, a lost output
    lease) are not shard errors at all: they stop the run; ``pipeline.executors.errors.is_retryable`` sees to it.
    """
    return PERMANENT if isinstance(exc, PERMANENT_SHARD_ERRORS) else TRANSIENT
