"""``rdeic restore``: Parquet archives -> decoded PNG images, as WebDataset shards or a folder tree.

    rdeic restore --archive s3://b/archive-v1 --output s3://b/restored [--format wds|folder]
                  [--steps S] [--detail-scale X] [--model NAME_OR_DIR] [--executor ray|local]
                  [--storage-options JSON] [--batch-size N] [--tile-batch N]

Same machinery as ``rdeic archive``: one archive shard is the unit of work (``pipeline.restore.
restore_shard``), run by the same executors (one Ray actor per GPU, model loaded once), with done
markers under ``<output>/_manifest/`` so rerunning the command resumes. Output layout, failure
reasons and the per-key records are in docs/restore-audit.md.

The model defaults to ``--model``, else ``$RDEIC_MODEL``, else the model named in the archive's
``run.json``; whichever it is must have the archive's codec fingerprint (exit 2 otherwise).
Exit status as for ``rdeic archive``: 0 when every shard was processed (keys that failed to decode
are recorded, not fatal), 1 when some shards could not be processed, 2 for configuration errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.engine import JobOutcome, Prepared, Ran, run_job
from pipeline.manifest import Manifest, OutputLocation
from pipeline.progress import ProgressSink
from pipeline.restore import FORMATS, RestoreConfig, config_dict, restore_settings, restore_shard
from pipeline.types import ShardRef

from ..codec import open_archive
from ..options import DecodeJobOptions, JobConfigError, option
from ..shardjob import JobTask, failed_shard_lines, reason_lines, run_lines, shard_command

HELP = "decode archived bitstreams back into image files"
RESTORE_FILE = "restore.json"


RestoreConfigError = JobConfigError  # the name callers catch


@dataclass(frozen=True, kw_only=True)
class RestoreJob(DecodeJobOptions):
    """``rdeic restore``: archive -> PNG WebDataset shards or a folder tree."""

    output: str = option("output prefix (s3://..., file://..., path)", required=True, metavar="URL")
    format: str = option("wds: shards/<shard>.tar of <key>.png; folder: images/<shard>/<key>.png", default="wds",
                         choices=FORMATS, spec_help="wds: shards/<shard>.tar; folder: images/<shard>/<key>.png")


class RestoreTask(JobTask):
    """Archive shards in, decoded PNGs (``pipeline.restore.restore_shard``) and a keys file per shard out."""

    kind = "restore"
    verb = "restoring"
    options: RestoreJob

    def urls(self) -> list[str]:
        return [self.options.archive, self.options.output]

    def prepare(self, storage_options: dict[str, Any]) -> Prepared:
        job = self.options
        archive, _, factory, fingerprint = open_archive(job.archive, storage_options, job.model, job.compute_dtype,
                                                        job.tile_batch)
        config = RestoreConfig(format=job.format, steps=job.steps, detail_scale=job.detail_scale,
                               batch_size=job.batch_size, storage_options=storage_options,
                               expected_fingerprint=fingerprint)
        out = OutputLocation(job.output, storage_options)
        settings = restore_settings(archive.url, fingerprint, config)
        guard = Manifest(out).settings_guard(RESTORE_FILE, settings,
                                             {"job": job.to_config(), "config": config_dict(config)})
        return Prepared(out, factory, config, restore_shard, guard, state={"archive": archive})

    def shards(self, prepared: Prepared) -> list[ShardRef]:
        archive = prepared.state["archive"]
        shards: list[ShardRef] = archive.complete_shards()
        if not shards:
            raise ValueError(f"{archive.url} has no complete shard (no _manifest/done/*.json)")
        return shards

    def summarize(self, summary: dict[str, Any], ran: Ran) -> None:
        summary["archive"] = ran.prepared.state["archive"].url
        summary["format"] = self.options.format
        summary["images"]["not_archived"] = sum(int(s.extra.get("not_archived", 0)) for s in ran.all_stats)


def run_restore(job: RestoreJob, progress: ProgressSink | None = None, executor: Any = None) -> JobOutcome:
    """Run (or resume) a restore; raises RestoreConfigError before any work if misconfigured."""
    return run_job(RestoreTask(job), progress, executor)


def format_summary(summary: dict[str, Any]) -> str:
    sh, im = summary["shards"], summary["images"]
    lines = [
        f"restore {summary['archive']} -> {summary['output']} ({summary['format']}): "
        f"{sh['done_before'] + sh['done_this_run']}/{sh['total']} shards done ({sh['done_this_run']} this run, "
        f"{sh['done_before']} before), {sh['failed']} failed",
        f"  images: {im['total']} archived keys ({im['ok']} restored, {im['failed']} failed to decode; "
        f"{im['not_archived']} samples were never archived); this run {im['this_run']} in "
        f"{summary['seconds']:.1f}s = {im['this_run_per_s']:.2f} img/s",
    ]
    return "\n".join(lines + reason_lines(summary) + failed_shard_lines(summary["failed_shards"]) + run_lines(summary))


OPTIONS = RestoreJob
add_parser = shard_command(RestoreJob, RestoreTask, format_summary, __doc__)
