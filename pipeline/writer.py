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

from .rows import rows_table
from .types import Record

ARCHIVE_FORMAT = "rdeic-archive"
FORMAT_VERSION = 1
DEFAULT_ROW_GROUP_SIZE = 256


# Derived from the fields of Record (pipeline/rows.py): names, order, types, nullability and docs.
ARCHIVE_SCHEMA = Record.arrow_schema()

DICTIONARY_COLUMNS = ["shard", "src_url", "mode", "status", "reason", "codec_fingerprint"]
STATISTICS_COLUMNS = ["key", "shard", "src_index", "status"]
UNCOMPRESSED_COLUMNS = ["bitstream"]


def build_table(records: Sequence[Record], metadata: dict[str, str] | None = None) -> pa.Table:
    """Rows sorted by key, with the archive schema and ``metadata`` as file key-value metadata.

    Raises ValueError on duplicate keys: the key is the archive's identity for a sample.
    """
    seen: set[str] = set()
    for r in records:
        if r.key in seen:
            raise ValueError(f"duplicate archive key {r.key!r} in one shard")
        seen.add(r.key)
    return rows_table(records, ARCHIVE_SCHEMA, _base_metadata() | dict(metadata or {}))


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
