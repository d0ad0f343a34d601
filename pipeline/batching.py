"""Group decoded images into encoder batches, bounded by count and by pixels.

The pixel bound keeps one batch of large photos from taking the memory of many small ones (a
batch of eight 24-megapixel images is 576 MB of uint8 before the model sees it). Images keep
their own size: the codec groups equal padded sizes itself, so no resizing or padding happens here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .types import Record

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_PIXELS = 32 * 1024 * 1024


@dataclass(slots=True)
class PendingImage:
    """An image waiting for the encoder and the record its bitstream will complete."""

    record: Record
    pixels: np.ndarray


@dataclass(slots=True)
class Batch:
    """What the reader thread hands to the encoder: images to encode and records already final."""

    images: list[PendingImage] = field(default_factory=list)
    finished: list[Record] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return sum(int(p.pixels.shape[0]) * int(p.pixels.shape[1]) for p in self.images)

    def __len__(self) -> int:
        return len(self.images) + len(self.finished)


class Batcher:
    """Accumulates items; :meth:`add_image` returns the batches that are full.

    A single image larger than ``max_batch_pixels`` still forms a batch of its own (the pixel limit
    on *decoding* is what refuses images, not this).
    """

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE, max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_pixels < 1:
            raise ValueError(f"max_batch_pixels must be >= 1, got {max_batch_pixels}")
        self.batch_size = batch_size
        self.max_batch_pixels = max_batch_pixels
        self._batch = Batch()
        self._pixels = 0

    def add_image(self, item: PendingImage) -> list[Batch]:
        """Queue an image; returns the batches completed by it (zero, one, or two)."""
        n = int(item.pixels.shape[0]) * int(item.pixels.shape[1])
        done: list[Batch] = []
        if self._batch.images and self._pixels + n > self.max_batch_pixels:
            done.append(self._take())
        self._batch.images.append(item)
        self._pixels += n
        if len(self._batch.images) >= self.batch_size:
            done.append(self._take())
        return done

    def add_finished(self, record: Record) -> None:
        """Queue a record that needs no encoding (a failed sample); it rides with the next batch."""
        self._batch.finished.append(record)

    def flush(self) -> Batch | None:
        """The current batch (None when empty), starting a new one."""
        return self._take() if len(self._batch) else None

    def _take(self) -> Batch:
        batch, self._batch, self._pixels = self._batch, Batch(), 0
        return batch
