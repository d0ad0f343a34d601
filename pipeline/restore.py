"""``restore_shard``: one archive file in, its decoded images out (WebDataset tar or folder) + records.

The restore mirror of ``pipeline.runner.process_shard``, run by the same executors (local, Ray
actors pinned to GPUs) through ``ShardPlan(work=restore_shard)``, with the same resume rule: the
done marker ``_manifest/done/<shard>.json`` is written last, so an interrupted shard is redone.

    archive/<shard>.parquet --read--> rows --check each stream--> size buckets --decode--> PNG
        wds:    PNGs spooled (bounded memory), then shards/<shard>.tar in source order, one atomic write
        folder: images/<shard>/<sample key>.png, each written atomically as it is decoded
    keys/<shard>.parquet   one row per archived key: ok (output name, hashes) or failed (reason, error)
    _manifest/done/<shard>.json

Every archived key (status ``ok`` in the archive) is either restored or recorded as failed with a
reason from :data:`RESTORE_REASONS`; nothing is skipped silently. Rows the archive itself marked
``failed`` have no bitstream and are counted (``extra.not_archived``), not restored.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from . import storage
from .archives import DECODE_COLUMNS, read_rows
from .decoder import DECODE_REASONS, Decoder, RejectedStream, SizeBuckets, StreamDecodeError, StreamInfo
from .executors.errors import check_fingerprint
from .manifest import Manifest, OutputLocation, utc_now
from .rows import Row, column, required, rows_table
from .types import STATUS_OK, ShardRef, ShardStats
from .writer import to_parquet_bytes

ProgressFn = Callable[[int], None]
FORMATS = ("wds", "folder")
DEFAULT_DECODE_BATCH = 8
# Pixels of pending streams (original size) a shard holds before it decodes the heaviest bucket:
# a decode batch of large photos holds their canvases and outputs, so it is bounded by pixels too.
DEFAULT_MAX_PENDING_PIXELS = 64 * 1024 * 1024
SPOOL_MEMORY_BYTES = 64 * 1024 * 1024
KEYS_DIR = "keys"

RESTORE_REASONS: dict[str, str] = DECODE_REASONS | {
    "unsafe_key": "the sample key is not a safe relative path (absolute, '..', empty parts); not written",
}


# ------------------------------------------------------------------------------------ job file
# ------------------------------------------------------------------------------------ checks
def check_row(decoder: Decoder, row: dict[str, Any], steps: int | None, detail_scale: float | None) -> StreamInfo:
    """Validate an archived row's stream before decoding; raises RejectedStream with the reason.

    Order matters for a useful reason: a payload damaged in storage is a ``crc_mismatch`` (the
    archive's own CRC column disagrees) even though its header would also fail to parse.
    """
    bitstream = row.get("bitstream")
    if bitstream is None:
        raise RejectedStream("missing_bitstream", "status is ok but the bitstream column is null")
    expected = row.get("bitstream_crc32")
    if expected is not None:
        actual = zlib.crc32(bitstream)
        if actual != expected:
            raise RejectedStream("crc_mismatch", f"crc32 of the stored bitstream is 0x{actual:08x}, the archive "
                                                 f"row says 0x{expected:08x} ({len(bitstream)} bytes)")
    row_fp, own_fp = row.get("codec_fingerprint"), decoder.fingerprint.hex()
    if row_fp and row_fp != own_fp:
        raise RejectedStream("foreign_model", f"row written by codec {row_fp}, this decoder is {own_fp}")
    info = decoder.inspect(bitstream, steps, detail_scale)
    width, height = row.get("width"), row.get("height")
    if (width, height) != (None, None) and (width, height) != (info.width, info.height):
        raise RejectedStream("corrupt_bitstream", f"header says {info.width}x{info.height}, the archive row "
                                                  f"says {width}x{height}")
    return info


def decode_streams(decoder: Decoder, streams: Sequence[bytes], infos: Sequence[StreamInfo], steps: int | None,
                   detail_scale: float | None) -> list[np.ndarray | RejectedStream]:
    """Decode one bucket's streams as a batch; if it fails for a stream-specific reason, one by one.

    Only :class:`StreamDecodeError` condemns streams; any other error (device lost, a bug) fails
    the shard attempt, which the executor retries, rather than marking every key failed.
    """
    try:
        images: list[np.ndarray | RejectedStream] = list(decoder.decode(list(streams), steps, detail_scale))
    except StreamDecodeError as exc:
        if len(streams) == 1:
            return [RejectedStream("decode_error", str(exc))]
        images = []
        for s in streams:
            try:
                images.append(decoder.decode([s], steps, detail_scale)[0])
            except StreamDecodeError as one:
                images.append(RejectedStream("decode_error", str(one)))
    if len(images) != len(streams):
        raise RuntimeError(f"decoder returned {len(images)} images for {len(streams)} streams")
    for image, info in zip(images, infos):
        if isinstance(image, np.ndarray) and (image.shape != (info.height, info.width, 3) or image.dtype != np.uint8):
            raise RuntimeError(f"decoder returned {image.dtype} {image.shape} for a {info.width}x{info.height} "
                               "stream; expected uint8 H x W x 3")
    return images


def png_bytes(image: np.ndarray, compress_level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def safe_sample_path(sample_key: str) -> str | None:
    """The sample key as a relative path if it is safe to write (no '..', absolute or empty parts)."""
    parts = sample_key.split("/")
    if sample_key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in sample_key:
        return None
    return sample_key


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class RestoreConfig:
    """Knobs of one restore run; the same for every shard (picklable)."""

    format: str = "wds"
    steps: int | None = None
    detail_scale: float | None = None
    batch_size: int = DEFAULT_DECODE_BATCH
    png_compress_level: int = 6
    storage_options: dict[str, Any] = field(default_factory=dict)
    expected_fingerprint: str | None = None
    max_failed_keys: int = 1000
    spool_memory_bytes: int = SPOOL_MEMORY_BYTES
    max_pending_pixels: int = DEFAULT_MAX_PENDING_PIXELS

    def __post_init__(self) -> None:
        if not isinstance(self.max_pending_pixels, int) or self.max_pending_pixels < 1:
            raise ValueError(f"max_pending_pixels must be a positive integer, got {self.max_pending_pixels!r}")
        if self.format not in FORMATS:
            raise ValueError(f"restore format must be one of {FORMATS}, got {self.format!r}")
        if self.steps is not None and not (isinstance(self.steps, int) and 0 <= self.steps <= 255):
            raise ValueError(f"steps must be an integer in [0, 255] (or None for each header's), got {self.steps!r}")
        if self.detail_scale is not None and not np.isfinite(self.detail_scale):
            raise ValueError(f"detail_scale must be a finite number, got {self.detail_scale!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be in 0..9, got {self.png_compress_level}")


@dataclass
class RestoreRecord(Row):
    """One row of ``keys/<shard>.parquet``; :data:`KEYS_SCHEMA` is derived from these fields."""

    reasons = RESTORE_REASONS
    tail_after = "src_index"

    key: str = required(pa.string())
    src_index: int = required(pa.int32())
    # status, reason, error (Row)
    width: int | None = column(pa.int32())
    height: int | None = column(pa.int32())
    steps: int | None = column(pa.int16())
    detail_scale: float | None = column(pa.float32())
    output: str | None = column(pa.string())
    png_bytes: int | None = column(pa.int64())
    png_sha256: bytes | None = column(pa.binary(32))
    pixels_sha256: bytes | None = column(pa.binary(32))


KEYS_SCHEMA = RestoreRecord.arrow_schema()


def keys_table(records: Sequence[RestoreRecord], metadata: dict[str, str]) -> pa.Table:
    return rows_table(records, KEYS_SCHEMA, metadata)


# ------------------------------------------------------------------------------------ sinks
class _WdsSink:
    """PNGs spooled as they come (memory up to ``spool_memory_bytes``, then a temp file); at the end one
    tar in source order (``src_index``), streamed into an atomic write of ``shards/<shard>.tar``."""

    def __init__(self, out: OutputLocation, shard_id: str, spool_memory_bytes: int) -> None:
        self.out, self.shard_id = out, shard_id
        self.path = out.path("shards", f"{shard_id}.tar")
        self.spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=spool_memory_bytes)
        self.index: dict[str, tuple[int, int, int]] = {}  # member -> (src_index, offset, length)
        self.bytes_written = 0
        self.sha256 = ""

    def member(self, sample_path: str) -> str:
        return f"{sample_path}.png"

    def add(self, member: str, src_index: int, data: bytes) -> None:
        offset = self.spool.seek(0, io.SEEK_END)
        self.spool.write(data)
        self.index[member] = (src_index, offset, len(data))

    def finish(self) -> str:
        digest = hashlib.sha256()
        counter = _Counting(digest)
        with storage.open_atomic(self.out.fs, self.path) as raw:
            counter.raw = raw
            with tarfile.open(fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
                for name, (_, offset, length) in sorted(self.index.items(), key=lambda kv: (kv[1][0], kv[0])):
                    self.spool.seek(offset)
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = length, 0, 0o644
                    tf.addfile(info, io.BytesIO(self.spool.read(length)))
        self.spool.close()
        self.bytes_written, self.sha256 = counter.n, digest.hexdigest()
        return self.out.to_url(self.path)

    def discard(self) -> None:
        self.spool.close()


class _Counting:
    """Write-through wrapper that counts and hashes what goes into the tar object."""

    def __init__(self, digest: Any) -> None:
        self.raw: IO[bytes] | None = None
        self.digest, self.n = digest, 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.n += len(data)
        self.raw.write(data)  # type: ignore[union-attr]
        return len(data)

    def flush(self) -> None:
        pass


class _FolderSink:
    """``images/<shard>/<sample key>.png``, each file written atomically when its image is decoded."""

    def __init__(self, out: OutputLocation, shard_id: str) -> None:
        self.out, self.shard_id = out, shard_id
        self.root = out.path("images", shard_id)
        self.bytes_written = 0
        self.sha256 = ""

    def member(self, sample_path: str) -> str:
        return f"{self.shard_id}/{sample_path}.png"

    def add(self, member: str, src_index: int, data: bytes) -> None:
        storage.write_bytes_atomic(self.out.fs, self.out.path("images", member), data)
        self.bytes_written += len(data)

    def finish(self) -> str:
        return self.out.to_url(self.root)

    def discard(self) -> None:
        pass


# ------------------------------------------------------------------------------------ the unit
def restore_shard(shard: ShardRef, decoder: Decoder, out: OutputLocation, config: RestoreConfig, *,
                  attempt: int = 1, worker: str = "", progress: ProgressFn | None = None) -> ShardStats:
    """Decode every archived row of ``shard`` (its ``url`` is the archive Parquet file); see the module doc."""
    fingerprint = check_fingerprint(decoder, config.expected_fingerprint, worker, "the archive was written by")
    started, t0 = utc_now(), time.perf_counter()
    rows = read_rows(shard.url, config.storage_options, DECODE_COLUMNS)
    read_s = time.perf_counter() - t0
    archived = [r for r in rows if r["status"] == STATUS_OK]
    sink: _WdsSink | _FolderSink = (_WdsSink(out, shard.shard_id, config.spool_memory_bytes)
                                    if config.format == "wds" else _FolderSink(out, shard.shard_id))
    records: list[RestoreRecord] = []
    buckets: SizeBuckets[tuple[RestoreRecord, bytes, StreamInfo]] = SizeBuckets(config.batch_size,
                                                                                config.max_pending_pixels)
    timing: defaultdict[str, float] = defaultdict(float)
    done = 0

    def run(batch: list[tuple[RestoreRecord, bytes, StreamInfo]]) -> None:
        nonlocal done
        t = time.perf_counter()
        images = decode_streams(decoder, [b for _, b, _ in batch], [i for _, _, i in batch],
                                config.steps, config.detail_scale)
        timing["decode"] += time.perf_counter() - t
        for (record, _, _), image in zip(batch, images):
            if isinstance(image, RejectedStream):
                record.fail(image.reason, image.message)
                continue
            t = time.perf_counter()
            data = png_bytes(image, config.png_compress_level)
            timing["png"] += time.perf_counter() - t
            t = time.perf_counter()
            sink.add(record.output, record.src_index, data)  # type: ignore[arg-type]
            timing["write"] += time.perf_counter() - t
            record.status, record.png_bytes = STATUS_OK, len(data)
            record.png_sha256 = hashlib.sha256(data).digest()
            record.pixels_sha256 = hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()
        done += len(batch)
        if progress is not None:
            progress(done)

    try:
        for row in archived:
            record = RestoreRecord(key=row["key"], src_index=row["src_index"], width=row["width"], height=row["height"])
            records.append(record)
            sample_path = safe_sample_path(row["key"].partition("/")[2])
            if sample_path is None:
                record.fail("unsafe_key", f"sample key {row['key'].partition('/')[2]!r} is not a safe relative path")
                continue
            record.output = sink.member(sample_path)
            try:
                info = check_row(decoder, row, config.steps, config.detail_scale)
            except RejectedStream as exc:
                record.output = None
                record.fail(exc.reason, exc.message)
                continue
            record.steps, record.detail_scale = info.steps, info.detail_scale
            for batch in buckets.add(info.bucket, (record, row["bitstream"], info), info.width * info.height):
                run(batch)
        for batch in buckets.flush():
            run(batch)
        for record in records:
            if record.status != STATUS_OK:
                record.output = None
        t = time.perf_counter()
        output_url = sink.finish()
        timing["write"] += time.perf_counter() - t
    except BaseException:
        sink.discard()
        raise

    ok = [r for r in records if r.status == STATUS_OK]
    t = time.perf_counter()
    metadata = {"rdeic.restore.shard": json.dumps({"shard_id": shard.shard_id, "archive": shard.url}),
                "rdeic.restore.format": config.format, "rdeic.codec.fingerprint": fingerprint,
                "rdeic.device": decoder.device, "rdeic.created_at": utc_now()}
    keys_data = to_parquet_bytes(keys_table(records, metadata))
    keys_path = out.path(KEYS_DIR, f"{shard.shard_id}.parquet")
    storage.write_bytes_atomic(out.fs, keys_path, keys_data)
    timing["write"] += time.perf_counter() - t
    total = time.perf_counter() - t0
    by_key = {r["key"]: r for r in archived}
    stats = ShardStats.from_rows(
        shard, records, max_failed_keys=config.max_failed_keys, archive=output_url, codec_fingerprint=fingerprint,
        bitstream_bytes=sum(len(by_key[r.key]["bitstream"] or b"") for r in ok),
        mean_bpp=round(float(np.mean([by_key[r.key]["bpp"] for r in ok])), 6) if ok else None,
        parquet_bytes=len(keys_data), parquet_sha256=hashlib.sha256(keys_data).hexdigest(),
        attempt=attempt, worker=worker, device=decoder.device, started_at=started, finished_at=utc_now(),
        seconds={"total": round(total, 3), "read": round(read_s, 3),
                 **{k: round(v, 3) for k, v in sorted(timing.items())}},
        images_per_s=round(len(ok) / total, 3) if total > 0 else 0.0,
        extra={"format": config.format, "not_archived": len(rows) - len(archived),
               "output_bytes": sink.bytes_written, "output_sha256": sink.sha256 or None,
               "keys": out.to_url(keys_path), "steps": config.steps, "detail_scale": config.detail_scale,
               "decoded_images_per_s": round(len(ok) / timing["decode"], 3) if timing["decode"] > 0 else None},
    )
    Manifest(out).mark_done(stats)
    return stats


def restore_settings(archive_url: str, fingerprint: str, config: RestoreConfig) -> dict[str, Any]:
    """What must stay the same across runs into one restore output (the settings restore.json guards)."""
    return {"archive": archive_url, "codec_fingerprint": fingerprint, "format": config.format,
            "steps": config.steps, "detail_scale": config.detail_scale}


def config_dict(config: RestoreConfig) -> dict[str, Any]:
    out = asdict(config)
    out["storage_options"] = storage.redact(config.storage_options)
    return out
