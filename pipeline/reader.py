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
* **Storage errors** (the store failed to deliver: connection reset, throttling, a body cut
  short). On an object store the stream first recovers by itself: it reopens the object at the
  byte where the failure happened (same ETag, so never a spliced newer version) and carries on,
  up to :data:`READ_RETRIES` consecutive failures with exponential backoff. Only then does it
  raise :class:`StorageReadError`, so the caller retries the whole shard; a missing object raises
  ``FileNotFoundError``, which no retry will fix.

A **short read** is a storage error too, never damage: when the stream ends early, the object's
size is asked again (a fresh HEAD *and* the parent listing) and, if either says there is more
than was read, the read resumes. A stale or lying size (a HEAD reporting 0 bytes for an object
that is not empty, a GET answered with fewer bytes than the object holds) therefore costs a retry,
not the shard's samples. Damage is only recorded for bytes the store confirms are the whole object.
"""

from __future__ import annotations

import logging
import tarfile
import time
import zlib
from collections.abc import Iterator
from typing import IO, Any, Self

import fsspec

from . import storage
from .types import Member, Sample, ShardDamage

# Admits a 100-megapixel 8-bit RGB PNG even stored uncompressed (~300 MB), the size the pixel guard admits.
DEFAULT_MAX_MEMBER_BYTES = 512 * 1024 * 1024
_DAMAGE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError, UnicodeError)


class StorageReadError(OSError):
    """Reading a shard from storage failed (not a problem of the shard's bytes); worth a retry."""


log = logging.getLogger(__name__)

# Consecutive failed reads (errors or short reads without progress) a stream recovers from by
# reopening the object at the failed offset, before it gives up with StorageReadError; the pause
# before reopen n is storage.backoff_pause(n) (0.2 s, doubling, at most 5 s).
READ_RETRIES = storage.READ_RETRIES


class _RemoteObject:
    """How a stream reopens an object-store object at an offset and re-asks its size."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.etag: str | None = None

    def open(self, offset: int = 0) -> IO[bytes]:
        self.fs.invalidate_cache(self.path)
        raw = storage.open_for_streaming(self.fs, self.path)
        etag = (getattr(raw, "details", None) or {}).get("ETag")
        if self.etag is None:
            self.etag = etag
        elif etag is not None and etag != self.etag:
            raw.close()
            raise _ObjectChanged(f"{self.path} changed while it was read (ETag {self.etag} -> {etag})")
        if offset:
            raw.seek(offset)
        return raw

    def sizes(self) -> dict[str, int]:
        """The object's size as a fresh HEAD and as the parent listing say (either may be missing)."""
        out: dict[str, int] = {}
        self.fs.invalidate_cache(self.path)
        info = self.fs.info(self.path)
        if info.get("size") is not None:
            out["HEAD"] = int(info["size"])
        parent, _, base = self.path.rstrip("/").rpartition("/")
        self.fs.invalidate_cache(parent)
        try:  # s3fs and gcsfs list just the keys starting with the name: one cheap request
            entries = list(self.fs.find(parent, prefix=base, detail=True).values())
        except (TypeError, ValueError, NotImplementedError):
            entries = self.fs.ls(parent, detail=True)
        for entry in entries:
            if entry.get("name", "").rstrip("/") == self.path.rstrip("/") and entry.get("size") is not None:
                out["listing"] = int(entry["size"])
        return out


class _ObjectChanged(OSError):
    """The object was replaced while it was read: restart the shard rather than splice versions."""


class _GuardedStream:
    """Counts bytes and keeps storage failures apart from tar damage.

    With a ``source`` (object stores), a failed or short read reopens the object at the current
    offset and goes on (bounded, with backoff; see the module doc). Without one (local files,
    tests), a storage exception ends the stream at once. Whatever ends the stream unrecovered is
    kept in :attr:`error`, so the tar parser's reaction to it is reported as a storage error.
    """

    def __init__(self, raw: IO[bytes], url: str, source: _RemoteObject | None = None,
                 retries: int = READ_RETRIES) -> None:
        self.raw = raw
        self.url = url
        self.source = source
        self.retries = retries
        self.bytes_read = 0
        self.failure: StorageReadError | None = None  # what ended the stream unrecovered (cause chained)
        self.recoveries = 0  # reopens that let the stream go on
        self._failures = 0  # consecutive, reset by progress

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                data = self.raw.read(size)
            except Exception as exc:  # noqa: BLE001 - anything the store raises mid-stream
                self._recover(exc)
                continue
            if data or size == 0 or self.source is None:
                if data:
                    self._failures = 0
                self.bytes_read += len(data)
                return data
            short = self._short_by()
            if short is None:
                return data  # the store confirms: this is the end of the object
            self._recover(storage.ShortReadError(f"the stream ended after {self.bytes_read} bytes, {short}"))

    def _short_by(self) -> str | None:
        """None when the object really ends at ``bytes_read``; else what says it is longer."""
        assert self.source is not None
        try:
            sizes = self.source.sizes()
        except FileNotFoundError as exc:
            self.failure = StorageReadError(f"{self.url} disappeared while it was read")
            raise self.failure from exc
        except Exception as exc:  # noqa: BLE001 - could not ask: count it as a failed read
            return f"and its size could not be confirmed ({type(exc).__name__}: {exc})"
        longer = {k: v for k, v in sizes.items() if v > self.bytes_read}
        if longer:
            return "but the object has " + ", ".join(f"{v} bytes by {k}" for k, v in longer.items())
        if any(v < self.bytes_read for v in sizes.values()):
            changed = _ObjectChanged(f"{self.url} is now shorter ({sizes}) than the {self.bytes_read} bytes read")
            self.failure = StorageReadError(str(changed))
            raise self.failure from changed
        return None

    def _recover(self, exc: BaseException) -> None:
        """Reopen at ``bytes_read`` after a pause, or raise StorageReadError when out of retries."""
        while True:
            self._failures += 1
            fatal = isinstance(exc, (FileNotFoundError, PermissionError, _ObjectChanged))
            if self.source is None or fatal or self._failures > self.retries:
                tries = "" if self.source is None or fatal else f" ({self._failures - 1} reopen(s) did not help)"
                self.failure = StorageReadError(f"reading {self.url} failed after {self.bytes_read} bytes{tries}: "
                                                f"{type(exc).__name__}: {exc}")
                raise self.failure from exc
            pause = storage.backoff_pause(self._failures)
            log.warning("transient read error on %s after %d bytes (%s: %s); reopening in %.1fs (try %d of %d)",
                        self.url, self.bytes_read, type(exc).__name__, exc, pause, self._failures, self.retries)
            time.sleep(pause)
            try:
                raw = self.source.open(self.bytes_read)
            except Exception as again:  # noqa: BLE001 - the reopen failed as well: next try
                exc = again
                continue
            self._close_raw()
            self.raw = raw
            self.recoveries += 1
            return

    def _close_raw(self) -> None:
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
            pass

    def close(self) -> None:
        self._close_raw()


class _WatchedTarInfo(tarfile.TarInfo):
    """Remembers why header parsing stopped: only an all-zero block is a proper end of archive."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
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


# tarfile's HeaderError subclasses tell a proper end of archive from a cut one; typeshed does not list them
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EMPTY_HEADER: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_TRUNCATED_HEADER: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]


def _end_damage(tf: tarfile.TarFile) -> ShardDamage | None:
    """Damage implied by how ``tarfile`` stopped iterating (None for a proper end-of-archive block)."""
    reason = getattr(tf, "_end_reason", None)
    if isinstance(reason, _EOF_HEADER):
        return None
    if isinstance(reason, _EMPTY_HEADER):
        return ShardDamage(tf.offset, f"stream ends at byte {tf.offset} without the end-of-archive marker "
                                      "(truncated at a member boundary?)")
    if isinstance(reason, _TRUNCATED_HEADER):
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
        self.read_recoveries = 0  # transient read errors the stream recovered from (see module doc)

    def __iter__(self) -> Iterator[Sample]:
        fs, path = storage.filesystem(self.url, self.storage_options)
        source = None if storage.is_local(fs) else _RemoteObject(fs, path)
        try:
            raw = source.open() if source is not None else storage.open_for_streaming(fs, path)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as exc:
            raise StorageReadError(f"cannot open shard {self.url}: {exc}") from exc
        stream = _GuardedStream(raw, self.url, source)
        try:
            yield from self._samples(stream)
        finally:
            self.bytes_read = stream.bytes_read
            self.read_recoveries = stream.recoveries
            stream.close()

    def _samples(self, stream: _GuardedStream) -> Iterator[Sample]:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo)  # type: ignore[call-overload]
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
                member = tf.extractfile(info)  # a regular file (checked above): never None
                assert member is not None
                data = member.read()
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
        if stream.failure is not None:  # set with every storage error that ended the stream
            raise stream.failure
