"""Records -> one Parquet file per shard, with an explicit schema (docs/archive-format.md).

Choices (measured in shared/design/ecosystem.md §4):

* ``bitstream`` is ``large_binary`` and **uncompressed**: entropy-coded bytes do not compress, and
  64-bit offsets never overflow however large a shard's payloads get. All other columns are zstd.
* Rows are **sorted by key** and the file declares it (``sorting_columns``); min/max statistics on
  ``key`` let a reader skip every row group but one for a point lookup. Row groups are small
  (default 256 rows) because pyarrow reads a whole column chunk per lookup.
* Low-cardinality strings (shard, status, reason, ...) are dictionary-encoded; the bitstream
  never is.
* The file is built in memory and uploaded in one atomic write: the rows of a shard are already in
  memory for sorting, and a half-uploaded Parquet file must never be visible.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .types import Record

ARCHIVE_FORMAT = "rdeic-archive"
FORMAT_VERSION = 1
DEFAULT_ROW_GROUP_SIZE = 256


def _f(name: str, type_: pa.DataType, nullable: bool, doc: str) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


ARCHIVE_SCHEMA = pa.schema([
    _f("key", pa.string(), False, "globally unique sample key: '<shard>/<sample key>'"),
    _f("shard", pa.string(), False, "shard id (the input file name without its tar suffix)"),
    _f("src_index", pa.int32(), False, "0-based position of the sample in its shard"),
    _f("src_url", pa.string(), False, "URL of the input shard"),
    _f("src_member", pa.string(), True, "tar member the image was read from"),
    _f("src_bytes", pa.int64(), True, "size of that member in bytes"),
    _f("src_sha256", pa.binary(32), True, "sha256 of that member's bytes"),
    _f("width", pa.int32(), True, "image width as encoded (original size, EXIF orientation applied)"),
    _f("height", pa.int32(), True, "image height as encoded (original size, EXIF orientation applied)"),
    _f("mode", pa.string(), True, "Pillow mode of the source image (RGB, CMYK, I;16, P, ...)"),
    _f("exif_orientation", pa.int8(), True, "EXIF orientation tag of the source (1..8), null if none"),
    _f("status", pa.string(), False, "'ok' (bitstream present) or 'failed' (reason and error say why)"),
    _f("reason", pa.string(), True, "failure reason code (docs/archive-format.md), null when ok"),
    _f("error", pa.string(), True, "human-readable failure detail, null when ok"),
    _f("bpp", pa.float32(), True, "bits per pixel of the whole bitstream over width*height"),
    _f("bitstream_crc32", pa.uint32(), True, "zlib.crc32 of the bitstream column value"),
    _f("codec_fingerprint", pa.string(), False, "hex sha256 of the codec model that wrote (or would write) the row"),
    _f("bitstream", pa.large_binary(), True, "the RDEIC bitstream (self-describing; null when failed)"),
])

DICTIONARY_COLUMNS = ["shard", "src_url", "mode", "status", "reason", "codec_fingerprint"]
STATISTICS_COLUMNS = ["key", "shard", "src_index", "status"]
UNCOMPRESSED_COLUMNS = ["bitstream"]


def build_table(records: Sequence[Record], metadata: dict[str, str] | None = None) -> pa.Table:
    """Rows sorted by key, with the archive schema and ``metadata`` as file key-value metadata.

    Raises ValueError on duplicate keys: the key is the archive's identity for a sample.
    """
    ordered = sorted(records, key=lambda r: r.key)
    for a, b in zip(ordered, ordered[1:]):
        if a.key == b.key:
            raise ValueError(f"duplicate archive key {a.key!r} in one shard")
    columns = {name: [getattr(r, name) for r in ordered] for name in ARCHIVE_SCHEMA.names}
    schema = ARCHIVE_SCHEMA.with_metadata(_base_metadata() | dict(metadata or {}))
    return pa.table(columns, schema=schema)


def _base_metadata() -> dict[str, str]:
    return {
        "rdeic.format": ARCHIVE_FORMAT,
        "rdeic.format_version": str(FORMAT_VERSION),
        "rdeic.schema_columns": json.dumps(ARCHIVE_SCHEMA.names),
    }


def to_parquet_bytes(table: pa.Table, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> bytes:
    """Serialise ``table`` as one Parquet file (see the module doc for the layout choices)."""
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    compression = {name: ("none" if name in UNCOMPRESSED_COLUMNS else "zstd") for name in table.column_names}
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=row_group_size,
        compression=compression,
        use_dictionary=DICTIONARY_COLUMNS,
        write_statistics=STATISTICS_COLUMNS,
        sorting_columns=[pq.SortingColumn(table.schema.get_field_index("key"))],
    )
    return sink.getvalue().to_pybytes()


def read_metadata(source: object) -> dict[str, str]:
    """The ``rdeic.*`` key-value metadata of an archive file (path or file-like), decoded."""
    meta = pq.read_metadata(source).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"rdeic.")}
