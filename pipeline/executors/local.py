"""Run shards one after another in this process: laptops, one-GPU machines, tests.

The model is loaded once; each shard goes through the same work function a Ray actor uses
(``plan.work``, the archive's ``process_shard`` by default), with the same bounded retries.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..progress import ProgressSink
from ..runner import FatalShardError, is_retryable
from .base import ArchivePlan, ExecutorStartError, RetryBook, RunResult, describe

WORKER_NAME = "local"


@dataclass
class LocalExecutor:
    """Args: device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``..."""

    device: str = "auto"

    def run(self, plan: ArchivePlan, progress: ProgressSink) -> RunResult:
        result = RunResult()
        if not plan.shards:
            return result
        try:
            encoder = plan.factory.load(self.device)
        except Exception as exc:  # noqa: BLE001 - any load failure means no shard can be processed
            raise ExecutorStartError(f"cannot load the encoder on {self.device!r}: {describe(exc)}") from exc
        book = RetryBook(plan, progress, result)
        for shard in plan.shards:
            while True:
                attempt = book.next_attempt(shard)
                try:
                    stats = plan.work(
                        shard, encoder, plan.output, plan.config, attempt=attempt, worker=WORKER_NAME,
                        progress=lambda n, s=shard.shard_id: progress.shard_progress(s, n, WORKER_NAME),
                    )
                except FatalShardError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every shard error is recorded, then retried or given up
                    if book.failed(shard, describe(exc), is_retryable(exc)):
                        continue
                    break
                book.succeeded(stats)
                break
        return result
