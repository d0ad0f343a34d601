"""The nouns of the archive pipeline: shards, samples, records and per-shard stats.

Plain dataclasses with no behaviour beyond (de)serialisation, so every stage (reader, image
decoding, batching, writer, manifest) and every executor (local, Ray) speaks the same types and a
record can be pickled to a Ray worker or dumped to JSON without adapters.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import pyarrow as pa

# STATUS_* are defined with the row base and imported from here by the rest of the pipeline.
from .rows import STATUS_FAILED as STATUS_FAILED
from .rows import STATUS_OK as STATUS_OK
from .rows import Row, column, required

# Closed set of per-sample failure reasons (the `reason` column; docs/archive-format.md explains each).
REASONS: dict[str, str] = {
    "no_image": "the sample has no member with an image extension",
    "empty_file": "the image member has 0 bytes",
    "not_an_image": "Pillow cannot identify the image format (e.g. a text file named .jpg)",
    "truncated_image": "the image data ends before the picture does",
    "corrupt_image": "the image decoder failed on the data",
    "too_large": "the pixel count exceeds the configured limit (decompression-bomb guard)",
    "member_too_large": "the tar member is larger than the configured byte limit and was not read",
    "unsupported_mode": "the pixel format cannot be converted to 8-bit RGB",
    "unsupported_member": "the tar member is not a regular file (link, device, fifo)",
    "duplicate_key": "the sample key already occurred earlier in the same shard",
    "shard_damaged": "the shard's tar stream broke while this sample was being read",
    "encode_error": "the codec refused this image (a ValueError: values it cannot encode)",
    "out_of_memory": "the worker ran out of host or device memory decoding or encoding this image (transient: "
                     "`rdeic archive --retry-failed` redoes it)",
}


@dataclass(frozen=True, slots=True)
class ShardRef:
    """One input shard: its stable id (names every output of the shard) and where it is read from."""

    shard_id: str
    url: str


@dataclass(slots=True)
class Member:
    """One file of a sample inside the tar.

    ``data`` is None when the member was deliberately not read; ``problem`` then names the reason
    (one of REASONS).
    """

    name: str
    ext: str
    size: int
    data: bytes | None
    problem: str | None = None


@dataclass(slots=True)
class Sample:
    """Members sharing a key (WebDataset grouping: the basename up to its first dot).

    ``damage`` is set when the shard broke while this sample was being read: its members are what
    could be read before the damage.
    """

    key: str
    index: int
    members: list[Member] = field(default_factory=list)
    damage: str | None = None


@dataclass(frozen=True, slots=True)
class ShardDamage:
    """Where and how a shard's tar stream broke; the samples read before it are kept."""

    offset: int | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "message": self.message}


@dataclass
class Record(Row):
    """One row of the archive (one input sample); ``pipeline.writer.ARCHIVE_SCHEMA`` is derived from these
    fields (their order, Arrow types and docs are the file format)."""

    reasons = REASONS
    tail_after = "exif_orientation"
    tail_docs = {
        "status": "'ok' (bitstream present) or 'failed' (reason and error say why)",
        "reason": "failure reason code (docs/archive-format.md), null when ok",
        "error": "human-readable failure detail, null when ok",
    }

    key: str = required(pa.string(), "globally unique sample key: '<shard>/<sample key>'")
    shard: str = required(pa.string(), "shard id (the input file name without its tar suffix)")
    src_index: int = required(pa.int32(), "0-based position of the sample in its shard")
    src_url: str = required(pa.string(), "URL of the input shard")
    src_member: str | None = column(pa.string(), "tar member the image was read from")
    src_bytes: int | None = column(pa.int64(), "size of that member in bytes")
    src_sha256: bytes | None = column(pa.binary(32), "sha256 of that member's bytes")
    width: int | None = column(pa.int32(), "image width as encoded (original size, EXIF orientation applied)")
    height: int | None = column(pa.int32(), "image height as encoded (original size, EXIF orientation applied)")
    mode: str | None = column(pa.string(), "Pillow mode of the source image (RGB, CMYK, I;16, P, ...)")
    exif_orientation: int | None = column(pa.int8(), "EXIF orientation tag of the source (1..8), null if none")
    # status, reason, error (Row)
    bpp: float | None = column(pa.float32(), "bits per pixel of the whole bitstream over width*height")
    bitstream_crc32: int | None = column(pa.uint32(), "zlib.crc32 of the bitstream column value")
    codec_fingerprint: str = required(pa.string(), "hex sha256 of the codec model that wrote (or would write) the row")
    bitstream: bytes | None = column(pa.large_binary(), "the RDEIC bitstream (self-describing; null when failed)")

    def fail(self, reason: str, message: str) -> Self:
        """Mark the record failed with a reason from REASONS (unknown reasons are a bug, so raise); a failed
        row keeps no bitstream."""
        super().fail(reason, message)
        self.bitstream = self.bitstream_crc32 = self.bpp = None
        return self


@dataclass(slots=True)
class ShardStats:
    """What one processed shard produced; written as its done marker (``_manifest/done/<id>.json``)."""

    shard_id: str
    url: str
    archive: str
    codec_fingerprint: str
    rows: int = 0
    ok: int = 0
    failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    failed_keys: list[str] = field(default_factory=list)
    failed_keys_truncated: bool = False
    damage: dict[str, Any] | None = None
    src_bytes: int = 0
    shard_bytes_read: int = 0
    bitstream_bytes: int = 0
    mean_bpp: float | None = None
    parquet_bytes: int = 0
    parquet_sha256: str = ""
    row_groups: int = 0
    attempt: int = 1
    worker: str = ""
    device: str = ""
    started_at: str = ""
    finished_at: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    # Job-specific figures of restore/audit markers (output bytes, metric means, ...); the archive
    # writes none, and an empty dict is left out of the marker so archive markers keep their fields.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not out["extra"]:
            del out["extra"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardStats:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_rows(cls, shard: ShardRef, rows: Sequence[Any], *, max_failed_keys: int, **fields: Any) -> ShardStats:
        """The marker of a shard whose rows (records with ``key``/``status``/``reason``) are ``rows``: the
        counts every job's marker has (ok, failed by reason, the first failed keys), plus ``fields``."""
        failed = sorted((r for r in rows if r.status != STATUS_OK), key=lambda r: r.key)
        return cls(shard_id=shard.shard_id, url=shard.url, rows=len(rows), ok=len(rows) - len(failed),
                   failed=len(failed),
                   failed_by_reason=dict(sorted(Counter(r.reason or "unknown" for r in failed).items())),
                   failed_keys=[r.key for r in failed[:max_failed_keys]],
                   failed_keys_truncated=len(failed) > max_failed_keys, **fields)
