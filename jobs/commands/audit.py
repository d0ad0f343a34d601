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
import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

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
from pipeline.executors.base import ArchivePlan, ExecutorStartError, run_plan
from pipeline.manifest import Manifest, OutputLocation, utc_now
from pipeline.metrics import DEFAULT_FID_PATCH, PERCEPTUAL_METRICS, find_weights
from pipeline.progress import NullProgress, ProgressSink
from pipeline.report import write_report
from pipeline.restore import DEFAULT_DECODE_BATCH, ensure_job_file
from pipeline.lease import OutputLease
from pipeline.shards import expand_inputs

from .archive import (
    EXECUTORS,
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_LEASE,
    EXIT_SHARDS_FAILED,
    LEASE_ERRORS,
    build_summary,
)
from .restore import (
    add_common_arguments,
    add_decode_overrides,
    common_job_options,
    open_archive,
    storage_options_for,
    summarize_failed_keys,
)

HELP = 'decode a sample of an archive and measure quality against the sources'

log = logging.getLogger(__name__)
AUDIT_FILE = "audit.json"
SUMMARY_FILE = "summary.json"


class AuditConfigError(ValueError):
    """The job cannot start as configured; the message says which value is wrong."""


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


@dataclass(frozen=True)
class AuditJob:
    archive: str
    sources: tuple[str, ...]
    output: str
    fraction: float = 1.0
    seed: int = 0
    steps: int | None = None
    detail_scale: float | None = None
    perceptual: tuple[str, ...] = PERCEPTUAL_METRICS
    fid_patch: int = DEFAULT_FID_PATCH
    worst_k: int = DEFAULT_WORST_K
    crop: int = DEFAULT_CROP
    model: str | None = None
    executor: str = "ray"
    num_actors: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = DEFAULT_DECODE_BATCH
    max_pending_pixels: int = DEFAULT_MAX_PENDING_PIXELS
    max_shard_retries: int = 2
    device: str = "auto"
    compute_dtype: str | None = None
    tile_batch: int | None = None  # codec.tiling.batch of every worker's codec; None: the codec's default
    ray_address: str | None = None
    progress: bool | None = None
    break_lease: bool = False  # take the output's lease even from a live job (never saved)

    def __post_init__(self) -> None:
        if not self.sources:
            raise AuditConfigError("no --source given")
        if self.executor not in EXECUTORS:
            raise AuditConfigError(f"unknown executor {self.executor!r}; expected one of {EXECUTORS}")
        if not 0.0 < self.fraction <= 1.0:
            raise AuditConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.fid_patch < 16:
            raise AuditConfigError(f"--fid-patch must be >= 16 px, got {self.fid_patch}")
        if self.num_actors is not None and self.num_actors < 1:
            raise AuditConfigError(f"--num-actors must be >= 1, got {self.num_actors}")
        if self.tile_batch is not None and self.tile_batch < 1:
            raise AuditConfigError(f"--tile-batch must be >= 1, got {self.tile_batch}")
        if not isinstance(self.storage_options, dict):
            raise AuditConfigError(f"storage options must be a JSON object, got {self.storage_options!r}")

    def to_config(self) -> dict[str, Any]:
        config = asdict(self)
        config["sources"] = list(self.sources)
        config["perceptual"] = list(self.perceptual)
        config["storage_options"] = storage.redact(self.storage_options)
        return config


@dataclass
class AuditOutcome:
    exit_code: int
    summary: dict[str, Any]
    run_summary: dict[str, Any]


def run_audit(job: AuditJob, progress: ProgressSink | None = None, executor: Any = None) -> AuditOutcome:
    """Run (or resume) an audit, then (re)write summary.json and report.html over every audited shard."""
    started_at, t0, run_id = utc_now(), time.perf_counter(), uuid.uuid4().hex[:8]
    options = storage_options_for([job.archive, *job.sources], job.output, job.storage_options)
    try:
        archive, run, decoder_factory, fingerprint = open_archive(job.archive, options, job.model, job.compute_dtype,
                                                                  job.tile_batch)
        sources = {s.shard_id: s.url for s in expand_inputs(job.sources, options)}
        config = AuditConfig(sources=sources, fraction=job.fraction, seed=job.seed, steps=job.steps,
                             detail_scale=job.detail_scale, batch_size=job.batch_size,
                             max_pending_pixels=job.max_pending_pixels, worst_k=job.worst_k, crop=job.crop,
                             storage_options=options, expected_fingerprint=fingerprint)
        out = OutputLocation(job.output, options)
        settings = {"archive": archive.url, "codec_fingerprint": fingerprint, "fraction": job.fraction,
                    "seed": job.seed, "steps": job.steps, "detail_scale": job.detail_scale,
                    "fid_patch": job.fid_patch, "perceptual": list(job.perceptual)}
        lease = OutputLease(out, "audit", run_id, break_lease=job.break_lease)
    except (ValueError, FileNotFoundError) as exc:
        raise AuditConfigError(str(exc)) from None
    with lease:  # LeaseHeldError when another live job writes into the output
        try:
            ensure_job_file(out, AUDIT_FILE, settings, {"job": job.to_config()})
            archived = archive.complete_shards()
        except (ValueError, FileNotFoundError) as exc:
            raise AuditConfigError(str(exc)) from None
        planned = [s for s in archived if s.shard_id in sources]
        if not planned:
            raise AuditConfigError(f"no archive shard of {archive.url} has a source among --source "
                                   f"({len(archived)} archive shard(s), {len(sources)} source shard(s), no common id)")
        manifest = Manifest(out)
        done_before = manifest.done_shards()
        pending = [s for s in planned if s.shard_id not in done_before]
        factory = AuditorFactory(decoder_factory, job.perceptual, job.fid_patch)
        plan = ArchivePlan(pending, factory, out, config, job.max_shard_retries,  # type: ignore[arg-type]
                           work=audit_shard, kind="audit")
        progress = progress or NullProgress()
        progress.verb = "auditing"  # type: ignore[attr-defined]
        progress.start(len(pending), len(planned) - len(pending))
        result = run_plan((executor or _make_executor(job)), plan, progress, AuditConfigError)
        skipped = [s.shard_id for s in planned if s.shard_id in done_before]
        earlier = manifest.read_done(skipped) if skipped else []
        run_summary = build_summary(job, run_id, started_at, time.perf_counter() - t0,  # type: ignore[arg-type]
                                    len(planned), result, earlier)
        all_stats = list(result.done) + list(earlier)
        run_summary["failed_keys"], run_summary["failed_keys_truncated"] = summarize_failed_keys(all_stats)
        lease.write_summary(manifest, run_summary)

        driver_missing = {m: list(s.missing) for m, s in find_weights(job.perceptual).items() if not s.available}
        header = {
            "archive": archive.url, "sources_patterns": list(job.sources), "output": out.url,
            "codec": {"fingerprint": fingerprint, "name": (run.get("codec") or {}).get("name"),
                      "model": decoder_factory.model},
            "fraction": job.fraction, "seed": job.seed, "steps": job.steps, "detail_scale": job.detail_scale,
            "perceptual_requested": list(job.perceptual),
            "shards_without_source": sorted(s.shard_id for s in archived if s.shard_id not in sources),
            "source_shards_not_archived": sorted(set(sources) - {s.shard_id for s in archived}),
            "shards_failed": [asdict(f) for f in result.failed],
            "exit_code": run_summary["exit_code"],
        }
        summary, columns, crops = summarize(out, all_stats, header, driver_missing, job.fid_patch, job.worst_k)
        summary["report"] = write_report(out, summary, columns, crops)
        summary_path = out.path(SUMMARY_FILE)
        out.check_lease()
        storage.write_bytes_atomic(out.fs, summary_path,
                                   (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        summary["summary_url"] = out.to_url(summary_path)
    return AuditOutcome(run_summary["exit_code"], summary, run_summary)


def _make_executor(job: AuditJob) -> Any:
    from .archive import make_executor

    return make_executor(job)  # type: ignore[arg-type]


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
    if im["failed_by_reason"]:
        lines.append("  failed by reason: " + ", ".join(f"{k}={v}" for k, v in im["failed_by_reason"].items()))
        lines.append("  failed keys: " + ", ".join(summary["failed_keys"][:20])
                     + (" ..." if len(summary["failed_keys"]) > 20 else ""))
    for metric, files in summary["metrics_unavailable"].items():
        lines.append(f"  {metric}: not computed, missing " + "; ".join(files))
    if summary["shards_without_source"]:
        lines.append(f"  {len(summary['shards_without_source'])} archive shard(s) without a source were not audited: "
                     + ", ".join(summary["shards_without_source"][:10]))
    for f in summary["shards_failed"]:
        lines.append(f"  FAILED shard {f['shard_id']} after {f['attempts']} attempt(s): {f['error']}")
    lines.append(f"  report: {summary['report'].get('report.html')}  summary: {summary.get('summary_url')}")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("audit", help="decode (a sample of) an archive and measure it against the sources",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", required=True, metavar="URL", help="archive prefix written by `rdeic archive`")
    p.add_argument("--source", action="append", required=True, metavar="PATTERN",
                   help="source shards (as `rdeic archive --input`: brace pattern, glob, @list.txt); repeatable")
    p.add_argument("--output", required=True, metavar="URL", help="where metrics, summary.json and report.html go")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of archived keys to audit (hash-sampled)")
    p.add_argument("--seed", type=int, default=0, help="seed of the key sample")
    add_decode_overrides(p)
    p.add_argument("--perceptual", type=parse_perceptual, default=PERCEPTUAL_METRICS, metavar="LIST",
                   help="perceptual metrics to try when their weights exist: lpips,dists,fid (default all) or none")
    p.add_argument("--fid-patch", type=int, default=DEFAULT_FID_PATCH, help="FID/KID patch size in px (HiFiC: 256)")
    p.add_argument("--worst-k", type=int, default=DEFAULT_WORST_K, help="worst images (by PSNR) shown in the report")
    add_common_arguments(p)
    p.set_defaults(func=main_from_args)
    return p


def main_from_args(args: argparse.Namespace) -> int:
    from ..logs import progress_sink

    try:
        # values from a --config spec may arrive as plain strings: normalise them like the flags
        sources = (args.source,) if isinstance(args.source, str) else tuple(args.source)
        perceptual = parse_perceptual(args.perceptual) if isinstance(args.perceptual, str) else tuple(args.perceptual)
        job = AuditJob(
            archive=args.archive, sources=sources, output=args.output, fraction=args.fraction,
            seed=args.seed, steps=args.steps, detail_scale=args.detail_scale, perceptual=perceptual,
            fid_patch=args.fid_patch, worst_k=args.worst_k, **common_job_options(args))
        with logging_redirect_tqdm():
            outcome = run_audit(job, progress_sink(job.progress))
    except (AuditConfigError, argparse.ArgumentTypeError) as exc:
        print(f"rdeic audit: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LEASE_ERRORS as exc:
        print(f"rdeic audit: error: {exc}", file=sys.stderr)
        return EXIT_LEASE
    except ExecutorStartError as exc:
        print(f"rdeic audit: error: no shard processed: {exc}", file=sys.stderr)
        return EXIT_SHARDS_FAILED
    except KeyboardInterrupt:
        print("rdeic audit: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(outcome.summary))
    return outcome.exit_code
