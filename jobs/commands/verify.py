"""``rdeic verify``: reconcile an archive with its source shards, by key and by content.

    rdeic verify s3://b/archive-v1 --source 's3://b/shards/{000000..000999}.tar'
                 [--storage-options JSON] [--json report.json] [--workers N] [--max-listed N]

Counts can agree while rows are lost and others duplicated, so this compares keys and bytes.
The source shards are read again (the same streaming reader the archive job uses, with its
retries), each sample is given the key the archive job gives it, and the archive's complete
shards (those with a done marker; a Parquet file without one is a leftover, never read) are
checked against them:

* **missing**: a source key with no row in the archive (its shard not done, or the row absent);
* **duplicate**: a key with more than one row (in one file, or a row stored in another shard's file);
* **unexpected**: an archive row whose key is no source key;
* **hash_mismatch**: a row whose ``src_sha256`` is not the sha256 of the source member named by
  its ``src_member`` (or an archived row without a hash, or naming a member the source lacks);
* **failed_without_reason**: a row that is not ``ok`` and has an empty ``reason``;
* **source_unreadable** / **archive_unreadable**: a file that could not be read after retries.

A damaged source shard (cut off, bad header) is reported, not a problem: its keys are those the
reader can still see, exactly what the archive job could see.

Exit status: 0 when the archive is clean, 1 when any problem was found (listed, and in
``--json``), 2 for usage errors (bad options, a prefix that is not an archive, sources that
name no shards).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import storage
from pipeline.archives import ArchiveLocation, ArchiveReadError, read_rows
from pipeline.manifest import ARCHIVE_DIR
from pipeline.reader import DEFAULT_MAX_MEMBER_BYTES, ShardReader
from pipeline.runner import archive_key
from pipeline.shards import expand_inputs
from pipeline.types import STATUS_OK, ShardRef

from ..exits import EXIT_FAILED, EXIT_OK, UsageError, run_command
from ..options import json_object

HELP = 'reconcile an archive with its source shards: every key once, source hashes match'

log = logging.getLogger(__name__)

PROBLEM_KINDS = ("missing", "duplicate", "unexpected", "hash_mismatch", "failed_without_reason",
                 "source_unreadable", "archive_unreadable")
ROW_COLUMNS = ["key", "status", "reason", "src_member", "src_sha256"]
DEFAULT_WORKERS = 8
DEFAULT_MAX_LISTED = 50
# Whole-shard attempts when reading a file fails (on top of the storage libraries' own retries).
SHARD_ATTEMPTS = 3


class VerifyUsageError(UsageError, ValueError):
    """The verification cannot start as asked (not an archive, sources naming nothing, ...). Exit 2."""


@dataclass(frozen=True)
class Problem:
    kind: str
    shard: str
    key: str | None
    detail: str


@dataclass
class VerifyReport:
    """What ``verify_archive`` found; ``clean`` when no problem of any kind."""

    archive: str
    sources: list[str]
    source_shards: int = 0
    source_keys: int = 0
    archive_shards: int = 0
    archive_rows: int = 0
    ok: int = 0
    failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    hashes_checked: int = 0
    hashes_matched: int = 0
    problem_counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)  # at most max_listed per kind
    problems_truncated: bool = False
    damaged_sources: list[dict[str, Any]] = field(default_factory=list)
    shards_not_done: list[str] = field(default_factory=list)
    leftover_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not any(self.problem_counts.values())

    def count(self, kind: str) -> int:
        return self.problem_counts.get(kind, 0)

    def keys(self, kind: str) -> list[str]:
        """The listed keys of one problem kind."""
        return [p.key for p in self.problems if p.kind == kind and p.key is not None]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["clean"] = self.clean
        return out


@dataclass
class _ShardResult:
    shard: str
    source_keys: int = 0
    rows: int = 0
    ok: int = 0
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    hashes_checked: int = 0
    hashes_matched: int = 0
    damage: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    misplaced: list[tuple[str, str]] = field(default_factory=list)  # (key, owner shard) stored here


def _row_problems(shard: str, rows: list[dict[str, Any]], result: _ShardResult) -> dict[str, dict[str, Any]]:
    """Rows by key; duplicate, misplaced and reasonless rows recorded. Counts go into ``result``."""
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row["key"]
        result.rows += 1
        if row["status"] == STATUS_OK:
            result.ok += 1
        else:
            result.failed_by_reason[row["reason"] or ""] += 1
            if not (row["reason"] or "").strip():
                result.problems.append(Problem("failed_without_reason", shard, key,
                                               f"status {row['status']!r} with an empty reason"))
        owner = key.partition("/")[0]
        if owner != shard:
            result.misplaced.append((key, owner))
            continue
        if key in by_key:
            result.problems.append(Problem("duplicate", shard, key, f"two rows in the archive file of {shard}"))
            continue
        by_key[key] = row
    return by_key


def _compare(ref: ShardRef, rows: list[dict[str, Any]], done: bool, options: dict[str, Any],
             max_member_bytes: int) -> _ShardResult:
    """Read the source shard and reconcile its samples with the archive rows of its file."""
    result = _ShardResult(ref.shard_id)
    by_key = _row_problems(ref.shard_id, rows, result)
    seen: set[str] = set()
    taken: set[str] = set()
    reader = ShardReader(ref.url, options, max_member_bytes)
    for sample in reader:
        key = archive_key(ref.shard_id, sample, taken)
        result.source_keys += 1
        row = by_key.get(key)
        if row is None:
            why = "its shard has no done marker" if not done else "no row with this key in the shard's archive file"
            result.problems.append(Problem("missing", ref.shard_id, key, why))
            continue
        seen.add(key)
        stored, name = row["src_sha256"], row["src_member"]
        if stored is None:
            if row["status"] == STATUS_OK:
                result.problems.append(Problem("hash_mismatch", ref.shard_id, key, "archived row without src_sha256"))
            continue
        member = next((m for m in sample.members if m.name == name), None)
        if member is None or member.data is None:
            what = "is not in the source sample" if member is None else "was not read (over the member size limit)"
            result.problems.append(Problem("hash_mismatch", ref.shard_id, key, f"src_member {name!r} {what}"))
            continue
        result.hashes_checked += 1
        actual = hashlib.sha256(member.data).digest()
        if actual == stored:
            result.hashes_matched += 1
        else:
            result.problems.append(Problem("hash_mismatch", ref.shard_id, key,
                                           f"src_sha256 {bytes(stored).hex()[:16]}... but {name} hashes to "
                                           f"{actual.hex()[:16]}..."))
    if reader.damage is not None:
        result.damage = {"shard": ref.shard_id, **reader.damage.to_dict()}
    for key in sorted(set(by_key) - seen):
        result.problems.append(Problem("unexpected", ref.shard_id, key, "archive row with no such source key"))
    return result


def _with_retries(what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, tried SHARD_ATTEMPTS times with backoff unless the file is missing."""
    for attempt in range(1, SHARD_ATTEMPTS):
        try:
            return fn(*args)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as exc:  # noqa: BLE001 - storage hiccup or a corrupt file: try again, then report
            pause = storage.backoff_pause(attempt + 1)
            log.warning("verify: %s failed (%s: %s); again in %.1fs", what, type(exc).__name__, exc, pause)
            time.sleep(pause)
    return fn(*args)  # the last attempt: what it raises is reported


def _check_shard(ref: ShardRef, archive: ArchiveLocation, done: bool, options: dict[str, Any],
                 max_member_bytes: int) -> _ShardResult:
    """Reconcile one source shard with its archive file (if the shard is done); failures become problems."""
    try:
        rows = _archive_rows(archive, ref.shard_id, options) if done else []
    except Exception as exc:  # noqa: BLE001 - reported; the other shards are still verified
        result = _ShardResult(ref.shard_id)
        result.problems.append(Problem("archive_unreadable", ref.shard_id, None, f"{type(exc).__name__}: {exc}"))
        return result
    try:
        return _with_retries(f"source shard {ref.url}", _compare, ref, rows, done, options, max_member_bytes)
    except Exception as exc:  # noqa: BLE001 - reported as a problem
        result = _ShardResult(ref.shard_id)
        result.problems.append(Problem("source_unreadable", ref.shard_id, None, f"{ref.url}: {type(exc).__name__}: "
                                                                                 f"{exc}"))
        return result


def _archive_rows(archive: ArchiveLocation, shard_id: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    return _with_retries(f"archive file of {shard_id}", read_rows, archive.shard_url(shard_id), options,
                         ROW_COLUMNS)


def verify_archive(archive_url: str, sources: Sequence[str] | str, storage_options: dict[str, Any] | None = None,
                   *, workers: int = DEFAULT_WORKERS, max_listed: int = DEFAULT_MAX_LISTED) -> VerifyReport:
    """Reconcile the archive at ``archive_url`` with the source shards named by ``sources``.

    Raises VerifyUsageError when the archive prefix is not an archive or the sources name no shard.
    """
    t0 = time.perf_counter()
    options = dict(storage_options or {})
    sources = [sources] if isinstance(sources, str) else list(sources)
    if workers < 1:
        raise VerifyUsageError(f"--workers must be >= 1, got {workers}")
    archive = ArchiveLocation(archive_url, options)
    try:
        run = archive.read_run()
    except ArchiveReadError as exc:
        raise VerifyUsageError(str(exc)) from None
    try:
        refs = expand_inputs(sources, options)
    except (ValueError, FileNotFoundError) as exc:
        raise VerifyUsageError(f"--source: {exc}") from None
    max_member_bytes = int((run.get("job") or {}).get("max_member_bytes") or DEFAULT_MAX_MEMBER_BYTES)
    done = {s.shard_id for s in archive.complete_shards()}
    source_ids = {r.shard_id for r in refs}

    report = VerifyReport(archive=archive.url, sources=sources, source_shards=len(refs), archive_shards=len(done))
    reasons: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    listed: list[Problem] = []  # at most max_listed per kind, in shard order
    misplaced: list[tuple[str, str, str]] = []

    def add(problems: list[Problem]) -> None:
        for p in problems:
            counts[p.kind] += 1
            if counts[p.kind] <= max_listed:
                listed.append(p)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        # archive shards no source names come last: every row of theirs is unexpected
        checks = pool.map(lambda r: _check_shard(r, archive, r.shard_id in done, options, max_member_bytes), refs)
        extras = pool.map(lambda s: _extra_shard(archive, s, options), sorted(done - source_ids))
        for r in itertools.chain(checks, extras):  # merged as they finish: memory holds one shard's result
            report.source_keys += r.source_keys
            report.archive_rows += r.rows
            report.ok += r.ok
            reasons.update(r.failed_by_reason)
            report.hashes_checked += r.hashes_checked
            report.hashes_matched += r.hashes_matched
            if r.damage:
                report.damaged_sources.append(r.damage)
            add(r.problems)
            misplaced.extend((key, owner, r.shard) for key, owner in r.misplaced)
    add(_misplaced_problems(archive, misplaced, done, source_ids, options))
    report.failed = sum(reasons.values())
    report.failed_by_reason = dict(sorted(reasons.items()))
    report.shards_not_done = sorted(source_ids - done)
    report.leftover_files = _leftovers(archive, done)
    report.problem_counts = {k: counts.get(k, 0) for k in PROBLEM_KINDS}
    report.problems = sorted(listed, key=lambda p: (PROBLEM_KINDS.index(p.kind), p.shard, p.key or ""))
    report.problems_truncated = sum(counts.values()) > len(listed)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _extra_shard(archive: ArchiveLocation, shard_id: str, options: dict[str, Any]) -> _ShardResult:
    result = _ShardResult(shard_id)
    try:
        rows = _archive_rows(archive, shard_id, options)
    except Exception as exc:  # noqa: BLE001 - reported as a problem
        result.problems.append(Problem("archive_unreadable", shard_id, None, f"{type(exc).__name__}: {exc}"))
        return result
    for key in _row_problems(shard_id, rows, result):
        result.problems.append(Problem("unexpected", shard_id, key, f"no source names shard {shard_id!r}"))
    return result


def _misplaced_problems(archive: ArchiveLocation, misplaced: list[tuple[str, str, str]], done: set[str],
                        source_ids: set[str], options: dict[str, Any]) -> list[Problem]:
    """Rows stored in another shard's file: a duplicate when the owner's file holds the key too."""
    out = []
    owner_keys: dict[str, set[str]] = {}
    for key, owner, holder in misplaced:
        if owner not in owner_keys:
            try:
                owner_keys[owner] = ({r["key"] for r in _archive_rows(archive, owner, options)}
                                     if owner in done else set())
            except Exception:  # noqa: BLE001 - the owner's own check reports it unreadable
                owner_keys[owner] = set()
        if key in owner_keys[owner]:
            out.append(Problem("duplicate", holder, key, f"in the archive file of {owner} and again in that of "
                                                         f"{holder}"))
        else:
            where = "" if owner in source_ids else " (no source names that shard)"
            out.append(Problem("unexpected", holder, key, f"stored in the archive file of {holder}, not of "
                                                          f"{owner}{where}"))
    return out


def _leftovers(archive: ArchiveLocation, done: set[str]) -> list[str]:
    """Archive files without a done marker (leftovers of interrupted attempts; never read)."""
    names = storage.list_names(archive.out.fs, archive.out.path(ARCHIVE_DIR))
    return sorted(n for n in names if n.endswith(".parquet") and n[: -len(".parquet")] not in done)


# ------------------------------------------------------------------------------------------ output
def format_report(report: VerifyReport) -> str:
    state = "CLEAN" if report.clean else f"{sum(report.problem_counts.values())} PROBLEM(S)"
    lines = [
        f"verify {report.archive} against {report.source_shards} source shard(s): {state}",
        f"  source keys: {report.source_keys}; archive rows: {report.archive_rows} in {report.archive_shards} "
        f"done shard(s) ({report.ok} ok, {report.failed} failed)",
        f"  source hashes: {report.hashes_checked} checked, {report.hashes_matched} match",
        "  problems: " + ", ".join(f"{k}={v}" for k, v in report.problem_counts.items()),
    ]
    if report.failed_by_reason:
        lines.append("  failed by reason: " + ", ".join(f"{k or '(empty)'}={v}"
                                                         for k, v in report.failed_by_reason.items()))
    for d in report.damaged_sources:
        lines.append(f"  damaged source shard {d['shard']} (keys after the damage cannot be listed): {d['message']}")
    if report.shards_not_done:
        shown = ", ".join(report.shards_not_done[:10]) + (" ..." if len(report.shards_not_done) > 10 else "")
        lines.append(f"  source shards without a done marker: {shown}")
    if report.leftover_files:
        lines.append(f"  leftover archive files without a done marker (ignored): {len(report.leftover_files)}")
    for p in report.problems:
        lines.append(f"  {p.kind.upper()} {p.key or p.shard}: {p.detail}")
    if report.problems_truncated:
        lines.append("  (more problems not listed; see --max-listed)")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("verify", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", metavar="ARCHIVE", help="archive prefix written by `rdeic archive`")
    p.add_argument("--source", action="append", required=True, metavar="PATTERN",
                   help="the source shards: brace pattern, glob, @list.txt or URL; repeatable")
    p.add_argument("--storage-options", type=json_object, default={}, metavar="JSON",
                   help="fsspec options for remote storage (archive and sources), JSON or @file.json")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="shards verified concurrently")
    p.add_argument("--max-listed", type=int, default=DEFAULT_MAX_LISTED, metavar="N",
                   help="problems listed per kind (all are counted)")
    p.set_defaults(func=lambda args: run_command("verify", lambda: run(args)))
    return p


def run(args: argparse.Namespace) -> int:
    # the S3 endpoint from AWS_ENDPOINT_URL(_S3) when the options name none, like the other jobs
    options = storage.with_env_endpoint([*args.source, args.archive], args.storage_options)
    if args.max_listed < 0:
        raise VerifyUsageError(f"--max-listed must be >= 0, got {args.max_listed}")
    report = verify_archive(args.archive, args.source, options, workers=args.workers, max_listed=args.max_listed)
    print(format_report(report))
    if args.json_path:
        fs, path = storage.filesystem(args.json_path, options)
        storage.write_bytes_atomic(fs, path, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return EXIT_OK if report.clean else EXIT_FAILED
