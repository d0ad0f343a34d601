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

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import storage
from pipeline.batching import DEFAULT_BATCH_SIZE
from pipeline.executors.base import ArchivePlan, ExecutorStartError, RunResult, ShardFailure, run_plan
from pipeline.failures import may_have_transient
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.lease import LeaseContendedError, LeaseHeldError, LeaseLostError, OutputLease
from pipeline.manifest import Manifest, OutputConflictError, OutputLocation, utc_now
from pipeline.progress import NullProgress, ProgressSink
from pipeline.reader import DEFAULT_MAX_MEMBER_BYTES
from pipeline.retry import archive_or_retry
from pipeline.runner import ShardConfig, process_shard
from pipeline.shards import expand_inputs
from pipeline.types import ShardRef, ShardStats
from pipeline.writer import DEFAULT_ROW_GROUP_SIZE

from ..codec import RDEICEncoderFactory, add_tile_batch_option
from ..config import write_resolved_config
from ..logs import progress_sink

HELP = 'encode WebDataset shards into Parquet archives (resumable)'

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_SHARDS_FAILED = 1
EXIT_CONFIG = 2
EXIT_LEASE = 75  # EX_TEMPFAIL: another live job writes into the output prefix; try again later
EXIT_INTERRUPTED = 130
LEASE_ERRORS = (LeaseHeldError, LeaseLostError, LeaseContendedError)
MODEL_ENV = "RDEIC_MODEL"
DEFAULT_MODEL = "mini"
EXECUTORS = ("ray", "local")


class ArchiveConfigError(ValueError):
    """The job cannot start as configured; the message says which value is wrong."""


@dataclass(frozen=True)
class ArchiveJob:
    """Everything an archive run depends on (also written, redacted, into run.json and each file)."""

    inputs: tuple[str, ...]
    output: str
    model: str = DEFAULT_MODEL
    executor: str = "ray"
    num_actors: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = DEFAULT_BATCH_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    max_shard_retries: int = 2
    device: str = "auto"
    compute_dtype: str | None = None
    tile_batch: int | None = None  # codec.tiling.batch of every worker's codec; None: the codec's default
    ray_address: str | None = None
    progress: bool | None = None  # None: bars only on a terminal
    retry_failed: bool = False  # also redo the transiently failed rows of done shards (pipeline.retry)
    break_lease: bool = False  # take the output's lease even from a live job (an operator's call; never saved)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ArchiveConfigError("no --input given")
        if self.executor not in EXECUTORS:
            raise ArchiveConfigError(f"unknown executor {self.executor!r}; expected one of {EXECUTORS}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ArchiveConfigError(f"--num-actors must be >= 1, got {self.num_actors}")
        if self.max_shard_retries < 0:
            raise ArchiveConfigError(f"--max-shard-retries must be >= 0, got {self.max_shard_retries}")
        if self.tile_batch is not None and self.tile_batch < 1:
            raise ArchiveConfigError(f"--tile-batch must be >= 1, got {self.tile_batch}")
        if not isinstance(self.storage_options, dict):
            raise ArchiveConfigError(f"storage options must be a JSON object, got {self.storage_options!r}")

    def to_config(self) -> dict[str, Any]:
        """JSON-able job description with secrets in the storage options redacted."""
        config = asdict(self)
        config["inputs"] = list(self.inputs)
        config["storage_options"] = storage.redact(self.storage_options)
        return config

    def to_spec(self) -> dict[str, Any]:
        """The job as the ``archive:`` section of a spec (keys = flags; jobs/config.py), secrets redacted.

        ``break_lease`` is left out: a saved spec rerun later must never break a live job's lease.
        """
        config = self.to_config()
        config.pop("break_lease")
        return {"input": config.pop("inputs"), **config}


@dataclass
class ArchiveOutcome:
    exit_code: int
    summary: dict[str, Any]


def _shard_config(job: ArchiveJob, storage_options: dict[str, Any], fingerprint: str,
                  metadata: dict[str, str]) -> ShardConfig:
    try:
        return ShardConfig(batch_size=job.batch_size, max_pixels=job.max_pixels,
                           max_member_bytes=job.max_member_bytes, row_group_size=job.row_group_size,
                           storage_options=storage_options, expected_fingerprint=fingerprint, metadata=metadata)
    except ValueError as exc:
        raise ArchiveConfigError(str(exc)) from None


def effective_storage_options(job: ArchiveJob) -> dict[str, Any]:
    """The job's storage options, plus the S3 endpoint from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``
    when the job touches S3 and names none itself.

    botocore reads those variables too, but only in processes that have them: putting the endpoint
    into the options carries it to workers on other nodes along with the rest of the job.
    """
    options = dict(job.storage_options)
    urls = [*job.inputs, job.output]
    uses_s3 = any(u.lstrip("@").startswith(("s3://", "s3a://")) for u in urls)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = dict(options.get("client_kwargs") or {})
    if uses_s3 and endpoint and not options.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        client_kwargs["endpoint_url"] = endpoint
        options["client_kwargs"] = client_kwargs
    return options


def make_executor(job: ArchiveJob) -> Any:
    if job.executor == "local":
        from pipeline.executors.local import LocalExecutor

        return LocalExecutor(device=job.device)
    from pipeline.executors.ray import RayExecutor

    return RayExecutor(num_actors=job.num_actors, address=job.ray_address, device=job.device)


def run_archive(job: ArchiveJob, progress: ProgressSink | None = None, executor: Any = None) -> ArchiveOutcome:
    """Run (or resume) an archive job; raises ArchiveConfigError before any work if misconfigured."""
    started_at, t0, run_id = utc_now(), time.perf_counter(), uuid.uuid4().hex[:8]
    storage_options = effective_storage_options(job)
    try:
        shards = expand_inputs(job.inputs, storage_options)
    except (ValueError, FileNotFoundError) as exc:
        raise ArchiveConfigError(f"--input: {exc}") from None
    factory = RDEICEncoderFactory(job.model, job.compute_dtype, job.tile_batch)
    try:
        identity = factory.identity()
    except (FileNotFoundError, ValueError) as exc:
        raise ArchiveConfigError(f"--model {job.model!r}: {exc}") from None
    out = OutputLocation(job.output, storage_options)
    manifest = Manifest(out)
    try:
        lease = OutputLease(out, "archive", run_id, break_lease=job.break_lease)
    except ValueError as exc:  # RDEIC_LEASE_* settings
        raise ArchiveConfigError(str(exc)) from None
    with lease:  # LeaseHeldError when another live job writes here; held (heartbeat) until the summary is written
        try:
            manifest.ensure_run(identity, job.to_config())
        except OutputConflictError as exc:
            raise ArchiveConfigError(str(exc)) from None
        write_resolved_config(job.output, "archive", job.to_spec(), storage_options)  # prefix accepted: record the run
        done_before = manifest.done_shards()
        pending = [s for s in shards if s.shard_id not in done_before]
        skipped = [s.shard_id for s in shards if s.shard_id in done_before]
        earlier_stats: dict[str, ShardStats] = {}
        retry: list[ShardRef] = []
        if job.retry_failed and skipped:
            earlier_stats = {s.shard_id: s for s in manifest.read_done(skipped)}
            retry = [s for s in shards if s.shard_id in earlier_stats
                     and may_have_transient(earlier_stats[s.shard_id].failed_by_reason)]
        metadata = identity.to_metadata() | {"rdeic.job": json.dumps(job.to_config(), sort_keys=True)}
        config = _shard_config(job, storage_options, identity.fingerprint, metadata)
        plan = ArchivePlan(pending + retry, factory, out, config, job.max_shard_retries,
                           work=archive_or_retry if job.retry_failed else process_shard)
        progress = progress or NullProgress()
        progress.start(len(pending) + len(retry), len(shards) - len(pending) - len(retry))
        result = run_plan((executor or make_executor(job)), plan, progress, ArchiveConfigError)
        lease.raise_if_lost()
        retried = {s.shard_id for s in retry}
        fresh = RunResult(done=[s for s in result.done if s.shard_id not in retried],
                          failed=[f for f in result.failed if f.shard_id not in retried])
        redone = {s.shard_id: s for s in result.done if s.shard_id in retried}
        if skipped and not earlier_stats:
            earlier_stats = {s.shard_id: s for s in manifest.read_done(skipped)}
        earlier = [redone.get(i) or earlier_stats[i] for i in skipped if i in redone or i in earlier_stats]
        summary = build_summary(job, run_id, started_at, time.perf_counter() - t0, len(shards), fresh, earlier)
        if job.retry_failed:
            summary["retry_failed"] = retry_summary(len(retry), list(redone.values()),
                                                    [f for f in result.failed if f.shard_id in retried])
            if summary["retry_failed"]["failed_shards"]:
                summary["exit_code"] = EXIT_SHARDS_FAILED
        lease.write_summary(manifest, summary)
    return ArchiveOutcome(summary["exit_code"], summary)


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


def build_summary(job: ArchiveJob, run_id: str, started_at: str, seconds: float, total_shards: int,
                  result: RunResult, earlier: list[ShardStats]) -> dict[str, Any]:
    """Totals over every shard of the input list: this run's and those done by earlier runs."""
    all_stats = list(result.done) + list(earlier)
    reasons: Counter[str] = Counter()
    for s in all_stats:
        reasons.update(s.failed_by_reason)
    images_now = sum(s.rows for s in result.done)
    exit_code = EXIT_SHARDS_FAILED if result.failed else EXIT_OK
    return {
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": utc_now(),
        "seconds": round(seconds, 3),
        "output": job.output,
        "exit_code": exit_code,
        "shards": {
            "total": total_shards,
            "done_before": len(earlier),
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
    }


def format_summary(summary: dict[str, Any]) -> str:
    sh, im = summary["shards"], summary["images"]
    lines = [
        f"archive {summary['output']}: {sh['done_before'] + sh['done_this_run']}/{sh['total']} shards done "
        f"({sh['done_this_run']} this run, {sh['done_before']} before), {sh['failed']} failed, {sh['damaged']} damaged",
        f"  images: {im['total']} ({im['ok']} ok, {im['failed']} failed); this run {im['this_run']} "
        f"in {summary['seconds']:.1f}s = {im['this_run_per_s']:.2f} img/s",
    ]
    if im["failed_by_reason"]:
        lines.append("  failed by reason: " + ", ".join(f"{k}={v}" for k, v in im["failed_by_reason"].items()))
    for d in summary["damaged_shards"]:
        lines.append(f"  damaged shard {d['shard_id']}: {d['message']}")
    for f in summary["failed_shards"]:
        lines.append(f"  FAILED shard {f['shard_id']} after {f['attempts']} attempt(s): {f['error']}")
    retry = summary.get("retry_failed")
    if retry is not None:
        lines.append(f"  retry-failed: {retry['rows']} transiently failed row(s) retried in {retry['shards_retried']} "
                     f"shard(s): {retry['now_ok']} now ok, {retry['still_failed']} still failed"
                     + (f" ({', '.join(f'{k}={v}' for k, v in retry['still_failed_by_reason'].items())})"
                        if retry["still_failed_by_reason"] else "")
                     + (f", {retry['kept']} kept as they were (source gone or changed)" if retry["kept"] else ""))
        for f in retry["failed_shards"]:
            lines.append(f"  FAILED retry of shard {f['shard_id']} after {f['attempts']} attempt(s) (its archive "
                         f"is unchanged): {f['error']}")
    took = (summary.get("lease") or {}).get("took_over")
    if took and took.get("why") != "released":
        lines.append(f"  took over the output's lease from {took.get('owner')} ({took.get('why')})")
    if summary.get("summary_url"):
        lines.append(f"  summary: {summary['summary_url']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def _json_object(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}: {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("archive", help="encode WebDataset shards into Parquet archives (resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, metavar="PATTERN",
                   help="shards: brace pattern, glob, @list.txt or URL; repeatable")
    p.add_argument("--output", required=True, metavar="URL", help="output prefix (s3://..., file://..., path)")
    p.add_argument("--model", default=os.environ.get(MODEL_ENV, DEFAULT_MODEL), metavar="NAME_OR_DIR",
                   help=f"model directory or shipped name (default: ${MODEL_ENV} or {DEFAULT_MODEL!r})")
    p.add_argument("--executor", choices=EXECUTORS, default="ray")
    p.add_argument("--num-actors", type=int, default=None, metavar="N",
                   help="Ray workers (default: one per GPU, else CPUs)")
    p.add_argument("--storage-options", type=_json_object, default={}, metavar="JSON",
                   help="fsspec options for remote storage (inputs and output), JSON or @file.json")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda, cuda:N")
    p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="VAE/UNet dtype on GPU (CPU is always float32)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    add_tile_batch_option(p)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="larger images are recorded as failed (too_large)")
    p.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES)
    p.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE)
    p.add_argument("--max-shard-retries", type=int, default=2)
    p.add_argument("--retry-failed", action="store_true", default=False,
                   help="also redo the rows of done shards that failed for a transient reason (out of memory); "
                        "rows that failed for good (corrupt, too large, ...) are left alone")
    add_break_lease_option(p)
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_true", default=None, help="always draw bars")
    bars.add_argument("--no-progress", dest="progress", action="store_false", help="never draw bars")
    p.set_defaults(func=main_from_args)
    return p


def add_break_lease_option(p: argparse.ArgumentParser) -> None:
    """--break-lease of archive, restore and audit."""
    p.add_argument("--break-lease", action="store_true", default=False,
                   help="take the output's lease even though another job holds it and it has not expired: "
                        "only when you know that job is dead (its next write then fails, exit status 75)")


def job_from_args(args: argparse.Namespace) -> ArchiveJob:
    return ArchiveJob(
        inputs=tuple(args.input), output=args.output, model=args.model, executor=args.executor,
        num_actors=args.num_actors, storage_options=args.storage_options, batch_size=args.batch_size,
        max_pixels=args.max_pixels, max_member_bytes=args.max_member_bytes, row_group_size=args.row_group_size,
        max_shard_retries=args.max_shard_retries, device=args.device,
        compute_dtype=None if args.compute_dtype in (None, "float32") else args.compute_dtype,
        tile_batch=args.tile_batch, ray_address=args.ray_address, progress=args.progress,
        retry_failed=bool(getattr(args, "retry_failed", False)),
        break_lease=bool(getattr(args, "break_lease", False)),
    )


def main_from_args(args: argparse.Namespace) -> int:
    try:
        job = job_from_args(args)
        progress = progress_sink(job.progress)  # JSON logging: per-shard events instead of bars
        with logging_redirect_tqdm():
            outcome = run_archive(job, progress)
    except ArchiveConfigError as exc:
        print(f"rdeic archive: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LEASE_ERRORS as exc:
        print(f"rdeic archive: error: {exc}", file=sys.stderr)
        return EXIT_LEASE
    except ExecutorStartError as exc:
        print(f"rdeic archive: error: no shard processed: {exc}", file=sys.stderr)
        return EXIT_SHARDS_FAILED
    except KeyboardInterrupt:
        print("rdeic archive: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(outcome.summary))
    return outcome.exit_code
