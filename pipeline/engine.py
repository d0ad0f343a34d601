"""One driver for every shard job: archive, restore and audit are task definitions run by it.

A job is a :class:`ShardTask`: what one shard becomes (``work``, a module-level function run by
the executors with a model each worker loads once), which shards the job covers, and what its
summary adds. Everything around that is the same for every job and lives here, once:

    options -> task.prepare (config errors before any write) -> take the output's lease ->
    guard file (run.json / <kind>.json: the settings that may not change across runs) ->
    job.yaml -> pending = shards - done markers (+ shards the task redoes) -> executor (retries,
    progress, markers) -> run summary over this run's and earlier runs' markers -> task.finish

Why: the three jobs were three copies of this sequence, then de-duplicated piece by piece with
cross-imports; a fourth job (re-encode, migrate, export) now is one task module (docs/jobs.md).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from . import storage
from .executors.base import ModelFactory, RunResult, ShardPlan, ShardWork, run_plan
from .lease import OutputLease
from .manifest import JOB_SPEC_FILE, Guard, Manifest, OutputLocation, utc_now
from .progress import NullProgress, ProgressSink
from .types import ShardRef, ShardStats

# The run summary's exit_code, which `rdeic` returns as is (the same numbers as jobs.exits.EXIT_OK/EXIT_FAILED)
EXIT_OK = 0
EXIT_SHARDS_FAILED = 1
MAX_SUMMARY_FAILED_KEYS = 1000


@dataclass
class Prepared:
    """What a task set up before the lease: where it writes, what each worker loads, what each shard gets.

    ``guard`` is the file that pins the output prefix to one set of settings (``run.json``,
    ``restore.json``...): created by the first run, checked by every later one
    (``Manifest.run_guard``, ``Manifest.settings_guard``).
    """

    out: OutputLocation
    factory: ModelFactory
    config: Any
    work: ShardWork
    guard: Guard
    state: dict[str, Any] = field(default_factory=dict)  # whatever the task wants back in its later steps


@dataclass
class Ran:
    """The run as the task's summary steps see it."""

    prepared: Prepared
    shards: list[ShardRef]
    result: RunResult  # this run's shards, those redone excluded
    earlier: list[ShardStats]  # done before this run (as redone now, where they were)
    redone: RunResult  # the done shards this run ran again (``ShardTask.redo``)

    @property
    def all_stats(self) -> list[ShardStats]:
        return list(self.result.done) + list(self.earlier)


class ShardTask:
    """A job: subclass and fill in ``kind``, ``verb``, :meth:`prepare` and :meth:`shards` (see module doc).

    ``options`` is the job's options dataclass (``jobs.options.JobOptions``): the driver reads
    ``output``, ``storage_options``, ``break_lease``, ``max_shard_retries``, ``executor``,
    ``num_actors``, ``ray_address``, ``device`` and ``restart_timeout_s`` from it.
    """

    kind: ClassVar[str] = "job"
    verb: ClassVar[str] = "processing"

    def __init__(self, options: Any) -> None:
        self.options = options

    @property
    def config_error(self) -> Callable[[str], Exception]:
        error: Callable[[str], Exception] = getattr(self.options, "config_error", ValueError)
        return error

    def urls(self) -> list[str]:
        """Every location the job reads or writes (decides whether the S3 endpoint comes from the environment)."""
        return [self.options.output]

    def prepare(self, storage_options: dict[str, Any]) -> Prepared:
        """Check the job and set it up, writing nothing; raise ValueError/FileNotFoundError (config errors)."""
        raise NotImplementedError

    def shards(self, prepared: Prepared) -> list[ShardRef]:
        """Every shard the job covers, done or not (after the guard, under the lease)."""
        raise NotImplementedError

    def redo(self, manifest: Manifest, shards: list[ShardRef], done: list[str],
             known: dict[str, ShardStats]) -> list[ShardRef]:
        """Done shards to run again this time (archive's ``--retry-failed``); none by default.

        Markers the task reads to decide go into ``known``: the summary reuses them (a 20k-shard
        prefix takes minutes to read)."""
        return []

    def summarize(self, summary: dict[str, Any], ran: Ran) -> None:
        """Add the job's own fields to the run summary (before it is written)."""

    def finish(self, summary: dict[str, Any], ran: Ran) -> dict[str, Any]:
        """After the run summary is written (lease still held): the job's result (default: the summary)."""
        return summary

    def saved_spec(self) -> str | None:
        """The resolved settings written as ``<output>/job.yaml`` (None: none)."""
        return None


@dataclass
class JobOutcome:
    exit_code: int
    summary: dict[str, Any]  # what the job reports (the run summary, or audit's report summary)
    run_summary: dict[str, Any]  # the run summary (``_manifest/summary.json``)


def make_executor(options: Any) -> Any:
    """The executor the options name (Ray is imported only when chosen)."""
    if options.executor == "local":
        from .executors.local import LocalExecutor

        return LocalExecutor(device=options.device)
    from .executors.ray import RayExecutor

    return RayExecutor(num_actors=options.num_actors, address=options.ray_address, device=options.device,
                       restart_timeout_s=options.restart_timeout_s)


def run_job(task: ShardTask, progress: ProgressSink | None = None, executor: Any = None) -> JobOutcome:
    """Run (or resume) ``task``; raises ``task.config_error`` before any work if misconfigured."""
    started_at, t0, run_id = utc_now(), time.perf_counter(), uuid.uuid4().hex[:8]
    options = task.options
    try:
        prepared = task.prepare(storage.with_env_endpoint(task.urls(), options.storage_options))
        lease = OutputLease(prepared.out, task.kind, run_id, break_lease=options.break_lease)
    except (ValueError, FileNotFoundError) as exc:  # bad inputs, model, archive, RDEIC_LEASE_* settings
        raise task.config_error(str(exc)) from None
    out = prepared.out
    with lease:  # LeaseHeldError when another live job writes here; held (heartbeat) until the summary is written
        manifest = Manifest(out)
        try:
            manifest.claim(prepared.guard)
            shards = task.shards(prepared)
        except (ValueError, FileNotFoundError) as exc:  # OutputConflictError, unreadable archive
            raise task.config_error(str(exc)) from None
        spec = task.saved_spec()
        if spec is not None:  # the prefix is accepted: record the run's settings
            storage.write_bytes_atomic(out.fs, out.path(JOB_SPEC_FILE), spec.encode())
        done_before = manifest.done_shards()
        pending = [s for s in shards if s.shard_id not in done_before]
        skipped = [s.shard_id for s in shards if s.shard_id in done_before]
        known: dict[str, ShardStats] = {}
        redo = task.redo(manifest, shards, skipped, known) if skipped else []
        plan = ShardPlan(pending + redo, prepared.factory, out, prepared.config, prepared.work,
                         options.max_shard_retries, kind=task.kind)
        progress = progress or NullProgress()
        progress.verb = task.verb
        progress.start(len(pending) + len(redo), len(shards) - len(pending) - len(redo))
        result = run_plan(executor or make_executor(options), plan, progress, task.config_error)
        lease.raise_if_lost()
        ran = _split(prepared, shards, result, {s.shard_id for s in redo}, manifest, skipped, known)
        summary = build_summary(options.output, run_id, started_at, time.perf_counter() - t0, ran)
        task.summarize(summary, ran)
        lease.write_summary(manifest, summary)
        final = task.finish(summary, ran)
    return JobOutcome(summary["exit_code"], final, summary)


def _split(prepared: Prepared, shards: list[ShardRef], result: RunResult, redone_ids: set[str],
           manifest: Manifest, skipped: list[str], known: dict[str, ShardStats]) -> Ran:
    """This run's new shards apart from the done ones it redid; the done ones' latest stats (markers
    read once: those ``known`` already are not read again)."""
    fresh = RunResult(done=[s for s in result.done if s.shard_id not in redone_ids],
                      failed=[f for f in result.failed if f.shard_id not in redone_ids])
    redone = RunResult(done=[s for s in result.done if s.shard_id in redone_ids],
                       failed=[f for f in result.failed if f.shard_id in redone_ids])
    now = {s.shard_id: s for s in redone.done}
    unread = [i for i in skipped if i not in now and i not in known]
    before = {**known, **({s.shard_id: s for s in manifest.read_done(unread)} if unread else {})}
    earlier = [now.get(i) or before[i] for i in skipped if i in now or i in before]
    return Ran(prepared, shards, fresh, earlier, redone)


def build_summary(output: str, run_id: str, started_at: str, seconds: float, ran: Ran) -> dict[str, Any]:
    """Totals over every shard of the job: this run's and those done by earlier runs."""
    result, all_stats = ran.result, ran.all_stats
    reasons: Counter[str] = Counter()
    for s in all_stats:
        reasons.update(s.failed_by_reason)
    images_now = sum(s.rows for s in result.done)
    failed_keys, truncated = summarize_failed_keys(all_stats)
    return {
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": utc_now(),
        "seconds": round(seconds, 3),
        "output": output,
        "exit_code": EXIT_SHARDS_FAILED if result.failed or ran.redone.failed else EXIT_OK,
        "shards": {
            "total": len(ran.shards),
            "done_before": len(ran.earlier),
            "done_this_run": len(result.done),
            "failed": len(result.failed),
            "damaged": sum(1 for s in all_stats if s.damage),
            "retried": sum(1 for s in result.done if s.attempt > 1),
        },
        "images": {
            "total": sum(s.rows for s in all_stats),
            "ok": sum(s.ok for s in all_stats),
            "failed": sum(s.failed for s in all_stats),
            "failed_by_reason": dict(sorted(reasons.items())),
            "this_run": images_now,
            "this_run_per_s": round(images_now / seconds, 3) if seconds > 0 else 0.0,
        },
        "failed_shards": [asdict(f) for f in result.failed],
        "damaged_shards": [{"shard_id": s.shard_id, **s.damage} for s in all_stats if s.damage],
        "failed_keys": failed_keys,
        "failed_keys_truncated": truncated,
    }


def summarize_failed_keys(stats: Sequence[ShardStats], limit: int = MAX_SUMMARY_FAILED_KEYS) -> tuple[list[str], bool]:
    keys = sorted(k for s in stats for k in s.failed_keys)
    truncated = len(keys) > limit or any(s.failed_keys_truncated for s in stats)
    return keys[:limit], truncated
