"""What restore and audit need from a codec: bitstreams in, images out, and a cheap per-stream check.

The mirror of ``pipeline.encoder``: the pipeline never imports a model. A job hands it a factory
whose ``load`` builds a :class:`Decoder` once per worker (``jobs/commands/restore.py`` adapts
``rdeic_core.RDEICCodec``).

Two things make decoding a shard robust and fast:

* **Per-stream checks before any batch** (:meth:`Decoder.inspect`): structure, CRC and model
  fingerprint are verified for each stream on its own, so one corrupted or foreign stream is
  recorded against its key (:class:`RejectedStream` with a reason from :data:`DECODE_REASONS`)
  instead of failing the batch it would have joined.
* **Size bucketing** (:class:`SizeBuckets`): only streams with the same bucket (padded latent size,
  steps, detail scale) are batched together, so every batch is one tensor and no image is decoded
  at a padding it does not need.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

# Closed set of per-key decode failure reasons (the `reason` column of restore and audit tables).
DECODE_REASONS: dict[str, str] = {
    "missing_bitstream": "the archive row says ok but holds no bitstream",
    "crc_mismatch": "the bitstream does not match the archive's bitstream_crc32 (damaged in storage)",
    "corrupt_bitstream": "the bitstream fails its own validation (magic, version, lengths, internal CRC)",
    "foreign_model": "the bitstream was written by another model than the decoder's (fingerprint)",
    "decode_error": "the codec failed on this stream (entropy decoding desync, out of memory, ...)",
}


class RejectedStream(ValueError):
    """One bitstream cannot be decoded; ``reason`` is a key of :data:`DECODE_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}; expected one of {sorted(DECODE_REASONS)}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # picklable (crosses Ray task boundaries)
        return (type(self), (self.reason, self.message))


class StreamDecodeError(ValueError):
    """The decoder failed on the streams of one call for a reason tied to them (not to the device).

    Decoders raise this for per-stream problems found only while decoding; any other exception
    is treated as a worker failure (the shard attempt fails and is retried).
    """


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What :meth:`Decoder.inspect` learns from a valid stream's header.

    ``bucket`` is opaque to the pipeline: streams with equal buckets may be decoded in one batch.
    ``pixels`` is the padded pixel count the decoder works at (for memory bounds).
    """

    width: int
    height: int
    steps: int
    detail_scale: float
    bucket: Hashable
    pixels: int


@runtime_checkable
class Decoder(Protocol):
    """A loaded codec for decoding; ``fingerprint`` and ``device`` as for :class:`pipeline.encoder.Encoder`;
    ``placement`` is the torch device it runs on (audit puts its metric networks there)."""

    fingerprint: bytes
    device: str
    placement: str

    def inspect(self, bitstream: bytes, steps: int | None = None, detail_scale: float | None = None) -> StreamInfo:
        """Validate one stream (no decoding); raise :class:`RejectedStream` if it cannot be decoded."""
        ...

    def decode(self, bitstreams: Sequence[bytes], steps: int | None = None,
               detail_scale: float | None = None) -> list[np.ndarray]:
        """uint8 H x W x 3 images in order; overrides apply to every stream (None: each header's)."""
        ...


T = TypeVar("T")


class SizeBuckets(Generic[T]):
    """Groups items by bucket and hands out batches of one bucket, bounded by count and pending pixels.

    :meth:`add` returns the batches it completed: a bucket that reaches ``batch_size`` items, and,
    when the items held exceed ``max_pending_pixels`` (their own pixel weight, e.g. original
    images an audit keeps for comparison), the bucket holding the most pixels as a partial batch.
    :meth:`flush` empties every bucket, in the order buckets were first seen. The batching is a
    pure function of the sequence of ``add`` calls, so reruns decode the same batches.
    """

    def __init__(self, batch_size: int, max_pending_pixels: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_pending_pixels is not None and max_pending_pixels < 1:
            raise ValueError(f"max_pending_pixels must be >= 1 or None, got {max_pending_pixels}")
        self.batch_size = batch_size
        self.max_pending_pixels = max_pending_pixels
        self._buckets: dict[Hashable, list[tuple[T, int]]] = {}
        self._pending_pixels = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._buckets.values())

    def add(self, bucket: Hashable, item: T, pixels: int = 0) -> list[list[T]]:
        items = self._buckets.setdefault(bucket, [])
        items.append((item, pixels))
        self._pending_pixels += pixels
        done: list[list[T]] = []
        if len(items) >= self.batch_size:
            done.append(self._take(bucket))
        while self.max_pending_pixels is not None and self._pending_pixels > self.max_pending_pixels and self._buckets:
            heaviest = max(self._buckets, key=lambda b: sum(p for _, p in self._buckets[b]))
            done.append(self._take(heaviest))
        return done

    def flush(self) -> list[list[T]]:
        return [self._take(b) for b in list(self._buckets)]

    def _take(self, bucket: Hashable) -> list[T]:
        items = self._buckets.pop(bucket)
        self._pending_pixels -= sum(p for _, p in items)
        return [item for item, _ in items]
