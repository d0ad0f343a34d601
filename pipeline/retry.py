"""``rdeic archive --retry-failed``: redo the rows of done shards that failed for a transient reason.

A done shard's file is the truth about its rows. Its rows whose failure a retry can fix
(``pipeline.failures``: out of memory while decoding or encoding) are redone, and nothing else:

    archive/<shard>.parquet --read--> rows --transient failed keys--> the source shard read again
        (every sample gets its key as in the first run; only the chosen keys are decoded and encoded)
    rows with the chosen ones replaced --sort by key--> archive/<shard>.parquet (one atomic write)
    _manifest/done/<shard>.json rewritten from the new rows (+ ``extra.retry``)

Every key stays exactly once: the new file has the same keys as the old one, and a retried row
replaces the failed row of its key. A retried row is kept failed (the old row stays) when the source
sample is gone or its bytes changed since the first run (``src_sha256`` differs). Rows that are ok,
and rows that failed for a permanent reason, are copied unchanged. The same lease checks as for a
first archive run guard both writes.

Between the two writes the marker still describes the old file; a run killed right there leaves
a marker whose counts and ``parquet_sha256`` are stale, and the next ``--retry-failed`` rewrites it
from the file (nothing to retry any more, but the marker no longer matches).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .encoder import Encoder
from .executors.errors import check_fingerprint
from .failures import is_transient
from .manifest import Manifest, OutputLocation, utc_now
from .runner import ProgressFn, ShardConfig, encode_shard, process_shard, shard_stats
from .types import STATUS_OK, Record, ShardRef, ShardStats
from .writer import ARCHIVE_SCHEMA, build_table, to_parquet_bytes

RETRY_METADATA_KEY = "rdeic.retry"


def archive_or_retry(shard: ShardRef, encoder: Encoder, out: OutputLocation, config: ShardConfig, *,
                     attempt: int = 1, worker: str = "", progress: ProgressFn | None = None) -> ShardStats:
    """The work function of a ``--retry-failed`` run: a done shard gets its failed rows redone, any other
    shard is archived from scratch (:func:`retry_failed_rows` reads the marker once and decides)."""
    return retry_failed_rows(shard, encoder, out, config, attempt=attempt, worker=worker, progress=progress)


def read_records(data: bytes) -> tuple[list[Record], dict[str, str]]:
    """The rows of an archive file as records, and its ``rdeic.*`` key-value metadata."""
    table = pq.read_table(pa.BufferReader(data))
    missing = set(ARCHIVE_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"not an archive file of this format: columns {sorted(missing)} are missing")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"rdeic.")}
    return [Record(**row) for row in table.select(ARCHIVE_SCHEMA.names).to_pylist()], meta


def retry_failed_rows(shard: ShardRef, encoder: Encoder, out: OutputLocation, config: ShardConfig, *,
                      attempt: int = 1, worker: str = "", progress: ProgressFn | None = None) -> ShardStats:
    """Redo the transiently failed rows of a done shard; returns its new marker (see the module doc).

    ``stats.extra["retry"]`` says what happened: ``rows`` retried, ``now_ok``, ``still_failed``
    (by reason), ``kept`` (source gone or changed: the old row stays).
    """
    fingerprint = check_fingerprint(encoder, config.expected_fingerprint, worker)
    t0 = time.perf_counter()
    manifest = Manifest(out)
    previous = manifest.read_done([shard.shard_id])
    if not previous:  # the marker went away since the plan was made: a plain archive run of the shard
        return process_shard(shard, encoder, out, config, attempt=attempt, worker=worker, progress=progress)
    old = previous[0]
    archive = out.archive_path(shard.shard_id)
    data = storage.read_bytes(out.fs, archive)
    records, metadata = read_records(data)
    targets = {r.key for r in records if r.status != STATUS_OK and is_transient(r.reason, r.error)}
    passes = int((old.extra.get("retry") or {}).get("passes", 0)) + 1
    info: dict[str, Any] = {"at": utc_now(), "attempt": attempt, "worker": worker, "device": encoder.device,
                            "rows": len(targets), "now_ok": 0, "still_failed": 0, "still_failed_by_reason": {},
                            "kept": 0, "kept_keys": [], "passes": passes}
    timing: dict[str, float] = {}
    if targets:
        fresh, _reader, timing = encode_shard(shard, encoder, config, select=frozenset(targets), progress=progress)
        by_key = {r.key: r for r in fresh}
        merged: list[Record] = []
        still: Counter[str] = Counter()
        for record in records:
            new = by_key.get(record.key) if record.key in targets else None
            changed = new is not None and record.src_sha256 is not None and new.src_sha256 != record.src_sha256
            if record.key in targets and (new is None or changed):
                info["kept"] += 1
                info["kept_keys"].append(record.key)
                new = None
            if new is None:
                merged.append(record)
                continue
            merged.append(new)
            if new.status == STATUS_OK:
                info["now_ok"] += 1
            else:
                still[new.reason or "unknown"] += 1
        info["still_failed"] = sum(still.values())
        info["still_failed_by_reason"] = dict(sorted(still.items()))
        records = merged
        metadata = metadata | {RETRY_METADATA_KEY: json.dumps({k: info[k] for k in ("at", "rows", "now_ok", "device")},
                                                              sort_keys=True)}
        data = to_parquet_bytes(build_table(records, metadata), config.row_group_size)
        out.check_lease()  # as for a first run: never overwrite a file of the job that holds the prefix now
        storage.write_bytes_atomic(out.fs, archive, data)
    info["seconds"] = {"total": round(time.perf_counter() - t0, 3), **{k: round(v, 3) for k, v in timing.items()}}

    stats = shard_stats(shard, records, out.to_url(archive), fingerprint, config)
    for name in ("damage", "shard_bytes_read", "attempt", "worker", "device", "started_at", "finished_at", "seconds",
                 "images_per_s"):
        setattr(stats, name, getattr(old, name))  # the first run's figures; the retry's are in extra.retry
    stats.parquet_bytes, stats.parquet_sha256 = len(data), hashlib.sha256(data).hexdigest()
    stats.row_groups = -(-len(records) // config.row_group_size)
    stale = (old.parquet_sha256 != stats.parquet_sha256
             or (old.rows, old.ok, old.failed, old.failed_by_reason) != (stats.rows, stats.ok, stats.failed,
                                                                          stats.failed_by_reason))
    info["kept_keys"] = info["kept_keys"][: config.max_failed_keys]
    stats.extra = dict(old.extra) | {"retry": info}
    if targets or stale:  # else nothing was redone and the marker matches the file: it is left as it is
        manifest.mark_done(stats)  # the marker now describes the new file
    return stats
