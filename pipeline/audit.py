"""``audit_shard``: decode (a sample of) one archive shard and measure it against its source images.

Run by the same executors as archive and restore (``ShardPlan(work=audit_shard)``), with the
same done markers, so an audit resumes shard by shard. Per shard:

    archive/<shard>.parquet -> sampled ok rows -> stream checks (CRC, structure, model)
    source tar (streamed) --by key--> original pixels (same colour rule + EXIF as the archive)
        -> size buckets of (stream, original) -> batched decode -> metrics per pair
    metrics/<shard>.parquet    one row per audited key: bpp, PSNR, MS-SSIM, LPIPS, DISTS, or why it failed
    features/<shard>.npz       FID Inception features of the patches (when the weights exist)
    crops/<shard>.parquet      the shard's worst-K pairs (lowest PSNR) as PNG crops for the report
    _manifest/done/<shard>.json

The sample is a pure function of (key, fraction, seed), so reruns and other executors pick the
same keys. :func:`aggregate` turns the per-shard files into ``summary.json`` (and the report).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from perceptual import DEFAULT_FID_PATCH, PERCEPTUAL_METRICS, PerceptualMetrics

from . import storage
from .archives import DECODE_COLUMNS, read_rows
from .decoder import DECODE_REASONS, Decoder, RejectedStream, SizeBuckets, StreamInfo
from .executors.errors import FatalShardError, check_fingerprint
from .images import DEFAULT_MAX_PIXELS, SampleFailure, decode_image, image_extension
from .manifest import Manifest, OutputLocation, utc_now
from .metrics import ms_ssim, mse, psnr
from .reader import DEFAULT_MAX_MEMBER_BYTES, ShardReader
from .restore import check_row, decode_streams, png_bytes
from .rows import Row, column, required, rows_table
from .types import STATUS_OK, ShardRef, ShardStats
from .writer import to_parquet_bytes

ProgressFn = Callable[[int], None]
DEFAULT_WORST_K = 8
DEFAULT_CROP = 256
DEFAULT_MAX_PENDING_PIXELS = 64 * 1024 * 1024
METRICS_DIR, FEATURES_DIR, CROPS_DIR = "metrics", "features", "crops"

AUDIT_REASONS: dict[str, str] = DECODE_REASONS | {
    "source_missing": "the key is not in its source shard (or the source shard is damaged before it)",
    "source_changed": "the source image differs from the one archived (sha256 or size)",
    "source_unreadable": "the source image can no longer be read or decoded",
}

CROPS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("psnr", pa.float64()),
    pa.field("bpp", pa.float64()),
    pa.field("x", pa.int32()),
    pa.field("y", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
    pa.field("original_png", pa.large_binary()),
    pa.field("decoded_png", pa.large_binary()),
])


def sampled(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether ``key`` is in the audit sample: a hash of (seed, key) below ``fraction``."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


# ------------------------------------------------------------------------------------ config + model
@dataclass(frozen=True)
class AuditConfig:
    """Knobs of one audit run; the same for every shard (picklable). ``sources``: shard id -> source URL."""

    sources: dict[str, str] = field(default_factory=dict)
    fraction: float = 1.0
    seed: int = 0
    steps: int | None = None
    detail_scale: float | None = None
    batch_size: int = 8
    max_pending_pixels: int = DEFAULT_MAX_PENDING_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    worst_k: int = DEFAULT_WORST_K
    crop: int = DEFAULT_CROP
    storage_options: dict[str, Any] = field(default_factory=dict)
    expected_fingerprint: str | None = None
    max_failed_keys: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        for name in ("batch_size", "max_pending_pixels", "max_pixels", "max_member_bytes", "crop"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.worst_k, int) or self.worst_k < 0:
            raise ValueError(f"worst_k must be an integer >= 0, got {self.worst_k!r}")
        if self.steps is not None and not (isinstance(self.steps, int) and 0 <= self.steps <= 255):
            raise ValueError(f"steps must be an integer in [0, 255] (or None for each header's), got {self.steps!r}")


class Auditor:
    """What an audit worker loads once: the decoder plus the perceptual nets whose weights exist."""

    def __init__(self, decoder: Decoder, perceptual: PerceptualMetrics) -> None:
        self.decoder, self.perceptual = decoder, perceptual
        self.fingerprint, self.device = decoder.fingerprint, decoder.device


@dataclass(frozen=True)
class AuditorFactory:
    """Picklable recipe: a decoder factory plus which perceptual metrics to try (and the FID patch size)."""

    decoder_factory: Any
    metrics: tuple[str, ...] = PERCEPTUAL_METRICS
    fid_patch: int = DEFAULT_FID_PATCH

    def identity(self) -> Any:
        return self.decoder_factory.identity()

    def load(self, device: str = "auto") -> Auditor:
        decoder = self.decoder_factory.load(device)  # the perceptual networks go where the decoder went
        return Auditor(decoder, PerceptualMetrics.load(decoder.placement, self.fid_patch, self.metrics))


# ------------------------------------------------------------------------------------ per-key state
@dataclass
class AuditRecord(Row):
    """One row of ``metrics/<shard>.parquet``; :data:`METRICS_SCHEMA` is derived from these fields."""

    reasons = AUDIT_REASONS
    tail_after = "src_index"

    key: str = required(pa.string())
    shard: str = required(pa.string())
    src_index: int = required(pa.int32())
    # status, reason, error (Row)
    width: int | None = column(pa.int32())
    height: int | None = column(pa.int32())
    bpp: float | None = column(pa.float64())
    bitstream_bytes: int | None = column(pa.int64())
    steps: int | None = column(pa.int16())
    detail_scale: float | None = column(pa.float32())
    mse: float | None = column(pa.float64())
    psnr: float | None = column(pa.float64())
    ms_ssim: float | None = column(pa.float64())
    ms_ssim_win: int | None = column(pa.int8())
    lpips: float | None = column(pa.float64())
    dists: float | None = column(pa.float64())
    fid_patches: int | None = column(pa.int32())


METRICS_SCHEMA = AuditRecord.arrow_schema()


@dataclass
class _Pending:
    record: AuditRecord
    bitstream: bytes
    info: StreamInfo
    sha256: bytes | None
    original: np.ndarray | None = None


def worst_window(a: np.ndarray, b: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the size x size window (clipped to the image) with the largest squared error."""
    h, w = a.shape[:2]
    ch, cw = min(size, h), min(size, w)
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).sum(axis=2)
    ii = np.pad(err.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = ii[ch:, cw:] - ii[:-ch, cw:] - ii[ch:, :-cw] + ii[:-ch, :-cw]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x), int(y), cw, ch


class _WorstK:
    """The K pairs with the lowest PSNR seen so far, kept as crops (never whole images)."""

    def __init__(self, k: int, crop: int) -> None:
        self.k, self.crop = k, crop
        self._heap: list[tuple[float, str, dict[str, Any]]] = []  # max-heap on PSNR via negation

    def offer(self, record: AuditRecord, original: np.ndarray, decoded: np.ndarray) -> None:
        if self.k == 0 or record.psnr is None:
            return
        score = record.psnr if math.isfinite(record.psnr) else 1e9
        if len(self._heap) >= self.k and -self._heap[0][0] <= score:
            return
        x, y, w, h = worst_window(original, decoded, self.crop)
        entry = {"key": record.key, "psnr": record.psnr, "bpp": record.bpp, "x": x, "y": y, "width": w, "height": h,
                 "image_width": record.width, "image_height": record.height,
                 "original_png": png_bytes(original[y:y + h, x:x + w], 6),
                 "decoded_png": png_bytes(decoded[y:y + h, x:x + w], 6)}
        item = (-score, record.key, entry)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
        else:
            heapq.heapreplace(self._heap, item)

    def entries(self) -> list[dict[str, Any]]:
        return [e for _, _, e in sorted(self._heap, key=lambda t: (-t[0], t[1]))]


def _table(rows: Sequence[dict[str, Any]], schema: pa.Schema, metadata: dict[str, str] | None = None) -> pa.Table:
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.table(columns, schema=schema.with_metadata(metadata or {}))


def _features_bytes(original: list[np.ndarray], decoded: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    cat = (lambda xs: np.concatenate(xs).astype(np.float32) if xs else np.zeros((0, 2048), np.float32))  # noqa: E731
    np.savez(buf, original=cat(original), decoded=cat(decoded))
    return buf.getvalue()


# ------------------------------------------------------------------------------------ the unit
def audit_shard(shard: ShardRef, auditor: Auditor, out: OutputLocation, config: AuditConfig, *,
                attempt: int = 1, worker: str = "", progress: ProgressFn | None = None) -> ShardStats:
    """Audit one archive shard (``shard.url`` = its Parquet file) against ``config.sources[shard_id]``."""
    decoder, perceptual = auditor.decoder, auditor.perceptual
    fingerprint = check_fingerprint(decoder, config.expected_fingerprint, worker, "the archive was written by")
    source_url = config.sources.get(shard.shard_id)
    if source_url is None:
        raise FatalShardError(f"no source shard for {shard.shard_id!r} (the job plans only shards it has sources for)")
    started, t0 = utc_now(), time.perf_counter()
    timing: defaultdict[str, float] = defaultdict(float)
    rows = read_rows(shard.url, config.storage_options, [*DECODE_COLUMNS, "src_sha256"])
    archived = [r for r in rows if r["status"] == STATUS_OK]
    chosen = [r for r in archived if sampled(r["key"], config.fraction, config.seed)]
    records: list[AuditRecord] = []
    waiting: dict[str, _Pending] = {}
    for row in chosen:
        record = AuditRecord(key=row["key"], shard=shard.shard_id, src_index=row["src_index"], width=row["width"],
                             height=row["height"], bpp=row["bpp"],
                             bitstream_bytes=len(row["bitstream"]) if row["bitstream"] is not None else None)
        records.append(record)
        try:
            info = check_row(decoder, row, config.steps, config.detail_scale)
        except RejectedStream as exc:
            record.fail(exc.reason, exc.message)
            continue
        record.steps, record.detail_scale = info.steps, info.detail_scale
        waiting[row["key"]] = _Pending(record, row["bitstream"], info, row.get("src_sha256"))

    worst = _WorstK(config.worst_k, config.crop)
    feats_a: list[np.ndarray] = []
    feats_b: list[np.ndarray] = []
    buckets: SizeBuckets[_Pending] = SizeBuckets(config.batch_size, config.max_pending_pixels)
    done = 0

    def run(batch: list[_Pending]) -> None:
        nonlocal done
        t = time.perf_counter()
        images = decode_streams(decoder, [p.bitstream for p in batch], [p.info for p in batch], config.steps,
                                config.detail_scale)
        timing["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        for p, image in zip(batch, images):
            if isinstance(image, RejectedStream):
                p.record.fail(image.reason, image.message)
                continue
            _measure(p.record, p.original, image, perceptual, feats_a, feats_b)  # type: ignore[arg-type]
            worst.offer(p.record, p.original, image)  # type: ignore[arg-type]
            p.original = None
        timing["metrics"] += time.perf_counter() - t
        done += len(batch)
        if progress is not None:
            progress(done)

    reader = ShardReader(source_url, config.storage_options, config.max_member_bytes)
    samples = iter(reader)
    seen: set[str] = set()
    try:
        while waiting:  # stop reading the source once every sampled key has been found
            t = time.perf_counter()
            sample = next(samples, None)
            if sample is None:
                break
            key = f"{shard.shard_id}/{sample.key}"
            pending = None if key in seen else waiting.pop(key, None)
            seen.add(key)  # a repeated sample key: only its first occurrence can be an archived key
            original = _source_pixels(pending, sample, config.max_pixels) if pending is not None else None
            timing["read_source"] += time.perf_counter() - t
            if original is None or pending is None:
                continue
            pending.original = original
            for batch in buckets.add(pending.info.bucket, pending, original.shape[0] * original.shape[1]):
                run(batch)
    finally:
        samples.close()  # type: ignore[attr-defined]
    for batch in buckets.flush():
        run(batch)
    why = f"; the source shard is damaged: {reader.damage.message}" if reader.damage else ""
    for pending in waiting.values():
        sample_key = pending.record.key.partition("/")[2]
        pending.record.fail("source_missing", f"no sample {sample_key!r} in {source_url}{why}")

    t = time.perf_counter()
    meta = {"rdeic.audit.shard": json.dumps({"shard_id": shard.shard_id, "archive": shard.url, "source": source_url}),
            "rdeic.codec.fingerprint": fingerprint, "rdeic.device": decoder.device, "rdeic.created_at": utc_now()}
    records.sort(key=lambda r: r.key)
    metrics_data = to_parquet_bytes(rows_table(records, METRICS_SCHEMA, meta, sort_key=None))
    storage.write_bytes_atomic(out.fs, out.path(METRICS_DIR, f"{shard.shard_id}.parquet"), metrics_data)
    storage.write_bytes_atomic(out.fs, out.path(CROPS_DIR, f"{shard.shard_id}.parquet"),
                               to_parquet_bytes(_table(worst.entries(), CROPS_SCHEMA, meta)))
    if perceptual.inception is not None:
        storage.write_bytes_atomic(out.fs, out.path(FEATURES_DIR, f"{shard.shard_id}.npz"),
                                   _features_bytes(feats_a, feats_b))
    timing["write"] += time.perf_counter() - t
    total = time.perf_counter() - t0
    stats = _stats(shard, records, out, fingerprint, config, source_url, len(rows) - len(archived),
                   len(archived), perceptual)
    stats.parquet_bytes, stats.parquet_sha256 = len(metrics_data), hashlib.sha256(metrics_data).hexdigest()
    stats.damage = reader.damage.to_dict() if reader.damage else None
    stats.shard_bytes_read = reader.bytes_read
    stats.attempt, stats.worker, stats.device = attempt, worker, decoder.device
    stats.started_at, stats.finished_at = started, utc_now()
    stats.seconds = {"total": round(total, 3), **{k: round(v, 3) for k, v in sorted(timing.items())}}
    stats.images_per_s = round(stats.ok / total, 3) if total > 0 else 0.0
    Manifest(out).mark_done(stats)
    return stats


def _source_pixels(pending: _Pending, sample: Any, max_pixels: int) -> np.ndarray | None:
    """The source image of a pending key, checked against what was archived (else the record fails)."""
    record = pending.record
    member = next((m for m in sample.members if image_extension(m.ext)), None)
    if member is None or member.data is None:
        detail = "no readable image member" if member is None else f"{member.name}: {member.problem}"
        record.fail("source_unreadable", f"{detail} in the source sample")
        return None
    if pending.sha256 is not None and hashlib.sha256(member.data).digest() != pending.sha256:
        record.fail("source_changed", f"{member.name}: sha256 differs from the archived source")
        return None
    try:
        pixels = decode_image(member.data, max_pixels=max_pixels).pixels
    except SampleFailure as exc:
        record.fail("source_unreadable", f"{member.name}: {exc.reason}: {exc.message}")
        return None
    if (pixels.shape[1], pixels.shape[0]) != (record.width, record.height):
        record.fail("source_changed", f"{member.name} is {pixels.shape[1]}x{pixels.shape[0]}, archived "
                                      f"{record.width}x{record.height}")
        return None
    return pixels


def _measure(record: AuditRecord, original: np.ndarray, decoded: np.ndarray, perceptual: PerceptualMetrics,
             feats_a: list[np.ndarray], feats_b: list[np.ndarray]) -> None:
    record.mse = mse(original, decoded)
    record.psnr = psnr(original, decoded)
    record.ms_ssim, record.ms_ssim_win = ms_ssim(original, decoded)
    record.lpips = perceptual.lpips(original, decoded)
    record.dists = perceptual.dists(original, decoded)
    feats = perceptual.fid_features(original, decoded)
    if feats is not None:
        feats_a.append(feats[0])
        feats_b.append(feats[1])
        record.fid_patches = int(len(feats[0]))
    record.status = STATUS_OK


def _stats(shard: ShardRef, records: list[AuditRecord], out: OutputLocation, fingerprint: str, config: AuditConfig,
           source_url: str, not_archived: int, archived: int, perceptual: PerceptualMetrics) -> ShardStats:
    ok = [r for r in records if r.status == STATUS_OK]

    def mean(name: str) -> float | None:
        values = [getattr(r, name) for r in ok if getattr(r, name) is not None and math.isfinite(getattr(r, name))]
        return round(float(np.mean(values)), 6) if values else None

    return ShardStats.from_rows(
        shard, records, max_failed_keys=config.max_failed_keys,
        archive=out.to_url(out.path(METRICS_DIR, f"{shard.shard_id}.parquet")), codec_fingerprint=fingerprint,
        bitstream_bytes=sum(r.bitstream_bytes or 0 for r in ok), mean_bpp=mean("bpp"),
        extra={"source": source_url, "archived": archived, "not_archived": not_archived, "audited": len(records),
               "means": {m: mean(m) for m in ("psnr", "ms_ssim", "lpips", "dists")},
               "metrics_unavailable": perceptual.unavailable()},
    )


# ------------------------------------------------------------------------------------ aggregate
def read_tables(out: OutputLocation, shard_ids: Sequence[str], directory: str) -> pa.Table | None:
    """Concatenate ``<directory>/<shard>.parquet`` of the given shards (None when there are none)."""
    tables = []
    for shard_id in shard_ids:
        path = out.path(directory, f"{shard_id}.parquet")
        try:
            with out.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f).replace_schema_metadata(None))
        except FileNotFoundError:
            continue
    return pa.concat_tables(tables) if tables else None


def read_features(out: OutputLocation, shard_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    a, b = [], []
    for shard_id in shard_ids:
        path = out.path(FEATURES_DIR, f"{shard_id}.npz")
        try:
            data = np.load(io.BytesIO(storage.read_bytes(out.fs, path)))
        except FileNotFoundError:
            continue
        a.append(data["original"])
        b.append(data["decoded"])
    if not a:
        return None
    return np.concatenate(a), np.concatenate(b)


def describe(values: Sequence[float | None]) -> dict[str, Any]:
    """n, mean, median, std, min, max of the finite values (non-finite ones are counted apart)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    infinite = sum(1 for v in values if v is not None and not math.isfinite(v))
    if not finite:
        return {"n": 0, "non_finite": infinite, "mean": None, "median": None, "std": None, "min": None, "max": None}
    arr = np.asarray(finite)
    return {"n": len(finite), "non_finite": infinite, "mean": float(arr.mean()), "median": float(np.median(arr)),
            "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}


def _finite_or_none(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (inf PSNR is reported as a count instead)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def fid_summary(features: tuple[np.ndarray, np.ndarray] | None, patch: int, unavailable: bool,
                requested: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
                seed: int = 0) -> dict[str, Any]:
    """FID and KID over every audited patch pair (null with a note when they cannot be computed)."""
    from .metrics import frechet_distance, kernel_inception_distance

    out: dict[str, Any] = {"fid": None, "kid_mean": None, "kid_std": None, "patches": 0, "patch_size": patch,
                           "note": None}
    if not requested or unavailable or features is None:
        out["note"] = ("not requested (--perceptual)" if not requested else
                       "FID Inception weights not found" if unavailable else "no features were computed")
        return out
    a, b = features
    out["patches"] = int(len(a))
    if len(a) < 2:
        out["note"] = f"needs at least 2 patches of {patch} px; images smaller than the patch give none"
        return out
    out["fid"] = frechet_distance(a, b)
    out["kid_mean"], out["kid_std"] = kernel_inception_distance(a, b, kid_subsets, kid_subset_size, seed)
    if len(a) < FID_FEATURES_MIN_RELIABLE:
        out["note"] = (f"only {len(a)} patch pairs: FID is biased upwards below a few thousand samples; compare "
                       "FID only between audits with similar counts (KID is unbiased)")
    return out


FID_FEATURES_MIN_RELIABLE = 2048


def summarize(out: OutputLocation, stats: Sequence[ShardStats], header: dict[str, Any],
              driver_unavailable: dict[str, list[str]], fid_patch: int, worst_k: int
              ) -> tuple[dict[str, Any], dict[str, list[Any]], list[dict[str, Any]]]:
    """(summary, metric columns, worst-K crops) over the done shards ``stats`` of an audit output."""
    ids = sorted(s.shard_id for s in stats)
    table = read_tables(out, ids, METRICS_DIR)
    rows = table.to_pylist() if table is not None else []
    ok = [r for r in rows if r["status"] == STATUS_OK]
    columns = {m: [r[m] for r in ok] for m in ("bpp", "psnr", "ms_ssim", "lpips", "dists", "mse")}
    unavailable: dict[str, list[str]] = {}
    for s in stats:
        for metric, files in (s.extra.get("metrics_unavailable") or {}).items():
            unavailable.setdefault(metric, list(dict.fromkeys(files)))
    if not stats:
        unavailable = dict(driver_unavailable)
    failed = sorted((r for r in rows if r["status"] != STATUS_OK), key=lambda r: r["key"])
    mses = [m for m in columns["mse"] if m is not None]
    windows = Counter("none" if r["ms_ssim_win"] is None else str(r["ms_ssim_win"]) for r in ok)
    crops_table = read_tables(out, ids, CROPS_DIR)
    crops = crops_table.to_pylist() if crops_table is not None else []
    crops.sort(key=lambda c: (c["psnr"] if c["psnr"] is not None and math.isfinite(c["psnr"]) else 1e9, c["key"]))
    crops = crops[:worst_k]
    by_shard = {s.shard_id: s for s in stats}
    shard_rows = []
    for shard_id in ids:
        s = by_shard[shard_id]
        means = s.extra.get("means", {})
        shard_rows.append({"shard_id": shard_id, "audited": s.rows, "ok": s.ok, "failed": s.failed, "bpp": s.mean_bpp,
                           "psnr": means.get("psnr"), "ms_ssim": means.get("ms_ssim"), "lpips": means.get("lpips"),
                           "dists": means.get("dists"), "damage": s.damage,
                           "failed_by_reason": s.failed_by_reason})
    summary = {
        **header,
        "generated_at": utc_now(),
        "images": {
            "audited": len(rows), "ok": len(ok), "failed": len(failed),
            "failed_by_reason": dict(sorted(Counter(r["reason"] for r in failed).items())),
            "archived": sum(int(s.extra.get("archived", 0)) for s in stats),
            "not_archived": sum(int(s.extra.get("not_archived", 0)) for s in stats),
        },
        "failed_keys": [r["key"] for r in failed[:1000]],
        "failed_keys_truncated": len(failed) > 1000,
        "failures": [{"key": r["key"], "reason": r["reason"], "error": r["error"]} for r in failed[:1000]],
        "metrics": {m: describe(columns[m]) for m in ("bpp", "psnr", "ms_ssim", "lpips", "dists")},
        "psnr_of_mean_mse": (10 * math.log10(255.0**2 / float(np.mean(mses))) if mses and np.mean(mses) > 0 else None),
        "ms_ssim_windows": dict(sorted(windows.items())),
        "metrics_unavailable": unavailable,
        "fid": fid_summary(read_features(out, ids), fid_patch, "fid" in unavailable,
                           requested="fid" in header.get("perceptual_requested", PERCEPTUAL_METRICS)),
        "shards": shard_rows,
        "worst": [{k: c[k] for k in ("key", "psnr", "bpp", "x", "y", "width", "height")} for c in crops],
    }
    return _finite_or_none(summary), columns, crops
