"""Stream the samples of one WebDataset tar shard, recording damage instead of losing the shard.

The tar is read through fsspec as a forward-only stream (``tarfile`` mode ``'r|*'``, so plain and
gzip/bz2/xz tars): memory holds one sample at a time, never the shard. Members are grouped into
samples like WebDataset does: the key is the member path up to the first dot of its base name
(``dir/a.b.png`` -> key ``dir/a``, extension ``b.png``), and consecutive members with the same key
form one sample.

Two kinds of trouble are told apart, because they need opposite handling:

* **Damage** (the bytes are wrong: a truncated object, garbage in a header, a broken gzip
  stream). Retrying reads the same bytes again, so the samples read before the damage are kept,
  a sample whose member was cut off is flagged, and :attr:`ShardReader.damage` says where the
  stream broke. ``tarfile`` silently stops at a truncated or invalid header; a watched ``TarInfo``
  class notices how the stream really ended.
* **Storage errors** (the store failed to deliver: connection reset, throttling). These raise
  :class:`StorageReadError` so the caller can retry the whole shard; a missing object raises
  ``FileNotFoundError``, which no retry will fix.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

from . import storage
from .types import Member, Sample, ShardDamage

# Admits a 100-megapixel 8-bit RGB PNG even stored uncompressed (~300 MB), the size the pixel guard admits.
DEFAULT_MAX_MEMBER_BYTES = 512 * 1024 * 1024
_DAMAGE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError, UnicodeError)


class StorageReadError(OSError):
    """Reading a shard from storage failed (not a problem of the shard's bytes); worth a retry."""


class _GuardedStream:
    """Counts bytes and marks exceptions that come from the storage layer, not from the tar data."""

    def __init__(self, raw: IO[bytes], url: str) -> None:
        self.raw = raw
        self.url = url
        self.bytes_read = 0
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except Exception as exc:
            self.error = exc
            raise StorageReadError(f"reading {self.url} failed after {self.bytes_read} bytes: {exc}") from exc
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        self.raw.close()


class _WatchedTarInfo(tarfile.TarInfo):
    """Remembers why header parsing stopped: only an all-zero block is a proper end of archive."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf._end_reason = exc  # type: ignore[attr-defined]
            raise


def split_member_name(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member name, WebDataset style; no dot -> extension ''."""
    if name.startswith("./"):
        name = name[2:]
    dirname, slash, base = name.rpartition("/")
    dot = base.find(".")
    if dot <= 0:
        return name, ""
    return dirname + slash + base[:dot], base[dot + 1:]


def _end_damage(tf: tarfile.TarFile) -> ShardDamage | None:
    """Damage implied by how ``tarfile`` stopped iterating (None for a proper end-of-archive block)."""
    reason = getattr(tf, "_end_reason", None)
    if isinstance(reason, tarfile.EOFHeaderError):
        return None
    if isinstance(reason, tarfile.EmptyHeaderError):
        return ShardDamage(tf.offset, f"stream ends at byte {tf.offset} without the end-of-archive marker "
                                      "(truncated at a member boundary?)")
    if isinstance(reason, tarfile.TruncatedHeaderError):
        return ShardDamage(tf.offset, f"truncated tar header at byte {tf.offset}")
    if reason is not None:
        return ShardDamage(tf.offset, f"invalid tar header at byte {tf.offset}: {reason}")
    return None


class ShardReader:
    """Iterate a shard's samples; afterwards :attr:`damage` tells whether the stream was whole.

    Args:
        url: the shard (any fsspec URL or local path).
        storage_options: options for a remote filesystem (see :func:`pipeline.storage.filesystem`).
        max_member_bytes: members larger than this are skipped unread (their sample fails with
            ``member_too_large``), so a hostile shard cannot exhaust memory.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
        if max_member_bytes < 1:
            raise ValueError(f"max_member_bytes must be >= 1, got {max_member_bytes}")
        self.url = url
        self.storage_options = storage_options
        self.max_member_bytes = max_member_bytes
        self.damage: ShardDamage | None = None
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Sample]:
        fs, path = storage.filesystem(self.url, self.storage_options)
        try:
            raw = storage.open_for_streaming(fs, path)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as exc:
            raise StorageReadError(f"cannot open shard {self.url}: {exc}") from exc
        stream = _GuardedStream(raw, self.url)
        try:
            yield from self._samples(stream)
        finally:
            self.bytes_read = stream.bytes_read
            stream.close()

    def _samples(self, stream: _GuardedStream) -> Iterator[Sample]:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo)  # type: ignore[arg-type]
        except _DAMAGE_ERRORS as exc:
            self._raise_if_storage(stream)
            self.damage = ShardDamage(0, f"not a readable tar archive: {type(exc).__name__}: {exc}")
            return
        current: Sample | None = None
        index = 0
        while True:
            try:
                info = tf.next()
            except _DAMAGE_ERRORS as exc:
                self._raise_if_storage(stream)
                self.damage = ShardDamage(tf.offset, f"tar stream broken at byte {tf.offset}: "
                                                     f"{type(exc).__name__}: {exc}")
                break
            if info is None:
                self.damage = _end_damage(tf)
                break
            tf.members = []  # stream mode keeps every TarInfo otherwise: memory would grow with the shard
            if info.isdir():
                continue
            key, ext = split_member_name(info.name)
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = Sample(key=key, index=index)
                index += 1
            if not info.isfile():
                current.members.append(Member(info.name, ext, info.size, None, "unsupported_member"))
                continue
            if info.size > self.max_member_bytes:
                current.members.append(Member(info.name, ext, info.size, None, "member_too_large"))
                continue
            try:
                data = tf.extractfile(info).read()  # type: ignore[union-attr]
            except _DAMAGE_ERRORS as exc:
                self._raise_if_storage(stream)
                self.damage = ShardDamage(info.offset_data, f"member {info.name!r} cut off: "
                                                            f"{type(exc).__name__}: {exc}")
                current.damage = self.damage.message
                break
            current.members.append(Member(info.name, ext, info.size, data))
        if current is not None:
            yield current

    @staticmethod
    def _raise_if_storage(stream: _GuardedStream) -> None:
        if stream.error is not None:
            raise StorageReadError(f"reading {stream.url} failed after {stream.bytes_read} bytes: "
                                   f"{stream.error}") from stream.error
