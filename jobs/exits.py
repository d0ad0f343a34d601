"""Exit statuses of every ``rdeic`` command, and the one place errors become them.

A command's body raises; :func:`run_command` prints ``rdeic NAME: error: ...`` on stderr and
returns the status. Why one place: five commands used to carry the same try/except ladder, each
with its own copy of the numbers, and a new error type had to be added to all of them.

This module imports nothing heavy: pipeline errors are recognised by module and class name (a
pipeline exception can only reach here if its module was imported).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILED = 1  # some work failed (shards after retries, a key not decoded, problems found)
EXIT_USAGE = 2  # the command cannot run as configured: bad flag, spec, model, prefix
EXIT_CLUSTER = 3  # the Ray cluster could not be reached (submit, job)
EXIT_LEASE = 75  # EX_TEMPFAIL: another live job writes into the output prefix; try again later
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A command cannot go on; ``str(exc)`` is the message, ``exit_code`` the status and ``label`` what
    precedes the message (``rdeic NAME: error: MSG``)."""

    exit_code = EXIT_USAGE
    label = "error: "


def report(name: str, exc: CommandError) -> int:
    """Print ``exc`` as ``rdeic NAME: <label>MSG`` on stderr; its exit status."""
    print(f"rdeic {name}: {exc.label}{exc}", file=sys.stderr)
    return exc.exit_code


class UsageError(CommandError):
    """Bad configuration (flag, spec, model, output prefix): nothing was done. Exit 2."""


class FailedError(CommandError):
    """The command ran and the work failed (a missing key, an unreadable input). Exit 1."""

    exit_code = EXIT_FAILED


class ClusterError(CommandError):
    """The Ray cluster could not be reached. Exit 3."""

    exit_code = EXIT_CLUSTER


# (module, class name) of pipeline errors -> (status, message prefix). Subclasses match too.
_PIPELINE_ERRORS: tuple[tuple[str, str, int, str], ...] = (
    ("pipeline.lease", "LeaseHeldError", EXIT_LEASE, ""),
    ("pipeline.lease", "LeaseLostError", EXIT_LEASE, ""),
    ("pipeline.lease", "LeaseContendedError", EXIT_LEASE, ""),
    ("pipeline.executors.base", "ExecutorStartError", EXIT_FAILED, "no shard processed: "),
)


def _pipeline_status(exc: BaseException) -> tuple[int, str] | None:
    for module, name, status, prefix in _PIPELINE_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return status, prefix
    return None


def run_command(name: str, body: Callable[[], int], *, resumable: bool = False) -> int:
    """``body()``'s status, or the status of what it raised (message on stderr).

    ``resumable`` commands say on Ctrl-C that rerunning resumes.
    """
    try:
        return int(body())
    except CommandError as exc:
        return report(name, exc)
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume" if resumable else ""
        print(f"rdeic {name}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        known = _pipeline_status(exc)
        if known is None:
            raise
        status, prefix = known
        print(f"rdeic {name}: error: {prefix}{exc}", file=sys.stderr)
        return status


class PlainError(CommandError):
    """An outcome a command states in its own words, without the ``error:`` label: ``rdeic get: KEY:
    no_such_key: ...``, ``rdeic inspect: not found: ...``. Exit 1 unless ``exit_code`` says otherwise."""

    exit_code = EXIT_FAILED
    label = ""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
