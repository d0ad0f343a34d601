"""Executors run ``pipeline.runner.process_shard`` over pending shards: locally, or on Ray actors.

Both share :class:`~pipeline.executors.base.ArchivePlan` in and
:class:`~pipeline.executors.base.RunResult` out, so a job picks one by name and nothing else
changes. Ray is imported only inside ``pipeline/executors/ray.py``.
"""

from .base import ArchivePlan, ExecutorStartError, RunResult, ShardFailure, run_plan

__all__ = ["ArchivePlan", "ExecutorStartError", "RunResult", "ShardFailure", "run_plan"]
