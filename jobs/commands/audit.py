"""``rdeic audit``: decode (a sample of) an archive and measure it against the source images.

    rdeic audit --archive s3://b/archive-v1 --source 's3://b/shards/{000000..000999}.tar' \\
                --output s3://b/audit-v1 [--fraction 0.01] [--seed 0] [--steps S] [--detail-scale X]
                [--perceptual lpips,dists,fid|none] [--fid-patch 256] [--worst-k 8]
                [--model NAME_OR_DIR] [--executor ray|local] [--storage-options JSON] [--tile-batch N]

Per archive shard (the same executors and done markers as ``rdeic archive``, so a rerun resumes):
the sampled keys are decoded and compared with their source images, read back from the source
shards by key: bpp, PSNR and MS-SSIM always; LPIPS, DISTS and FID/KID when their weight files are
in the torch hub cache (never downloaded; the report names any missing file). Output:

    <output>/metrics/<shard>.parquet   one row per audited key (metrics, or the failure reason)
    <output>/summary.json              aggregate: means/medians, FID/KID, failures, per-shard table
    <output>/report.html + plots/*.png human-readable report (self-contained HTML)

Archive shards without a source shard (same shard id) are listed in the summary, not audited.
Exit status as for ``rdeic archive`` (0 all shards audited, 1 some failed, 2 configuration).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

from perceptual import DEFAULT_FID_PATCH, PERCEPTUAL_METRICS, find_weights
from pipeline import storage
from pipeline.audit import (
    DEFAULT_CROP,
    DEFAULT_MAX_PENDING_PIXELS,
    DEFAULT_WORST_K,
    AuditConfig,
    AuditorFactory,
    audit_shard,
    summarize,
)
from pipeline.engine import JobOutcome, Prepared, Ran, run_job
from pipeline.manifest import Manifest, OutputLocation
from pipeline.progress import ProgressSink
from pipeline.report import write_report
from pipeline.shards import expand_inputs
from pipeline.types import ShardRef

from ..codec import open_archive
from ..options import DecodeJobOptions, JobConfigError, option
from ..shardjob import JobTask, failed_shard_lines, reason_lines, shard_command

HELP = "decode a sample of an archive and measure quality against the sources"
AUDIT_FILE = "audit.json"
SUMMARY_FILE = "summary.json"


AuditConfigError = JobConfigError  # the name callers catch


def parse_perceptual(text: str) -> tuple[str, ...]:
    """``lpips,dists,fid`` (any subset) or ``none``."""
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PERCEPTUAL_METRICS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown perceptual metric(s) {unknown}; choose from {PERCEPTUAL_METRICS} "
                                         "or 'none'")
    return names


@dataclass(frozen=True, kw_only=True)
class AuditJob(DecodeJobOptions):
    """``rdeic audit``: decode (a sample of) an archive and measure it against the sources."""

    sources: tuple[str, ...] = option(
        "source shards (as `rdeic archive --input`: brace pattern, glob, @list.txt); repeatable", key="source",
        repeat=True, required=True, nonempty=True, metavar="PATTERN",
        spec_help="source shards, as archive's input (flag: --source, repeatable)")
    output: str = option("where metrics, summary.json and report.html go", required=True, metavar="URL")
    fraction: float = option("fraction of archived keys to audit (hash-sampled)", default=1.0, min=0, max=1)
    seed: int = option("seed of the key sample", default=0, min=0)
    perceptual: tuple[str, ...] = option(
        "perceptual metrics to try when their weights exist: lpips,dists,fid (default all) or none",
        default=PERCEPTUAL_METRICS, parse=parse_perceptual, unparse=lambda names: ",".join(names) or "none",
        metavar="LIST", spec_help="perceptual metrics tried when their weights exist: 'lpips,dists,fid' (any "
                                  "subset) or 'none'")
    fid_patch: int = option("FID/KID patch size in px (HiFiC: 256)", default=DEFAULT_FID_PATCH, min=1,
                            spec_help="FID/KID patch size in px")
    worst_k: int = option("worst images (by PSNR) shown in the report", default=DEFAULT_WORST_K, min=0)
    crop: int = option("side of the worst images' crops in the report", default=DEFAULT_CROP, exposed=False)
    max_pending_pixels: int = option("pixels waiting for a decode batch", default=DEFAULT_MAX_PENDING_PIXELS,
                                     exposed=False)

    def check(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise AuditConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.fid_patch < 16:
            raise AuditConfigError(f"--fid-patch must be >= 16 px, got {self.fid_patch}")


class AuditTask(JobTask):
    """Archive shards in, per-key metrics against the sources out; then summary.json and report.html."""

    kind = "audit"
    verb = "auditing"
    options: AuditJob

    def urls(self) -> list[str]:
        return [self.options.archive, *self.options.sources, self.options.output]

    def prepare(self, storage_options: dict[str, Any]) -> Prepared:
        job = self.options
        archive, run, decoder_factory, fingerprint = open_archive(job.archive, storage_options, job.model,
                                                                  job.compute_dtype, job.tile_batch)
        sources = {s.shard_id: s.url for s in expand_inputs(job.sources, storage_options)}
        config = AuditConfig(sources=sources, fraction=job.fraction, seed=job.seed, steps=job.steps,
                             detail_scale=job.detail_scale, batch_size=job.batch_size,
                             max_pending_pixels=job.max_pending_pixels, worst_k=job.worst_k, crop=job.crop,
                             storage_options=storage_options, expected_fingerprint=fingerprint)
        out = OutputLocation(job.output, storage_options)
        settings = {"archive": archive.url, "codec_fingerprint": fingerprint, "fraction": job.fraction,
                    "seed": job.seed, "steps": job.steps, "detail_scale": job.detail_scale,
                    "fid_patch": job.fid_patch, "perceptual": list(job.perceptual)}
        factory = AuditorFactory(decoder_factory, job.perceptual, job.fid_patch)
        return Prepared(out, factory, config, audit_shard,
                        Manifest(out).settings_guard(AUDIT_FILE, settings, {"job": job.to_config()}),
                        state={"archive": archive, "run": run, "sources": sources, "fingerprint": fingerprint,
                               "model": decoder_factory.model})

    def shards(self, prepared: Prepared) -> list[ShardRef]:
        archive, sources = prepared.state["archive"], prepared.state["sources"]
        archived = archive.complete_shards()
        prepared.state["archived"] = archived
        planned: list[ShardRef] = [s for s in archived if s.shard_id in sources]
        if not planned:
            raise ValueError(f"no archive shard of {archive.url} has a source among --source "
                             f"({len(archived)} archive shard(s), {len(sources)} source shard(s), no common id)")
        return planned

    def finish(self, summary: dict[str, Any], ran: Ran) -> dict[str, Any]:
        """summary.json and report.html over every audited shard (this run's and earlier runs')."""
        job, state, out = self.options, ran.prepared.state, ran.prepared.out
        archived, sources = state["archived"], state["sources"]
        driver_missing = {m: list(s.missing) for m, s in find_weights(job.perceptual).items() if not s.available}
        header = {
            "archive": state["archive"].url, "sources_patterns": list(job.sources), "output": out.url,
            "codec": {"fingerprint": state["fingerprint"], "name": (state["run"].get("codec") or {}).get("name"),
                      "model": state["model"]},
            "fraction": job.fraction, "seed": job.seed, "steps": job.steps, "detail_scale": job.detail_scale,
            "perceptual_requested": list(job.perceptual),
            "shards_without_source": sorted(s.shard_id for s in archived if s.shard_id not in sources),
            "source_shards_not_archived": sorted(set(sources) - {s.shard_id for s in archived}),
            "shards_failed": [asdict(f) for f in ran.result.failed],
            "exit_code": summary["exit_code"],
        }
        report, columns, crops = summarize(out, ran.all_stats, header, driver_missing, job.fid_patch, job.worst_k)
        report["report"] = write_report(out, report, columns, crops)
        path = out.path(SUMMARY_FILE)
        out.check_lease()
        storage.write_bytes_atomic(out.fs, path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
        report["summary_url"] = out.to_url(path)
        return report


def run_audit(job: AuditJob, progress: ProgressSink | None = None, executor: Any = None) -> JobOutcome:
    """Run (or resume) an audit, then (re)write summary.json and report.html over every audited shard."""
    return run_job(AuditTask(job), progress, executor)


def format_summary(summary: dict[str, Any]) -> str:
    im, m = summary["images"], summary["metrics"]

    def mean(name: str, digits: int = 4) -> str:
        value = m[name]["mean"]
        return "n/a" if value is None else f"{value:.{digits}f}"

    fid = summary["fid"]
    fid_text = "n/a" if fid["fid"] is None else f"{fid['fid']:.4g}"
    lines = [
        f"audit {summary['archive']} -> {summary['output']}: {im['audited']} keys audited in {len(summary['shards'])} "
        f"shard(s) ({im['ok']} measured, {im['failed']} failed)",
        f"  bpp {mean('bpp')}  PSNR {mean('psnr', 2)} dB  MS-SSIM {mean('ms_ssim')}  LPIPS {mean('lpips')}  "
        f"DISTS {mean('dists')}  FID {fid_text} "
        f"({fid['patches']} patches)",
    ]
    lines += reason_lines(summary)
    for metric, files in summary["metrics_unavailable"].items():
        lines.append(f"  {metric}: not computed, missing " + "; ".join(files))
    if summary["shards_without_source"]:
        lines.append(f"  {len(summary['shards_without_source'])} archive shard(s) without a source were not audited: "
                     + ", ".join(summary["shards_without_source"][:10]))
    lines += failed_shard_lines(summary["shards_failed"])
    lines.append(f"  report: {summary['report'].get('report.html')}  summary: {summary.get('summary_url')}")
    return "\n".join(lines)


OPTIONS = AuditJob
add_parser = shard_command(AuditJob, AuditTask, format_summary, __doc__)
