"""``rdeic get``: fetch and decode ONE archived image by key, without scanning the archive.

    rdeic get s3://b/archive-v1 000123/sample_0042 -o sample_0042.png [--steps S] [--detail-scale X]
              [--model NAME_OR_DIR] [--executor local|ray] [--storage-options JSON] [--tile-batch N]

The key names its file (``archive/<shard>.parquet``) and the file's row groups are disjoint,
sorted key ranges with min/max statistics, so the lookup reads the footer plus one row group
(``pipeline.archives.lookup``); no listing, no index file. The stream is checked (archive CRC
column, bitstream CRC, codec fingerprint) before decoding; a failure prints its reason.

``--executor ray`` decodes in a Ray task (on a GPU when the cluster has one) for a client without
a GPU; the default ``local`` decodes in this process. Exit status: 0 written, 1 the key is missing,
was never archived or cannot be decoded, 2 configuration errors.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.archives import DECODE_COLUMNS, ArchiveReadError, KeyNotFoundError, LookupStats, lookup
from pipeline.decoder import RejectedStream
from pipeline.restore import check_row, decode_streams

from ..codec import RDEICDecoderFactory, add_decode_overrides, add_tile_batch_option, open_archive
from ..exits import EXIT_OK, PlainError, UsageError, run_command
from ..options import EXECUTORS, json_object

HELP = 'fetch and decode single images from an archive by key'


class GetError(PlainError):
    """The key exists nowhere, was never archived, or its stream cannot be decoded; ``reason`` says which.

    Printed as ``rdeic get: KEY: reason: message``; exit 1.
    """

    def __init__(self, key: str, reason: str, message: str) -> None:
        super().__init__(f"{key}: {reason}: {message}")
        self.key = key
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[Any, tuple[str, str, str]]:  # picklable across a Ray task boundary
        return (type(self), (self.key, self.reason, self.message))


class GetConfigError(UsageError, ValueError):
    """The key cannot be fetched as configured (a value, the archive, the model, the output). Exit 2."""


@dataclass(frozen=True, kw_only=True)  # a dozen settings: always named, like the flags they come from
class GetJob:
    archive: str
    key: str
    output: str
    steps: int | None = None
    detail_scale: float | None = None
    model: str | None = None
    executor: str = "local"
    storage_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    compute_dtype: str | None = None
    tile_batch: int | None = None  # codec.tiling.batch of the decoding codec; None: the codec's default
    ray_address: str | None = None


@dataclass
class GetResult:
    image: np.ndarray
    row: dict[str, Any]
    lookup: LookupStats
    output: str


def _decode_one(factory: RDEICDecoderFactory, row: dict[str, Any], steps: int | None, detail_scale: float | None,
                device: str) -> np.ndarray:
    """Check and decode one archive row (also the body of the Ray task)."""
    decoder = factory.load(device)
    try:
        info = check_row(decoder, row, steps, detail_scale)
    except RejectedStream as exc:
        raise GetError(row["key"], exc.reason, exc.message) from None
    image = decode_streams(decoder, [row["bitstream"]], [info], steps, detail_scale)[0]
    if isinstance(image, RejectedStream):
        raise GetError(row["key"], image.reason, image.message)
    return image


def _decode_on_ray(job: GetJob, factory: RDEICDecoderFactory, row: dict[str, Any]) -> np.ndarray:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=job.ray_address)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_gpus=gpus, max_retries=1)(_decode_one)
        try:
            return ray.get(task.remote(factory, row, job.steps, job.detail_scale, job.device))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if isinstance(cause, GetError):
                raise GetError(cause.key, cause.reason, cause.message) from None
            raise
    finally:
        if started:
            ray.shutdown()


def encode_image_file(image: np.ndarray, name: str) -> bytes:
    """The image in the format the output name's extension asks for (PNG when unknown)."""
    from PIL import Image

    ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else "png"
    fmt = Image.registered_extensions().get(f".{ext}", "PNG")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def run_get(job: GetJob) -> GetResult:
    """Look the key up, decode it, write the image.

    Raises GetError when the key is not decoded, GetConfigError (a ValueError) when the job cannot
    run as configured.
    """
    try:
        return _get(job)
    except ValueError as exc:  # a value, the archive, the model or the output: nothing was written
        raise GetConfigError(str(exc)) from None


def _get(job: GetJob) -> GetResult:
    if job.executor not in EXECUTORS:
        raise ValueError(f"unknown executor {job.executor!r}; expected one of {EXECUTORS}")
    if job.tile_batch is not None and job.tile_batch < 1:
        raise ValueError(f"--tile-batch must be >= 1, got {job.tile_batch}")
    options = storage.with_env_endpoint([job.archive, job.output], job.storage_options)
    archive, _, factory, _ = open_archive(job.archive, options, job.model, job.compute_dtype, job.tile_batch)
    try:
        row, stats = lookup(archive, job.key, DECODE_COLUMNS)
    except KeyNotFoundError as exc:
        raise GetError(job.key, "no_such_key", str(exc)) from None
    except ArchiveReadError as exc:
        raise GetError(job.key, "incomplete_shard", str(exc)) from None
    if row["status"] != "ok":
        raise GetError(job.key, "not_archived", f"{job.key} was not archived: {row['reason']}")
    if job.executor == "ray":
        image = _decode_on_ray(job, factory, row)
    else:
        image = _decode_one(factory, row, job.steps, job.detail_scale, job.device)
    fs, path = storage.filesystem(job.output, options)
    storage.write_bytes_atomic(fs, path, encode_image_file(image, path))
    return GetResult(image, row, stats, storage.to_url(fs, path))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("get", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", metavar="ARCHIVE", help="archive prefix written by `rdeic archive`")
    p.add_argument("key", metavar="KEY", help="archive key, '<shard_id>/<sample key>'")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="image to write (format from its extension)")
    add_decode_overrides(p)
    p.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help="model (default: $RDEIC_MODEL, else the model in the archive's run.json)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local (this process) or ray (a Ray task, on a GPU if the cluster has one)")
    p.add_argument("--storage-options", type=json_object, default={}, metavar="JSON")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    add_tile_batch_option(p)
    p.set_defaults(func=main_from_args)
    return p


def main_from_args(args: argparse.Namespace) -> int:
    job = GetJob(archive=args.archive, key=args.key, output=args.output, steps=args.steps,
                 detail_scale=args.detail_scale, model=args.model, executor=args.executor,
                 storage_options=args.storage_options, device=args.device,
                 compute_dtype=None if args.compute_dtype in (None, "float32") else args.compute_dtype,
                 tile_batch=args.tile_batch, ray_address=args.ray_address)
    return run_command("get", lambda: _print_result(job, run_get(job)))


def _print_result(job: GetJob, result: GetResult) -> int:
    h, w = result.image.shape[:2]
    print(json.dumps({"key": job.key, "output": result.output, "width": w, "height": h,
                      "bpp": result.row.get("bpp"), "file": result.lookup.file,
                      "row_groups_read": result.lookup.row_groups_read, "row_groups": result.lookup.row_groups,
                      "bytes_read": result.lookup.bytes_read, "file_bytes": result.lookup.file_bytes}))
    return EXIT_OK
