"""``process_shard``: the unit of work. One input shard in, one Parquet archive + done marker out.

A plain function, called the same way by the local executor, by a Ray actor and by tests. It
owns the shard end to end:

    reader thread:  tar stream -> samples -> decode (images.py) -> batches   (bounded queue)
    calling thread: batches -> encoder.encode -> records
    then:           sort by key -> Parquet bytes -> archive/<shard>.parquet -> _manifest/done/<shard>.json

Decoding runs in its own thread so it overlaps model compute; the queue between them holds at
most ``prefetch_batches`` batches, which bounds memory. Nothing is written before the shard is
complete, and the marker is written last, so an interrupted attempt leaves nothing that counts
as done and a retry simply overwrites it.

Every sample ends as exactly one record: archived, or ``status='failed'`` with a reason. Only
errors that say nothing about one sample (storage failures, a broken device) escape as
exceptions, making the whole shard fail and be retried by the executor.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_PIXELS, Batch, Batcher, PendingImage
from .encoder import Encoder
from .executors.errors import check_fingerprint
from .failures import is_out_of_memory
from .images import DEFAULT_MAX_PIXELS, SampleFailure, decode_image, image_extension
from .manifest import Manifest, OutputLocation, utc_now
from .reader import DEFAULT_MAX_MEMBER_BYTES, ShardReader
from .types import STATUS_OK, Member, Record, Sample, ShardRef, ShardStats
from .writer import DEFAULT_ROW_GROUP_SIZE, build_table, to_parquet_bytes

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class ShardConfig:
    """Knobs of one shard's processing; the same for every shard of a run (picklable)."""

    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    prefetch_batches: int = 2
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    storage_options: dict[str, Any] = field(default_factory=dict)
    expected_fingerprint: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    max_failed_keys: int = 1000

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_batch_pixels", "max_pixels", "max_member_bytes",
                     "prefetch_batches", "row_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------- samples
def _pick_image_member(sample: Sample) -> Member | None:
    """The sample's first member with an image extension (None if it has none)."""
    return next((m for m in sample.members if image_extension(m.ext)), None)


def prepare_sample(sample: Sample, record: Record, max_pixels: int) -> PendingImage | None:
    """Fill ``record`` from the sample; return the image to encode, or None if the record failed."""
    member = _pick_image_member(sample)
    if member is None:
        names = [m.name for m in sample.members]
        record.src_member = names[0] if names else None
        if sample.damage:
            record.fail("shard_damaged", sample.damage)
        else:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} members)" if len(names) > 5 else "")
            record.fail("no_image", f"no image member among: {shown}")
        return None
    record.src_member, record.src_bytes = member.name, member.size
    if member.data is not None:
        record.src_sha256 = hashlib.sha256(member.data).digest()
    if sample.damage:
        record.fail("shard_damaged", sample.damage)
        return None
    if member.problem is not None:
        detail = "not a regular file" if member.problem == "unsupported_member" else f"{member.size} bytes"
        record.fail(member.problem, f"{member.name}: {detail}")
        return None
    try:
        image = decode_image(member.data or b"", max_pixels=max_pixels)
    except SampleFailure as exc:
        record.fail(exc.reason, exc.message)
        return None
    record.width, record.height = image.width, image.height
    record.mode, record.exif_orientation = image.mode, image.exif_orientation
    return PendingImage(record, image.pixels)


def archive_key(shard_id: str, sample: Sample, taken: set[str]) -> str:
    """The archive key of a sample, ``<shard_id>/<sample key>``, added to ``taken``.

    A sample key repeated within the shard still gets a unique key (``#<index>`` appended); that
    row is then recorded as ``duplicate_key``. ``rdeic verify`` derives the expected keys with this.
    """
    key = f"{shard_id}/{sample.key}"
    while key in taken:
        key = f"{key}#{sample.index}"
    taken.add(key)
    return key


class _Producer(threading.Thread):
    """Reads and decodes a shard into batches on a thread of its own (the overlap with encoding)."""

    _END = object()

    def __init__(self, shard: ShardRef, reader: ShardReader, config: ShardConfig, fingerprint: str,
                 select: frozenset[str] | None = None) -> None:
        super().__init__(name=f"shard-reader-{shard.shard_id}", daemon=True)
        self.shard, self.reader, self.config, self.fingerprint = shard, reader, config, fingerprint
        self.select = select  # only these keys become records (a retry); every sample still gets its key
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=config.prefetch_batches)
        self.stop_event = threading.Event()
        self.seconds = 0.0  # reading + decoding, excluding time blocked on a full queue
        self.blocked_seconds = 0.0
        self._keys: set[str] = set()

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            batcher = Batcher(self.config.batch_size, self.config.max_batch_pixels)
            for sample in self.reader:
                if self.stop_event.is_set():
                    return
                record = self._new_record(sample)
                if self.select is not None and record.key not in self.select:
                    continue
                pending = prepare_sample(sample, record, self.config.max_pixels)
                if record.reason is None and record.key != f"{self.shard.shard_id}/{sample.key}":
                    record.fail("duplicate_key", f"sample key {sample.key!r} already occurred in this shard")
                    pending = None
                if pending is None:
                    batcher.add_finished(record)
                    continue
                for batch in batcher.add_image(pending):
                    self._put(batch)
            last = batcher.flush()
            if last is not None:
                self._put(last)
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, which re-raises
            self._put(exc)
        finally:
            self.seconds = time.perf_counter() - t0 - self.blocked_seconds

    def _new_record(self, sample: Sample) -> Record:
        key = archive_key(self.shard.shard_id, sample, self._keys)
        return Record(key=key, shard=self.shard.shard_id, src_index=sample.index, src_url=self.shard.url,
                      codec_fingerprint=self.fingerprint)

    def _put(self, item: Any) -> None:
        t0 = time.perf_counter()
        try:
            while not self.stop_event.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
        finally:
            self.blocked_seconds += time.perf_counter() - t0

    def batches(self) -> Iterator[Batch]:
        """Batches in reading order; re-raises the reader's exception, if any."""
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        self.stop_event.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.join(timeout=30)


# ---------------------------------------------------------------------------------------- encoding
def _is_per_image_error(exc: BaseException) -> bool:
    """Errors that condemn one image, not the worker: bad input values, out of memory for its size."""
    return isinstance(exc, ValueError) or is_out_of_memory(exc)


def _fail_image(record: Record, exc: BaseException) -> Record:
    """``out_of_memory`` (transient: ``--retry-failed`` redoes it) or ``encode_error`` (the codec refused it)."""
    return record.fail("out_of_memory" if is_out_of_memory(exc) else "encode_error", f"{type(exc).__name__}: {exc}")


def _checked(streams: Any, n: int) -> list[bytes]:
    if not isinstance(streams, list) or len(streams) != n:
        raise RuntimeError(f"encoder returned {type(streams).__name__} of "
                           f"{len(streams) if hasattr(streams, '__len__') else '?'} items for {n} images")
    for s in streams:
        if not isinstance(s, (bytes, bytearray)) or not s:
            raise RuntimeError(f"encoder returned an empty or non-bytes bitstream ({type(s).__name__})")
    return [bytes(s) for s in streams]


def _complete(record: Record, bitstream: bytes) -> Record:
    record.bitstream = bitstream
    record.bitstream_crc32 = zlib.crc32(bitstream)
    record.bpp = 8.0 * len(bitstream) / (record.width * record.height)  # type: ignore[operator]
    record.status, record.reason, record.error = STATUS_OK, None, None
    return record


def encode_images(encoder: Encoder, items: Sequence[PendingImage]) -> list[Record]:
    """Encode a batch; if the batch fails, encode one by one so only the guilty images fail.

    An error that is not about a single image (see ``_is_per_image_error``) is re-raised: the
    shard then fails as a whole and is retried, rather than archiving every sample as failed
    because, say, the GPU fell off the bus.
    """
    try:
        streams = _checked(encoder.encode([p.pixels for p in items]), len(items))
        return [_complete(p.record, s) for p, s in zip(items, streams)]
    except Exception as exc:  # sorted into per-image vs fatal below
        if len(items) == 1:
            if not _is_per_image_error(exc):
                raise
            return [_fail_image(items[0].record, exc)]
    out = []
    for p in items:
        try:
            out.append(_complete(p.record, _checked(encoder.encode([p.pixels]), 1)[0]))
        except Exception as exc:
            if not _is_per_image_error(exc):
                raise
            out.append(_fail_image(p.record, exc))
    return out


# ---------------------------------------------------------------------------------------- the unit
def encode_shard(shard: ShardRef, encoder: Encoder, config: ShardConfig, *, select: frozenset[str] | None = None,
                 progress: ProgressFn | None = None) -> tuple[list[Record], ShardReader, dict[str, float]]:
    """Read the shard (decoding on a thread of its own) and encode its images.

    Returns one record per sample, or per sample whose key is in ``select`` (every sample is still
    read, so keys are given exactly as the first run gave them), the reader (damage, bytes read)
    and the seconds spent reading/decoding, encoding and waiting for the reader.
    """
    fingerprint = encoder.fingerprint.hex()
    reader = ShardReader(shard.url, config.storage_options, config.max_member_bytes)
    producer = _Producer(shard, reader, config, fingerprint, select)
    records: list[Record] = []
    encode_s = wait_s = 0.0
    producer.start()
    try:
        batches = producer.batches()
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            wait_s += time.perf_counter() - t_wait
            if batch is None:
                break
            records.extend(batch.finished)
            if batch.images:
                t_enc = time.perf_counter()
                records.extend(encode_images(encoder, batch.images))
                encode_s += time.perf_counter() - t_enc
            if progress is not None:
                progress(len(records))
    finally:
        producer.stop()
    return records, reader, {"read_decode": producer.seconds, "encode": encode_s, "wait_for_reader": wait_s}


def process_shard(shard: ShardRef, encoder: Encoder, out: OutputLocation, config: ShardConfig, *,
                  attempt: int = 1, worker: str = "", progress: ProgressFn | None = None) -> ShardStats:
    """Archive one shard (see the module doc); returns the stats also written as its done marker.

    Raises:
        FatalShardError: the encoder is not the codec the run expects, or the run lost the output's
            lease to another job (``pipeline.lease.LeaseLostError``: nothing is written then).
        FileNotFoundError: the shard does not exist.
        StorageReadError / other exceptions: the attempt failed as a whole; retrying may help.
    """
    fingerprint = check_fingerprint(encoder, config.expected_fingerprint, worker)
    started, t0 = utc_now(), time.perf_counter()
    records, reader, timing = encode_shard(shard, encoder, config, progress=progress)

    t_write = time.perf_counter()
    metadata = dict(config.metadata)
    metadata.update({
        "rdeic.shard": json.dumps({"shard_id": shard.shard_id, "url": shard.url}),
        "rdeic.device": encoder.device,
        "rdeic.created_at": utc_now(),
    })
    metadata.setdefault("rdeic.codec.fingerprint", fingerprint)
    table = build_table(records, metadata)
    data = to_parquet_bytes(table, config.row_group_size)
    archive = out.archive_path(shard.shard_id)
    out.check_lease()  # a job that lost the prefix to another must not overwrite that job's file
    storage.write_bytes_atomic(out.fs, archive, data)
    write_s = time.perf_counter() - t_write

    total_s = time.perf_counter() - t0
    stats = shard_stats(shard, records, out.to_url(archive), fingerprint, config)
    stats.damage = reader.damage.to_dict() if reader.damage else None
    stats.shard_bytes_read = reader.bytes_read
    if reader.read_recoveries:
        stats.extra["read_recoveries"] = reader.read_recoveries  # transient read errors survived
    stats.parquet_bytes, stats.parquet_sha256 = len(data), hashlib.sha256(data).hexdigest()
    stats.row_groups = -(-len(records) // config.row_group_size)
    stats.attempt, stats.worker, stats.device = attempt, worker, encoder.device
    stats.started_at, stats.finished_at = started, utc_now()
    stats.seconds = {"total": round(total_s, 3), "read_decode": round(timing["read_decode"], 3),
                     "encode": round(timing["encode"], 3), "wait_for_reader": round(timing["wait_for_reader"], 3),
                     "write": round(write_s, 3)}
    stats.images_per_s = round(len(records) / total_s, 3) if total_s > 0 else 0.0
    Manifest(out).mark_done(stats)
    return stats


def shard_stats(shard: ShardRef, records: Sequence[Record], archive_url: str, fingerprint: str,
                config: ShardConfig) -> ShardStats:
    """The counts of a shard's marker (ok/failed, reasons, failed keys, bytes, bpp) from its rows."""
    ok = [r for r in records if r.status == STATUS_OK]
    return ShardStats.from_rows(
        shard, records, max_failed_keys=config.max_failed_keys, archive=archive_url, codec_fingerprint=fingerprint,
        src_bytes=sum(r.src_bytes or 0 for r in records), bitstream_bytes=sum(len(r.bitstream or b"") for r in ok),
        mean_bpp=round(sum(r.bpp or 0.0 for r in ok) / len(ok), 6) if ok else None)
