"""``rdeic archive``: WebDataset shards -> Parquet archives of RDEIC bitstreams.

    rdeic archive --input 's3://b/shards/{000000..000999}.tar' --output s3://b/archive-v1 \\
                  [--model NAME_OR_DIR] [--executor ray|local] [--num-actors N] [--storage-options JSON]
                  [--batch-size N] [--tile-batch N] [--retry-failed] [--break-lease]

The job only wires things together: expand the inputs, check the output prefix against the
codec (``run.json``), skip shards whose done marker exists, hand the rest to an executor, and
summarise. Rerunning the same command resumes; see docs/archive-format.md.

One job writes into an output prefix at a time: the job holds the prefix's lease
(``<output>/_lease.json``, ``pipeline.lease``) while it runs. ``--retry-failed`` also redoes the
rows of done shards that failed for a transient reason (out of memory), and only those
(``pipeline.retry``, ``pipeline.failures``).

Exit status: 0 when every shard was processed (failed *samples* included: they are rows with a
reason), 1 when some shards could not be processed after their retries (or no worker could load the
model), 2 for a configuration
error (bad pattern, missing model, an output prefix written by another codec), 75 when another
live job holds the output's lease (or took it over during this run), 130 on Ctrl-C.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.batching import DEFAULT_BATCH_SIZE
from pipeline.engine import JobOutcome, Prepared, Ran, run_job
from pipeline.executors.base import ShardFailure
from pipeline.failures import may_have_transient
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifest import Manifest, OutputLocation
from pipeline.progress import ProgressSink
from pipeline.reader import DEFAULT_MAX_MEMBER_BYTES
from pipeline.retry import archive_or_retry
from pipeline.runner import ShardConfig, process_shard
from pipeline.shards import expand_inputs
from pipeline.types import ShardRef, ShardStats
from pipeline.writer import DEFAULT_ROW_GROUP_SIZE

from ..codec import RDEICEncoderFactory
from ..options import MODEL_ENV, JobConfigError, JobOptions, option
from ..shardjob import JobTask, failed_shard_lines, reason_lines, run_lines, shard_command

HELP = "encode WebDataset shards into Parquet archives (resumable)"
DEFAULT_MODEL = "mini"


ArchiveConfigError = JobConfigError  # the name callers catch


@dataclass(frozen=True, kw_only=True)
class ArchiveJob(JobOptions):
    """Everything an archive run depends on (also written, redacted, into run.json and each file)."""

    inputs: tuple[str, ...] = option("shards: brace pattern, glob, @list.txt or URL; repeatable", key="input",
                                     repeat=True, required=True, nonempty=True, metavar="PATTERN",
                                     spec_help="shards: brace pattern, glob, @list.txt or URL (flag: --input, "
                                               "repeatable)")
    output: str = option("output prefix (s3://..., file://..., path)", required=True, metavar="URL")
    model: str = option(f"model directory or shipped name (default: ${MODEL_ENV} or {DEFAULT_MODEL!r})",
                        default=DEFAULT_MODEL, env=MODEL_ENV, metavar="NAME_OR_DIR",
                        spec_help="model directory or shipped name (env RDEIC_MODEL)")
    batch_size: int = option("images per encoder batch", default=DEFAULT_BATCH_SIZE, min=1)
    max_pixels: int = option("larger images are recorded as failed (too_large)", default=DEFAULT_MAX_PIXELS, min=1)
    max_member_bytes: int = option("larger tar members are skipped (member_too_large)",
                                   default=DEFAULT_MAX_MEMBER_BYTES, min=1)
    row_group_size: int = option("Parquet rows per row group", default=DEFAULT_ROW_GROUP_SIZE, min=1)
    retry_failed: bool = option(
        "also redo the rows of done shards that failed for a transient reason (out of memory); rows that failed "
        "for good (corrupt, too large, ...) are left alone", default=False,
        spec_help="also redo the rows of done shards that failed for a transient reason (out of memory); permanent "
                  "failures are left alone")


class ArchiveTask(JobTask):
    """Shards in, one Parquet archive and done marker per shard out (``pipeline.runner.process_shard``)."""

    kind = "archive"
    verb = "archiving"
    options: ArchiveJob

    def urls(self) -> list[str]:
        return [*self.options.inputs, self.options.output]

    def prepare(self, storage_options: dict[str, Any]) -> Prepared:
        job = self.options
        try:
            shards = expand_inputs(job.inputs, storage_options)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"--input: {exc}") from None
        factory = RDEICEncoderFactory(job.model, job.compute_dtype, job.tile_batch)
        try:
            identity = factory.identity()
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"--model {job.model!r}: {exc}") from None
        out = OutputLocation(job.output, storage_options)
        metadata = identity.to_metadata() | {"rdeic.job": json.dumps(job.to_config(), sort_keys=True)}
        config = ShardConfig(batch_size=job.batch_size, max_pixels=job.max_pixels,
                             max_member_bytes=job.max_member_bytes, row_group_size=job.row_group_size,
                             storage_options=storage_options, expected_fingerprint=identity.fingerprint,
                             metadata=metadata)
        return Prepared(out, factory, config, archive_or_retry if job.retry_failed else process_shard,
                        Manifest(out).run_guard(identity, job.to_config()), state={"shards": shards})

    def shards(self, prepared: Prepared) -> list[ShardRef]:
        shards: list[ShardRef] = prepared.state["shards"]
        return shards

    def redo(self, manifest: Manifest, shards: list[ShardRef], done: list[str],
             known: dict[str, ShardStats]) -> list[ShardRef]:
        """``--retry-failed``: the done shards with rows that failed for a reason that may pass."""
        if not self.options.retry_failed:
            return []
        known.update((s.shard_id, s) for s in manifest.read_done(done))
        return [s for s in shards if s.shard_id in known and may_have_transient(known[s.shard_id].failed_by_reason)]

    def summarize(self, summary: dict[str, Any], ran: Ran) -> None:
        if self.options.retry_failed:
            summary["retry_failed"] = retry_summary(len(ran.redone.done) + len(ran.redone.failed),
                                                    ran.redone.done, ran.redone.failed)


def run_archive(job: ArchiveJob, progress: ProgressSink | None = None, executor: Any = None) -> JobOutcome:
    """Run (or resume) an archive job; raises ArchiveConfigError before any work if misconfigured."""
    return run_job(ArchiveTask(job), progress, executor)


def retry_summary(candidates: int, redone: list[ShardStats], failed: list[ShardFailure]) -> dict[str, Any]:
    """What ``--retry-failed`` did: shards opened, rows retried, how many are ok now (``extra.retry``)."""
    infos = [s.extra.get("retry") or {} for s in redone]
    still: Counter[str] = Counter()
    for info in infos:
        still.update(info.get("still_failed_by_reason") or {})
    return {
        "shards": candidates,
        "shards_retried": sum(1 for i in infos if i.get("rows")),
        "rows": sum(int(i.get("rows", 0)) for i in infos),
        "now_ok": sum(int(i.get("now_ok", 0)) for i in infos),
        "still_failed": sum(int(i.get("still_failed", 0)) for i in infos),
        "still_failed_by_reason": dict(sorted(still.items())),
        "kept": sum(int(i.get("kept", 0)) for i in infos),
        "failed_shards": [asdict(f) for f in failed],
    }


def format_summary(summary: dict[str, Any]) -> str:
    sh, im = summary["shards"], summary["images"]
    lines = [
        f"archive {summary['output']}: {sh['done_before'] + sh['done_this_run']}/{sh['total']} shards done "
        f"({sh['done_this_run']} this run, {sh['done_before']} before), {sh['failed']} failed, {sh['damaged']} damaged",
        f"  images: {im['total']} ({im['ok']} ok, {im['failed']} failed); this run {im['this_run']} "
        f"in {summary['seconds']:.1f}s = {im['this_run_per_s']:.2f} img/s",
    ]
    lines += reason_lines(summary, keys=False)  # an archive's failed keys are in its markers and `rdeic inspect`
    lines += [f"  damaged shard {d['shard_id']}: {d['message']}" for d in summary["damaged_shards"]]
    lines += failed_shard_lines(summary["failed_shards"])
    retry = summary.get("retry_failed")
    if retry is not None:
        lines.append(f"  retry-failed: {retry['rows']} transiently failed row(s) retried in {retry['shards_retried']} "
                     f"shard(s): {retry['now_ok']} now ok, {retry['still_failed']} still failed"
                     + (f" ({', '.join(f'{k}={v}' for k, v in retry['still_failed_by_reason'].items())})"
                        if retry["still_failed_by_reason"] else "")
                     + (f", {retry['kept']} kept as they were (source gone or changed)" if retry["kept"] else ""))
        lines += failed_shard_lines(retry["failed_shards"], "retry of shard", " (its archive is unchanged)")
    return "\n".join(lines + run_lines(summary))


OPTIONS = ArchiveJob
add_parser = shard_command(ArchiveJob, ArchiveTask, format_summary, __doc__)
