"""``rdeic inspect``: what an archive file or prefix holds, without decoding anything.

    rdeic inspect s3://bucket/archive-v1/archive/000123.parquet    # one file
    rdeic inspect s3://bucket/archive-v1                           # a whole output prefix
    rdeic inspect ... [--json] [--storage-options JSON]

Shows the Parquet schema, the ``rdeic.*`` key-value metadata (format version, codec name and
fingerprint, entropy-table digest, library versions, the job config), row and row-group counts,
status/reason counts and bpp statistics. For a prefix, only shards with a done marker count
(docs/archive-format.md §1); Parquet files without one are reported as leftovers.

Reads the footers plus the small columns (status, reason, bpp, width, height), never the
bitstreams, so it is cheap on large archives. Exit status: 0, 1 when the target is not an
archive (or not readable), 2 for bad options.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..exits import EXIT_OK, PlainError, run_command
from ..options import json_object

HELP = 'summary and metadata of an archive file or prefix'

STAT_COLUMNS = ["status", "reason", "bpp", "width", "height"]
_JSON_KEYS = ("rdeic.schema_columns", "rdeic.model.hashes", "rdeic.versions", "rdeic.job", "rdeic.shard")


class NotAnArchiveError(PlainError, ValueError):
    """The target is neither an archive Parquet file nor an output prefix holding some (or does not exist).

    Printed as ``rdeic inspect: MESSAGE``; exit 1.
    """


def decode_metadata(raw: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The ``rdeic.*`` footer entries as str (JSON-valued ones parsed)."""
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        key = k.decode("utf-8", "replace")
        if not key.startswith("rdeic."):
            continue
        value: Any = v.decode("utf-8", "replace")
        if key in _JSON_KEYS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def _schema(schema: Any) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def table_stats(table: Any) -> dict[str, Any]:
    """Status/reason counts, bpp statistics and bitstream bytes of a table of STAT_COLUMNS."""
    import numpy as np
    import pyarrow.compute as pc

    status = table.column("status").to_pylist()
    reasons = [r for r, s in zip(table.column("reason").to_pylist(), status) if s != "ok"]
    counts: dict[str, int] = {}
    for s in status:
        counts[s] = counts.get(s, 0) + 1
    by_reason: dict[str, int] = {}
    for r in reasons:
        by_reason[str(r)] = by_reason.get(str(r), 0) + 1
    ok = pc.equal(table.column("status"), "ok")
    bpp = np.asarray(pc.filter(table.column("bpp"), ok).to_pylist(), dtype=np.float64)
    w = np.asarray(pc.filter(table.column("width"), ok).to_pylist(), dtype=np.float64)
    h = np.asarray(pc.filter(table.column("height"), ok).to_pylist(), dtype=np.float64)
    stats: dict[str, Any] = {"rows": table.num_rows, "status": dict(sorted(counts.items())),
                             "failed_by_reason": dict(sorted(by_reason.items())), "bpp": None,
                             "bitstream_bytes": int(np.rint(bpp * w * h / 8).sum()) if len(bpp) else 0,
                             "pixels": int((w * h).sum()) if len(bpp) else 0}
    if len(bpp):
        stats["bpp"] = {"mean": float(bpp.mean()), "min": float(bpp.min()), "p50": float(np.percentile(bpp, 50)),
                        "p95": float(np.percentile(bpp, 95)), "max": float(bpp.max()),
                        "pixel_weighted": float((bpp * w * h).sum() / (w * h).sum())}
    return stats


def inspect_file(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Schema, metadata, counts and stats of one archive Parquet file."""
    import pyarrow.parquet as pq

    from pipeline import storage

    fs, path = storage.filesystem(storage.normalize_url(url), storage_options or {})
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            meta = decode_metadata(pf.schema_arrow.metadata)
            if meta.get("rdeic.format") != "rdeic-archive":
                raise NotAnArchiveError(f"{url} is a Parquet file but not an RDEIC archive (no rdeic.format)")
            table = pf.read(columns=STAT_COLUMNS)
            info = {"kind": "file", "url": url, "bytes": fs.size(path), "row_groups": pf.num_row_groups,
                    "schema": _schema(pf.schema_arrow), "metadata": meta}
    except (OSError, ValueError) as exc:
        if isinstance(exc, NotAnArchiveError):
            raise
        raise NotAnArchiveError(f"cannot read {url} as Parquet: {exc}") from None
    return info | table_stats(table)


def inspect_prefix(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The output prefix: run.json, complete shards' files (footers + small columns), leftovers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.manifest import ARCHIVE_DIR, RUN_FILE, Manifest, OutputLocation

    out = OutputLocation(url, storage_options or {})
    run_path = out.path(RUN_FILE)
    run = json.loads(storage.read_bytes(out.fs, run_path)) if storage.exists(out.fs, run_path) else None
    files = [n for n in storage.list_names(out.fs, out.path(ARCHIVE_DIR)) if n.endswith(".parquet")]
    if run is None and not files:
        raise NotAnArchiveError(f"{out.url} holds no archive ({RUN_FILE} and {ARCHIVE_DIR}/*.parquet missing)")
    done = Manifest(out).done_shards()
    complete = sorted(n for n in files if n[: -len(".parquet")] in done)
    leftovers = sorted(n for n in files if n[: -len(".parquet")] not in done)
    tables, row_groups, size, meta, schema = [], 0, 0, {}, None
    for name in complete:
        path = out.archive_path(name[: -len(".parquet")])
        with out.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            row_groups += pf.num_row_groups
            if schema is None:
                schema, meta = pf.schema_arrow, decode_metadata(pf.schema_arrow.metadata)
            tables.append(pf.read(columns=STAT_COLUMNS))
        size += out.fs.size(path)
    table = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], type=t) for c, t in (
        ("status", pa.string()), ("reason", pa.string()), ("bpp", pa.float32()), ("width", pa.int32()),
        ("height", pa.int32()))})
    info = {"kind": "prefix", "url": out.url, "files": len(complete), "leftover_files": leftovers,
            "missing_files": sorted(done - {n[: -len(".parquet")] for n in files}),
            "bytes": size, "row_groups": row_groups, "run": run,
            "schema": _schema(schema) if schema is not None else None, "metadata": meta}
    return info | table_stats(table)


def inspect_target(target: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`inspect_file` or :func:`inspect_prefix`; NotAnArchiveError also when the target does not exist."""
    from pipeline import storage

    try:
        fs, path = storage.filesystem(storage.normalize_url(target), storage_options or {})
        if target.endswith(".parquet") or (storage.exists(fs, path) and fs.isfile(path)):
            return inspect_file(target, storage_options)
        return inspect_prefix(target, storage_options)
    except FileNotFoundError as exc:
        raise NotAnArchiveError(f"not found: {exc}") from None


def format_inspect(info: dict[str, Any]) -> str:
    meta = info.get("metadata") or {}
    lines = [f"{info['kind']} {info['url']}: {info['rows']} rows"
             + (f" in {info['files']} complete shard file(s)" if info["kind"] == "prefix" else "")
             + f", {info['row_groups']} row group(s), {info['bytes']} bytes"]
    if meta:
        lines.append(f"  format: {meta.get('rdeic.format')} v{meta.get('rdeic.format_version')}")
        lines.append(f"  codec: {meta.get('rdeic.codec.name')} fingerprint {meta.get('rdeic.codec.fingerprint')}")
        lines.append(f"  entropy tables: {meta.get('rdeic.codec.entropy_table_digest')}; codec "
                     f"{meta.get('rdeic.codec.version')}, bitstream v{meta.get('rdeic.codec.bitstream_version')}")
        versions = meta.get("rdeic.versions")
        if isinstance(versions, dict):
            lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        if meta.get("rdeic.device"):
            lines.append(f"  device: {meta['rdeic.device']}  created {meta.get('rdeic.created_at')}")
        job = meta.get("rdeic.job")
        if isinstance(job, dict):
            lines.append("  job: " + json.dumps(job, sort_keys=True))
    elif info.get("run"):
        codec = info["run"].get("codec", {})
        lines.append(f"  codec: {codec.get('name')} fingerprint {codec.get('fingerprint')} (from run.json)")
    lines.append("  status: " + (", ".join(f"{k}={v}" for k, v in info["status"].items()) or "(no rows)"))
    if info["failed_by_reason"]:
        lines.append("  failed by reason: " + ", ".join(f"{k}={v}" for k, v in info["failed_by_reason"].items()))
    if info["bpp"]:
        b = info["bpp"]
        lines.append(f"  bpp: mean {b['mean']:.4f}, min {b['min']:.4f}, p50 {b['p50']:.4f}, p95 {b['p95']:.4f}, "
                     f"max {b['max']:.4f} (pixel-weighted {b['pixel_weighted']:.4f}); "
                     f"{info['bitstream_bytes']} bitstream bytes")
    if info.get("schema"):
        lines.append("  schema: " + ", ".join(f"{c['name']}:{c['type']}{'' if c['nullable'] else ' not null'}"
                                              for c in info["schema"]))
    if info.get("leftover_files"):
        lines.append(f"  leftover files without a done marker (ignored): {', '.join(info['leftover_files'])}")
    if info.get("missing_files"):
        lines.append(f"  done markers without a file (!): {', '.join(info['missing_files'])}")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="ARCHIVE_FILE_OR_PREFIX")
    p.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                   help="fsspec options for remote storage, JSON or @file.json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=lambda args: run_command("inspect", lambda: run(args)))
    return p


def run(args: argparse.Namespace) -> int:
    info = inspect_target(args.target, args.storage_options)
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspect(info))
    return EXIT_OK
