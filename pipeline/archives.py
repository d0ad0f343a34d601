"""Reading an archive prefix written by ``rdeic archive``: its run file, complete shards, rows, one key.

Readers only trust what the format promises (docs/archive-format.md):

* a shard is complete exactly when ``_manifest/done/<shard>.json`` exists; a Parquet file without
  its marker is a leftover and is never read;
* the key ``<shard_id>/<sample key>`` names its file (``archive/<shard_id>.parquet``; shard ids
  never contain ``/``), and rows are sorted by key with min/max statistics per row group, so a
  point lookup reads the footer and one row group, never the rest of the archive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .manifest import RUN_FILE, Manifest, OutputLocation
from .types import ShardRef
from .writer import ARCHIVE_FORMAT, FORMAT_VERSION

# The archive columns a decoder needs (the bitstream column is by far the largest).
DECODE_COLUMNS = ["key", "src_index", "status", "reason", "width", "height", "bpp", "bitstream_crc32",
                  "codec_fingerprint", "bitstream"]


class ArchiveReadError(ValueError):
    """The prefix is not a readable archive (no run file, newer format) or a key is not in it."""


class KeyNotFoundError(ArchiveReadError, KeyError):
    """The key's shard or row does not exist in the archive."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ArchiveLocation:
    """An archive prefix (read side); picklable like :class:`OutputLocation`, which it wraps."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.out = OutputLocation(url, storage_options)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.out.url, "storage_options": self.out.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    @property
    def url(self) -> str:
        return self.out.url

    def read_run(self) -> dict[str, Any]:
        """``run.json``, checked to be an archive this code can read."""
        path = self.out.path(RUN_FILE)
        try:
            run = json.loads(storage.read_bytes(self.out.fs, path))
        except FileNotFoundError:
            raise ArchiveReadError(f"{self.url} is not an archive: it has no {RUN_FILE}") from None
        if run.get("format") != ARCHIVE_FORMAT:
            raise ArchiveReadError(f"{self.out.to_url(path)} is not an {ARCHIVE_FORMAT} run file "
                                   f"(format={run.get('format')!r})")
        if int(run.get("format_version", 0)) > FORMAT_VERSION:
            raise ArchiveReadError(f"{self.url} has archive format version {run['format_version']}; "
                                   f"this version reads <= {FORMAT_VERSION}")
        return run

    def complete_shards(self) -> list[ShardRef]:
        """The shards with a done marker, sorted by id; ``url`` is the shard's Parquet file."""
        return [ShardRef(s, self.shard_url(s)) for s in sorted(Manifest(self.out).done_shards())]

    def shard_url(self, shard_id: str) -> str:
        return self.out.to_url(self.out.archive_path(shard_id))

    def is_complete(self, shard_id: str) -> bool:
        return storage.exists(self.out.fs, self.out.done_path(shard_id))


def read_rows(url: str, storage_options: dict[str, Any] | None = None,
              columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Every row of one archive file (selected columns), in key order."""
    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns).to_pylist()


def split_key(key: str) -> tuple[str, str]:
    """(shard id, sample key) of an archive key; raises ArchiveReadError for a key without a shard."""
    shard_id, slash, sample = key.partition("/")
    if not slash or not shard_id or not sample:
        raise ArchiveReadError(f"archive keys look like '<shard_id>/<sample key>', got {key!r}")
    return shard_id, sample


class _CountingFile:
    """A read-only file wrapper counting the bytes actually fetched (to prove a lookup stays small)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return bool(getattr(self.raw, "closed", False))

    def close(self) -> None:
        self.raw.close()

    @property
    def size(self) -> int:
        return int(getattr(self.raw, "size", 0) or 0)


@dataclass(frozen=True)
class LookupStats:
    """How much of the archive a point lookup touched."""

    file: str
    file_bytes: int
    bytes_read: int
    row_groups: int
    row_groups_read: int


def lookup(archive: ArchiveLocation, key: str, columns: list[str] | None = None,
           require_complete: bool = True) -> tuple[dict[str, Any], LookupStats]:
    """The archive row of ``key``, reading the footer and only the row groups whose key range holds it.

    Raises KeyNotFoundError when the shard or key does not exist, ArchiveReadError when the shard
    is incomplete (no done marker) and ``require_complete`` is set.
    """
    shard_id, _ = split_key(key)
    fs, path = archive.out.fs, archive.out.archive_path(shard_id)
    if require_complete and not archive.is_complete(shard_id):
        if storage.exists(fs, path):
            raise ArchiveReadError(f"shard {shard_id!r} of {archive.url} is not complete (no done marker): "
                                   "its file is a leftover of an interrupted run")
        raise KeyNotFoundError(f"no shard {shard_id!r} in {archive.url} (looked for {archive.out.to_url(path)})")
    try:
        raw = fs.open(path, "rb")
    except FileNotFoundError:
        raise KeyNotFoundError(f"no shard {shard_id!r} in {archive.url}") from None
    with raw:
        f = _CountingFile(raw)
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        key_col = pf.schema_arrow.get_field_index("key")
        candidates = [i for i in range(meta.num_row_groups) if _may_hold(meta.row_group(i).column(key_col), key)]
        row = None
        for i in candidates:
            table: pa.Table = pf.read_row_group(i, columns=columns if columns is None or "key" in columns
                                                else ["key", *columns])
            keys = table.column("key").to_pylist()
            if key in keys:
                row = table.slice(keys.index(key), 1).to_pylist()[0]
                break
        stats = LookupStats(archive.out.to_url(path), f.size, f.bytes_read, meta.num_row_groups, len(candidates))
    if row is None:
        raise KeyNotFoundError(f"key {key!r} is not in {stats.file}")
    if columns is not None and "key" not in columns:
        row.pop("key", None)
    return row, stats


def _may_hold(column_meta: Any, key: str) -> bool:
    """Whether a row group's key statistics admit ``key`` (no statistics: it might)."""
    st = column_meta.statistics
    if st is None or not st.has_min_max:
        return True
    return st.min <= key <= st.max
