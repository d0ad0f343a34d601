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

import argparse
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import storage
from pipeline.archives import ArchiveLocation
from pipeline.decoder import RejectedStream, StreamDecodeError, StreamInfo
from pipeline.executors.base import ArchivePlan, ExecutorStartError, run_plan
from pipeline.manifest import Manifest, OutputLocation, utc_now
from pipeline.progress import NullProgress, ProgressSink
from pipeline.restore import (
    DEFAULT_DECODE_BATCH,
    FORMATS,
    RestoreConfig,
    config_dict,
    ensure_job_file,
    restore_settings,
    restore_shard,
)
from pipeline.lease import OutputLease

from .archive import (
    EXECUTORS,
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_LEASE,
    EXIT_SHARDS_FAILED,
    LEASE_ERRORS,
    MODEL_ENV,
    _json_object,
    add_break_lease_option,
    build_summary,
    effective_storage_options,
    make_executor,
)
from ..codec import RDEICEncoderFactory, _describe_device, add_tile_batch_option

HELP = 'decode archived bitstreams back into image files'

log = logging.getLogger(__name__)
RESTORE_FILE = "restore.json"
MAX_SUMMARY_FAILED_KEYS = 1000


class RestoreConfigError(ValueError):
    """The job cannot start as configured; the message says which value is wrong."""


# ------------------------------------------------------------------------------------ the decoder
class RDEICDecoder:
    """``pipeline.decoder.Decoder`` over a loaded ``RDEICCodec``: codec errors become per-stream reasons."""

    def __init__(self, codec: Any, device: str) -> None:
        self.codec = codec
        self.fingerprint: bytes = codec.fingerprint
        self.device = _describe_device(device)

    def inspect(self, bitstream: bytes, steps: int | None = None, detail_scale: float | None = None) -> StreamInfo:
        from rdeic_core.bitstream import BitstreamError, ModelMismatchError
        from rdeic_core.images import padded_size

        try:
            header = self.codec.parse(bitstream).header
        except ModelMismatchError as exc:
            raise RejectedStream("foreign_model", str(exc)) from None
        except BitstreamError as exc:
            raise RejectedStream("corrupt_bitstream", str(exc)) from None
        s = header.steps if steps is None else int(steps)
        d = header.detail_scale if detail_scale is None else float(detail_scale)
        ph, pw = padded_size(header.height, header.width, self.codec.config.pad_multiple)
        # streams decoded whole batch by padded size; tiled ones share tile batches whatever their size
        size_key = tuple(header.z_shape) if self.codec.fits_untiled(header.z_shape) else "tiled"
        return StreamInfo(width=header.width, height=header.height, steps=s, detail_scale=d,
                          bucket=(size_key, s, d), pixels=ph * pw)

    def decode(self, bitstreams: Sequence[bytes], steps: int | None = None,
               detail_scale: float | None = None) -> list[np.ndarray]:
        from rdeic_core.entropy import EntropyCodingError

        try:
            return self.codec.decode(list(bitstreams), steps=steps, detail_scale=detail_scale)
        except (ValueError, EntropyCodingError, MemoryError) as exc:
            raise StreamDecodeError(f"{type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                raise StreamDecodeError(f"out of device memory: {exc}") from exc
            raise


@dataclass(frozen=True)
class RDEICDecoderFactory(RDEICEncoderFactory):
    """Same recipe as the encoder factory (model name/dir + compute dtype + tile batch); ``load`` gives a decoder."""

    def load(self, device: str = "auto") -> RDEICDecoder:  # type: ignore[override]
        return RDEICDecoder(*self._load_placed(device))


# ------------------------------------------------------------------------------------ shared set-up
@dataclass(frozen=True)
class _Urls:
    """The URLs and options of a decode-side job, shaped for ``jobs.commands.archive.effective_storage_options``."""

    inputs: tuple[str, ...]
    output: str
    storage_options: dict[str, Any]


def storage_options_for(urls: Sequence[str], output: str, options: dict[str, Any]) -> dict[str, Any]:
    """The job's options plus the S3 endpoint from the AWS environment (same rule as ``rdeic archive``)."""
    return effective_storage_options(_Urls(tuple(urls), output, options))  # type: ignore[arg-type]


def resolve_model(explicit: str | None, run: dict[str, Any]) -> str:
    """``--model``, else ``$RDEIC_MODEL``, else the model recorded in the archive's run.json."""
    if explicit:
        return explicit
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    model = (run.get("job") or {}).get("model")
    if not model:
        raise ValueError("the archive's run.json names no model; pass --model")
    return str(model)


def open_archive(url: str, storage_options: dict[str, Any], model: str | None, compute_dtype: str | None,
                 tile_batch: int | None = None) -> tuple[ArchiveLocation, dict[str, Any], RDEICDecoderFactory, str]:
    """(archive, its run.json, a decoder factory of the archive's codec, fingerprint); ValueError if not.

    ``tile_batch`` (``--tile-batch``) becomes ``tiling.batch`` of every codec the factory loads.
    """
    archive = ArchiveLocation(url, storage_options)
    run = archive.read_run()
    expected = (run.get("codec") or {}).get("fingerprint")
    factory = RDEICDecoderFactory(resolve_model(model, run), compute_dtype, tile_batch)
    try:
        identity = factory.identity()
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"--model {factory.model!r}: {exc}") from None
    if expected and identity.fingerprint != expected:
        raise ValueError(f"model {factory.model!r} has codec fingerprint {identity.fingerprint}, but {url} was "
                         f"archived with {expected}; pass the --model that wrote it")
    return archive, run, factory, identity.fingerprint


def summarize_failed_keys(stats: Sequence[Any], limit: int = MAX_SUMMARY_FAILED_KEYS) -> tuple[list[str], bool]:
    keys = sorted(k for s in stats for k in s.failed_keys)
    truncated = len(keys) > limit or any(s.failed_keys_truncated for s in stats)
    return keys[:limit], truncated


# ------------------------------------------------------------------------------------ the job
@dataclass(frozen=True)
class RestoreJob:
    archive: str
    output: str
    format: str = "wds"
    steps: int | None = None
    detail_scale: float | None = None
    model: str | None = None
    executor: str = "ray"
    num_actors: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = DEFAULT_DECODE_BATCH
    max_shard_retries: int = 2
    device: str = "auto"
    compute_dtype: str | None = None
    tile_batch: int | None = None  # codec.tiling.batch of every worker's codec; None: the codec's default
    ray_address: str | None = None
    progress: bool | None = None
    break_lease: bool = False  # take the output's lease even from a live job (never saved)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise RestoreConfigError(f"unknown executor {self.executor!r}; expected one of {EXECUTORS}")
        if self.num_actors is not None and self.num_actors < 1:
            raise RestoreConfigError(f"--num-actors must be >= 1, got {self.num_actors}")
        if self.tile_batch is not None and self.tile_batch < 1:
            raise RestoreConfigError(f"--tile-batch must be >= 1, got {self.tile_batch}")
        if self.max_shard_retries < 0:
            raise RestoreConfigError(f"--max-shard-retries must be >= 0, got {self.max_shard_retries}")
        if not isinstance(self.storage_options, dict):
            raise RestoreConfigError(f"storage options must be a JSON object, got {self.storage_options!r}")

    def to_config(self) -> dict[str, Any]:
        config = asdict(self)
        config["storage_options"] = storage.redact(self.storage_options)
        return config


@dataclass
class RestoreOutcome:
    exit_code: int
    summary: dict[str, Any]


def run_restore(job: RestoreJob, progress: ProgressSink | None = None, executor: Any = None) -> RestoreOutcome:
    """Run (or resume) a restore; raises RestoreConfigError before any work if misconfigured."""
    started_at, t0, run_id = utc_now(), time.perf_counter(), uuid.uuid4().hex[:8]
    options = storage_options_for([job.archive], job.output, job.storage_options)
    try:
        archive, _, factory, fingerprint = open_archive(job.archive, options, job.model, job.compute_dtype,
                                                        job.tile_batch)
        config = RestoreConfig(format=job.format, steps=job.steps, detail_scale=job.detail_scale,
                               batch_size=job.batch_size, storage_options=options, expected_fingerprint=fingerprint)
        out = OutputLocation(job.output, options)
        lease = OutputLease(out, "restore", run_id, break_lease=job.break_lease)
    except (ValueError, FileNotFoundError) as exc:  # ArchiveReadError, bad knobs
        raise RestoreConfigError(str(exc)) from None
    with lease:  # LeaseHeldError when another live job writes into the output
        try:
            ensure_job_file(out, RESTORE_FILE, restore_settings(archive.url, fingerprint, config),
                            {"job": job.to_config(), "config": config_dict(config)})
            shards = archive.complete_shards()
        except (ValueError, FileNotFoundError) as exc:  # ArchiveReadError, OutputConflictError
            raise RestoreConfigError(str(exc)) from None
        if not shards:
            raise RestoreConfigError(f"{archive.url} has no complete shard (no _manifest/done/*.json)")
        manifest = Manifest(out)
        done_before = manifest.done_shards()
        pending = [s for s in shards if s.shard_id not in done_before]
        plan = ArchivePlan(pending, factory, out, config, job.max_shard_retries,  # type: ignore[arg-type]
                           work=restore_shard, kind="restore")
        progress = progress or NullProgress()
        progress.verb = "restoring"  # type: ignore[attr-defined]
        progress.start(len(pending), len(shards) - len(pending))
        result = run_plan((executor or make_executor(job)), plan, progress, RestoreConfigError)
        skipped = [s.shard_id for s in shards if s.shard_id in done_before]
        earlier = manifest.read_done(skipped) if skipped else []
        summary = build_summary(job, run_id, started_at, time.perf_counter() - t0, len(shards),  # type: ignore[arg-type]
                                result, earlier)
        all_stats = list(result.done) + list(earlier)
        summary["archive"] = archive.url
        summary["format"] = job.format
        summary["images"]["not_archived"] = sum(int(s.extra.get("not_archived", 0)) for s in all_stats)
        summary["failed_keys"], summary["failed_keys_truncated"] = summarize_failed_keys(all_stats)
        lease.write_summary(manifest, summary)
    return RestoreOutcome(summary["exit_code"], summary)


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
    if im["failed_by_reason"]:
        lines.append("  failed by reason: " + ", ".join(f"{k}={v}" for k, v in im["failed_by_reason"].items()))
    if summary["failed_keys"]:
        more = " (truncated)" if summary["failed_keys_truncated"] else ""
        lines.append(f"  failed keys{more}: " + ", ".join(summary["failed_keys"][:20])
                     + (" ..." if len(summary["failed_keys"]) > 20 else ""))
    for f in summary["failed_shards"]:
        lines.append(f"  FAILED shard {f['shard_id']} after {f['attempts']} attempt(s): {f['error']}")
    if summary.get("summary_url"):
        lines.append(f"  summary: {summary['summary_url']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI
def add_decode_overrides(p: argparse.ArgumentParser) -> None:
    """--steps / --detail-scale of restore, audit and get: override what each bitstream header says."""
    p.add_argument("--steps", type=int, default=None, help="relay steps (default: each bitstream header's)")
    p.add_argument("--detail-scale", type=float, default=None, help="detail scale (default: each header's)")


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options every decode-side job shares with ``rdeic archive``."""
    p.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help=f"model (default: ${MODEL_ENV}, else the model in the archive's run.json)")
    p.add_argument("--executor", choices=EXECUTORS, default="ray")
    p.add_argument("--num-actors", type=int, default=None, metavar="N",
                   help="Ray workers (default: one per GPU, else CPUs)")
    p.add_argument("--storage-options", type=_json_object, default={}, metavar="JSON",
                   help="fsspec options for remote storage (archive, sources and output), JSON or @file.json")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda, cuda:N")
    p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="VAE/UNet dtype on GPU (CPU is always float32)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_DECODE_BATCH,
                   help="streams decoded together (only streams of one padded size share a batch)")
    add_tile_batch_option(p)
    p.add_argument("--max-shard-retries", type=int, default=2)
    add_break_lease_option(p)
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_true", default=None, help="always draw bars")
    bars.add_argument("--no-progress", dest="progress", action="store_false", help="never draw bars")


def common_job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The job fields that :func:`add_common_arguments` parsed (float32 is the default compute dtype)."""
    return dict(
        model=args.model, executor=args.executor, num_actors=args.num_actors,
        storage_options=args.storage_options, batch_size=args.batch_size,
        max_shard_retries=args.max_shard_retries, device=args.device,
        compute_dtype=None if args.compute_dtype in (None, "float32") else args.compute_dtype,
        tile_batch=args.tile_batch, ray_address=args.ray_address, progress=args.progress,
        break_lease=bool(getattr(args, "break_lease", False)))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("restore", help="decode Parquet archives into PNG WebDataset shards or a folder tree",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", required=True, metavar="URL", help="archive prefix written by `rdeic archive`")
    p.add_argument("--output", required=True, metavar="URL", help="output prefix (s3://..., file://..., path)")
    p.add_argument("--format", choices=FORMATS, default="wds",
                   help="wds: shards/<shard>.tar of <key>.png; folder: images/<shard>/<key>.png")
    add_decode_overrides(p)
    add_common_arguments(p)
    p.set_defaults(func=main_from_args)
    return p


def main_from_args(args: argparse.Namespace) -> int:
    from ..logs import progress_sink

    try:
        job = RestoreJob(archive=args.archive, output=args.output, format=args.format, steps=args.steps,
                         detail_scale=args.detail_scale, **common_job_options(args))
        with logging_redirect_tqdm():
            outcome = run_restore(job, progress_sink(job.progress))  # JSON logging: events instead of bars
    except RestoreConfigError as exc:
        print(f"rdeic restore: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LEASE_ERRORS as exc:
        print(f"rdeic restore: error: {exc}", file=sys.stderr)
        return EXIT_LEASE
    except ExecutorStartError as exc:
        print(f"rdeic restore: error: no shard processed: {exc}", file=sys.stderr)
        return EXIT_SHARDS_FAILED
    except KeyboardInterrupt:
        print("rdeic restore: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_summary(outcome.summary))
    return outcome.exit_code

