"""The nouns of the archive pipeline: shards, samples, records and per-shard stats.

Plain dataclasses with no behaviour beyond (de)serialisation, so every stage (reader, image
decoding, batching, writer, manifest) and every executor (local, Ray) speaks the same types and a
record can be pickled to a Ray worker or dumped to JSON without adapters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STATUS_OK = "ok"
STATUS_FAILED = "failed"

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


def mark_failed(record: Any, reason: str, message: str, reasons: Any, what: str) -> None:
    """Set status/reason/error of an archive, restore or audit row; a reason outside the job's closed
    set is a bug in the caller, so it raises instead of writing an undocumented reason."""
    if reason not in reasons:
        raise ValueError(f"unknown {what} reason {reason!r}; expected one of {sorted(reasons)}")
    record.status, record.reason, record.error = STATUS_FAILED, reason, message


@dataclass(slots=True)
class Record:
    """One row of the archive (one input sample); see ``pipeline.writer.ARCHIVE_SCHEMA``."""

    key: str
    shard: str
    src_index: int
    src_url: str
    codec_fingerprint: str
    status: str = STATUS_FAILED
    src_member: str | None = None
    src_bytes: int | None = None
    src_sha256: bytes | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    exif_orientation: int | None = None
    bitstream: bytes | None = None
    bitstream_crc32: int | None = None
    bpp: float | None = None
    reason: str | None = None
    error: str | None = None

    def fail(self, reason: str, message: str) -> Record:
        """Mark the record failed with a reason from REASONS (unknown reasons are a bug, so raise)."""
        mark_failed(self, reason, message, REASONS, "failure")
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
