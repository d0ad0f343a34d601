"""Executors run a job's per-shard function over pending shards: locally, or on Ray actors.

Both share :class:`~pipeline.executors.base.ShardPlan` in and
:class:`~pipeline.executors.base.RunResult` out, so a job picks one by name and nothing else
changes. Ray is imported only inside ``pipeline/executors/ray.py``.
"""

from .base import ExecutorStartError, RunResult, ShardFailure, ShardPlan, run_plan
from .errors import FatalShardError, is_retryable

__all__ = ["ExecutorStartError", "FatalShardError", "RunResult", "ShardFailure", "ShardPlan", "is_retryable",
           "run_plan"]
