"""A shard job as a command: flags from its options, the run on the one driver, the summary printed.

A job module (``jobs/commands/<name>.py``) declares its options (``jobs.options.JobOptions``),
its task (:class:`JobTask`, a ``pipeline.engine.ShardTask``) and how its summary reads, then::

    OPTIONS = MyJob
    add_parser = shard_command(MyJob, MyTask, format_summary, __doc__)

Everything else (``--config``/``--print-config``, job.yaml, progress, exit statuses, Ctrl-C) is
the same for every job and lives here and in ``pipeline.engine``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pipeline.engine import ShardTask, run_job

from .exits import run_command
from .options import add_flags, from_args, to_spec


class JobTask(ShardTask):
    """A ``ShardTask`` whose options are a ``JobOptions`` dataclass: saves them as ``job.yaml``."""

    def saved_spec(self) -> str | None:
        from .config import dump_spec

        return dump_spec(self.kind, to_spec(self.options))


def shard_command(options_cls: type, task_cls: type[ShardTask],
                  format_summary: Callable[[dict[str, Any]], str], doc: str | None
                  ) -> Callable[[Any], argparse.ArgumentParser]:
    """The job's ``add_parser``: its flags come from ``options_cls``; running prints ``format_summary``."""
    kind = task_cls.kind

    def main_from_args(args: argparse.Namespace) -> int:
        def body() -> int:
            from tqdm.contrib.logging import logging_redirect_tqdm

            from .logs import progress_sink

            options = from_args(options_cls, args)
            with logging_redirect_tqdm():
                outcome = run_job(task_cls(options), progress_sink(options.progress))  # JSON logs: events, no bars
            print(format_summary(outcome.summary))
            return outcome.exit_code

        return run_command(kind, body, resumable=True)

    def add_parser(subparsers: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subparsers.add_parser(kind, description=doc,
                                                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_flags(p, options_cls)
        p.set_defaults(func=main_from_args)
        return p

    return add_parser


# ------------------------------------------------------------------------------------ summary text
def reason_lines(summary: dict[str, Any], *, keys: bool = True) -> list[str]:
    """``failed by reason`` and the first failed keys, as every job prints them."""
    lines = []
    reasons = summary["images"]["failed_by_reason"]
    if reasons:
        lines.append("  failed by reason: " + ", ".join(f"{k}={v}" for k, v in reasons.items()))
    failed_keys = summary.get("failed_keys") or []
    if keys and failed_keys:
        more = " (truncated)" if summary.get("failed_keys_truncated") else ""
        lines.append(f"  failed keys{more}: " + ", ".join(failed_keys[:20]) + (" ..." if len(failed_keys) > 20 else ""))
    return lines


def failed_shard_lines(failed: list[dict[str, Any]], what: str = "shard", after: str = "") -> list[str]:
    return [f"  FAILED {what} {f['shard_id']} after {f['attempts']} attempt(s){after}: {f['error']}" for f in failed]


def run_lines(summary: dict[str, Any]) -> list[str]:
    """How the run held its output (a lease taken over) and where its summary is."""
    lines = []
    took = (summary.get("lease") or {}).get("took_over")
    if took and took.get("why") != "released":
        lines.append(f"  took over the output's lease from {took.get('owner')} ({took.get('why')})")
    if summary.get("summary_url"):
        lines.append(f"  summary: {summary['summary_url']}")
    return lines

