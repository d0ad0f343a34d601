"""What every executor takes and returns, and the shared retry rule."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

from ..encoder import EncoderFactory
from ..manifest import Manifest, OutputLocation
from ..progress import ProgressSink
from ..runner import ShardConfig
from ..types import ShardRef, ShardStats


class ExecutorStartError(RuntimeError):
    """The executor could not get its workers going (model not loadable, no resources)."""


@dataclass
class ArchivePlan:
    """The pending shards of a run and everything a worker needs to process one."""

    shards: list[ShardRef]
    factory: EncoderFactory
    output: OutputLocation
    config: ShardConfig
    max_shard_retries: int = 2

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

    def __init__(self, plan: ArchivePlan, progress: ProgressSink, result: RunResult) -> None:
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
