"""Run shards one after another in this process: laptops, one-GPU machines, tests.

The model is loaded once; each shard goes through the same work function a Ray actor uses
(``plan.work``), with the same bounded retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..progress import ProgressSink
from .base import ExecutorStartError, RetryBook, RunResult, ShardPlan, describe
from .errors import FatalShardError, is_retryable

WORKER_NAME = "local"


@dataclass
class LocalExecutor:
    """Args: device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``..."""

    device: str = "auto"

    def run(self, plan: ShardPlan, progress: ProgressSink) -> RunResult:
        result = RunResult()
        if not plan.shards:
            return result
        try:
            encoder = plan.factory.load(self.device)
        except Exception as exc:  # any load failure means no shard can be processed
            raise ExecutorStartError(f"cannot load the encoder on {self.device!r}: {describe(exc)}") from exc
        book = RetryBook(plan, progress, result)
        for shard in plan.shards:
            while True:
                attempt = book.next_attempt(shard)
                try:
                    stats = plan.work(shard, encoder, plan.output, plan.config, attempt=attempt, worker=WORKER_NAME,
                                      progress=partial(_report, progress, shard.shard_id))
                except FatalShardError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every shard error is recorded, then retried or given up
                    if book.failed(shard, describe(exc), is_retryable(exc)):
                        continue
                    break
                book.succeeded(stats)
                break
        return result


def _report(progress: ProgressSink, shard_id: str, images: int) -> None:
    progress.shard_progress(shard_id, images, WORKER_NAME)
