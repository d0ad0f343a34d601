"""What every executor takes and returns, and the shared retry rule.

Executors are generic over the unit of work: a plan names the per-shard function (``work``) and
the model recipe (``factory``) that each worker loads once. Archive runs
``pipeline.runner.process_shard`` with an encoder; restore and audit run
``pipeline.restore.restore_shard`` and ``pipeline.audit.audit_shard`` with a decoder. Whatever the
job, a work function writes its outputs and its done marker itself and returns the marker's stats.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..lease import LeaseLostError
from ..manifest import Manifest, OutputLocation
from ..progress import ProgressSink
from ..types import ShardRef, ShardStats
from .errors import FatalShardError


class ShardWork(Protocol):
    """A unit of work: process one shard with a loaded model; write outputs + done marker; return stats.

    Must be a module-level function (it is pickled by reference to Ray workers).
    """

    def __call__(self, shard: ShardRef, model: Any, out: OutputLocation, config: Any, /, *, attempt: int = 1,
                 worker: str = "", progress: Callable[[int], None] | None = None) -> ShardStats: ...


class ModelFactory(Protocol):
    """Picklable recipe for a model, loaded once per worker (where the GPU is)."""

    def load(self, device: str = "auto") -> Any: ...


class ExecutorStartError(RuntimeError):
    """The executor could not get its workers going (model not loadable, no resources)."""


@dataclass
class ShardPlan:
    """The pending shards of a run and everything a worker needs to process one.

    ``work`` is the per-shard function; ``factory`` loads the model it is given; ``config`` is
    passed to it unchanged (it carries ``expected_fingerprint``, checked against every worker's
    model); ``kind`` names the job in worker names and logs.
    """

    shards: list[ShardRef]
    factory: ModelFactory
    output: OutputLocation
    config: Any
    work: ShardWork
    max_shard_retries: int = 2
    kind: str = "archive"

    def __post_init__(self) -> None:
        if self.max_shard_retries < 0:
            raise ValueError(f"max_shard_retries must be >= 0, got {self.max_shard_retries}")


@dataclass(frozen=True)
class ShardFailure:
    """A shard that could not be processed after its retries."""

    shard_id: str
    url: str
    error: str
    attempts: int


@dataclass
class RunResult:
    done: list[ShardStats] = field(default_factory=list)
    failed: list[ShardFailure] = field(default_factory=list)


def describe(exc: BaseException) -> str:
    """One-line description of an error (type and message, last traceback frame for context)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


class RetryBook:
    """Counts attempts per shard and decides, with :func:`is_retryable`, whether to try again."""

    def __init__(self, plan: ShardPlan, progress: ProgressSink, result: RunResult) -> None:
        self.plan, self.progress, self.result = plan, progress, result
        self.attempts: dict[str, int] = {}
        self.manifest = Manifest(plan.output)

    def next_attempt(self, shard: ShardRef) -> int:
        self.attempts[shard.shard_id] = self.attempts.get(shard.shard_id, 0) + 1
        return self.attempts[shard.shard_id]

    def succeeded(self, stats: ShardStats) -> None:
        self.result.done.append(stats)
        self.progress.shard_done(stats)

    def failed(self, shard: ShardRef, error: str, retryable: bool) -> bool:
        """Record a failed attempt; True if the shard should be tried again."""
        attempts = self.attempts.get(shard.shard_id, 0)
        retry = retryable and attempts <= self.plan.max_shard_retries
        self.progress.shard_failed(shard.shard_id, error, retry)
        if not retry:
            self.give_up(shard, error)
        return retry

    def give_up(self, shard: ShardRef, error: str) -> None:
        attempts = self.attempts.get(shard.shard_id, 0)
        self.result.failed.append(ShardFailure(shard.shard_id, shard.url, error, attempts))
        self.manifest.mark_failed(shard.shard_id, shard.url, error, attempts)


def run_plan(executor: Any, plan: ShardPlan, progress: ProgressSink,
             config_error: Callable[[str], Exception]) -> RunResult:
    """Run ``plan`` on ``executor`` and close ``progress``, for every job alike.

    A fatal shard error (a worker that cannot start: bad model path, another model's fingerprint)
    is the job's configuration error, raised as ``config_error(message)``; a lost output lease is a
    fatal shard error too, but the job reports it itself (exit 75), so it passes through.
    """
    try:
        return executor.run(plan, progress)
    except LeaseLostError:
        raise
    except FatalShardError as exc:
        raise config_error(str(exc)) from None
    finally:
        progress.close()
