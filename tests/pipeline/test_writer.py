"""Parquet layout: explicit schema, per-column codecs, sorted keys with statistics, metadata."""

from __future__ import annotations

import hashlib
import io
import random
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.types import Record
from pipeline.writer import ARCHIVE_SCHEMA, build_table, read_metadata, to_parquet_bytes

FP = "ab" * 32


def _records(n: int, seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    out = []
    for i in rng.sample(range(n), n):  # shuffled: the writer must sort
        key = f"shard-7/img{i:05d}"
        if i % 10 == 3:
            out.append(Record(key, "shard-7", i, "s3://b/shard-7.tar", FP, src_member=f"img{i:05d}.jpg",
                              src_bytes=0).fail("empty_file", "the image member has 0 bytes"))
            continue
        payload = rng.randbytes(rng.randint(50, 400))
        out.append(Record(key, "shard-7", i, "s3://b/shard-7.tar", FP, status="ok", src_member=f"img{i:05d}.png",
                          src_bytes=1234, src_sha256=hashlib.sha256(payload).digest(), width=64, height=48,
                          mode="RGB", bitstream=payload, bitstream_crc32=zlib.crc32(payload),
                          bpp=8 * len(payload) / (64 * 48)))
    return out


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    table = build_table(_records(1000), {"rdeic.codec.fingerprint": FP, "rdeic.job": '{"x": 1}'})
    path = tmp_path_factory.mktemp("w") / "shard-7.parquet"
    path.write_bytes(to_parquet_bytes(table, row_group_size=256))
    return path


def test_schema_and_column_encodings(parquet_file: Path) -> None:
    pf = pq.ParquetFile(parquet_file)
    schema = pf.schema_arrow
    assert schema.remove_metadata().equals(ARCHIVE_SCHEMA.remove_metadata(), check_metadata=False)
    assert schema.field("bitstream").type == pa.large_binary()
    assert schema.field("src_sha256").type == pa.binary(32)
    assert not schema.field("key").nullable
    rg = pf.metadata.row_group(0)
    codecs = {rg.column(i).path_in_schema: rg.column(i).compression for i in range(rg.num_columns)}
    assert codecs["bitstream"] == "UNCOMPRESSED"
    assert {c for name, c in codecs.items() if name != "bitstream"} == {"ZSTD"}
    encodings = {rg.column(i).path_in_schema: rg.column(i).encodings for i in range(rg.num_columns)}
    assert "RLE_DICTIONARY" in encodings["status"]
    assert "RLE_DICTIONARY" not in encodings["bitstream"]


def test_rows_sorted_row_groups_sized_and_key_statistics(parquet_file: Path) -> None:
    pf = pq.ParquetFile(parquet_file)
    assert pf.metadata.num_rows == 1000
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [256, 256, 256, 232]
    keys = pf.read(columns=["key"]).column("key").to_pylist()
    assert keys == sorted(keys) and len(set(keys)) == 1000
    key_col = pf.schema_arrow.get_field_index("key")
    bounds = []
    for i in range(pf.num_row_groups):
        rg = pf.metadata.row_group(i)
        stats = rg.column(key_col).statistics
        assert stats is not None and stats.has_min_max
        bounds.append((stats.min, stats.max))
        assert rg.sorting_columns == (pq.SortingColumn(key_col),)
    assert bounds[0][0] == "shard-7/img00000" and bounds[-1][1] == "shard-7/img00999"
    assert all(a[1] < b[0] for a, b in zip(bounds, bounds[1:]))  # disjoint: one row group per lookup
    bitstream_col = pf.schema_arrow.get_field_index("bitstream")
    assert pf.metadata.row_group(0).column(bitstream_col).statistics is None


def test_point_lookup_reads_back_the_exact_payload(parquet_file: Path) -> None:
    wanted = next(r for r in _records(1000) if r.key == "shard-7/img00777")
    table = pq.read_table(parquet_file, filters=[("key", "=", "shard-7/img00777")])
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["bitstream"] == wanted.bitstream and row["bitstream_crc32"] == zlib.crc32(wanted.bitstream)
    assert row["status"] == "ok" and row["reason"] is None


def test_failed_rows_have_no_payload_and_a_reason(parquet_file: Path) -> None:
    table = pq.read_table(parquet_file, filters=[("status", "=", "failed")])
    assert table.num_rows == 100
    assert set(table.column("reason").to_pylist()) == {"empty_file"}
    assert table.column("bitstream").null_count == 100


def test_key_value_metadata_round_trips(parquet_file: Path) -> None:
    meta = read_metadata(str(parquet_file))
    assert meta["rdeic.format"] == "rdeic-archive" and meta["rdeic.format_version"] == "1"
    assert meta["rdeic.codec.fingerprint"] == FP and meta["rdeic.job"] == '{"x": 1}'
    assert read_metadata(io.BytesIO(parquet_file.read_bytes())) == meta


def test_readable_by_pandas_and_duckdb(parquet_file: Path) -> None:
    import duckdb

    df = pq.read_table(parquet_file).to_pandas()
    assert len(df) == 1000 and df["bitstream"].dropna().map(len).min() >= 50
    con = duckdb.connect()
    n_ok, total_bytes = con.execute(
        "SELECT count(*), sum(octet_length(bitstream)) FROM read_parquet(?) WHERE status = 'ok'", [str(parquet_file)]
    ).fetchone()
    assert n_ok == 900 and total_bytes == int(df.loc[df.status == "ok", "bitstream"].map(len).sum())
    kv = dict(con.execute("SELECT decode(key), decode(value) FROM parquet_kv_metadata(?)",
                          [str(parquet_file)]).fetchall())
    assert kv["rdeic.codec.fingerprint"] == FP


def test_duplicate_keys_are_refused() -> None:
    a = Record("s/k", "s", 0, "u", FP)
    b = Record("s/k", "s", 1, "u", FP)
    with pytest.raises(ValueError, match="duplicate archive key 's/k'"):
        build_table([a, b])


def test_empty_shard_still_writes_a_valid_file() -> None:
    data = to_parquet_bytes(build_table([]))
    table = pq.read_table(io.BytesIO(data))
    assert table.num_rows == 0 and table.schema.names == ARCHIVE_SCHEMA.names
