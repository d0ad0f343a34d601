"""The output prefix: where archives and markers live, and the rules that make resume safe.

Layout under the output URL (docs/archive-format.md)::

    run.json                          codec identity + format version, written once by the first run
    archive/<shard>.parquet           one archive per input shard (deterministic name)
    _manifest/done/<shard>.json       the shard's stats; written LAST, so it means "archive complete"
    _manifest/failed/<shard>.json     last error of a shard that failed after its retries
    _manifest/runs/<started>-<id>.json summary of each invocation; _manifest/summary.json = latest
    _lease.json                       which live job may write here (``pipeline.lease``)

Storage artifacts are the truth: a shard is done exactly when its marker exists; a Parquet file
without a marker is a leftover of an interrupted attempt and gets overwritten by the redo. The
codec fingerprint in ``run.json`` is compared on every run, so one prefix never mixes codecs.
While a job holds the prefix's lease, every marker and summary write first checks that it still
does (:meth:`OutputLocation.check_lease`), so a job that lost the prefix to another stops writing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec

from . import storage
from .encoder import CodecIdentity
from .types import ShardStats
from .writer import ARCHIVE_FORMAT, FORMAT_VERSION

ARCHIVE_DIR = "archive"
MANIFEST_DIR = "_manifest"
RUN_FILE = "run.json"
JOB_SPEC_FILE = "job.yaml"  # the latest run's resolved settings, rerunnable with --config
LEASE_FILE = "_lease.json"


class OutputConflictError(ValueError):
    """The output prefix holds an archive this run must not add to (other codec, newer format)."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class OutputLocation:
    """The output prefix (URL + storage options); picklable, the filesystem is created lazily."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = storage.normalize_url(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None
        # The job's hold on the prefix (a pipeline.lease.LeaseRef), set by the driver while it holds
        # the lease; it travels with the location to every worker.
        self.lease: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options, "lease": self.lease}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]
        self.lease = state.get("lease")

    def check_lease(self) -> None:
        """Raise ``pipeline.lease.LeaseLostError`` when this job's lease has passed to another job.

        A no-op without a lease (tests, tools). One small read per call: called before each
        shard's output and marker writes, not per row.
        """
        if self.lease is not None:
            self.lease.check(self)

    def __repr__(self) -> str:
        return f"OutputLocation({self.url!r})"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, self._root = storage.filesystem(self.url, self.storage_options)
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - resolves _root
        return self._root  # type: ignore[return-value]

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def to_url(self, path: str) -> str:
        return storage.to_url(self.fs, path)

    def archive_path(self, shard_id: str) -> str:
        return self.path(ARCHIVE_DIR, f"{shard_id}.parquet")

    def done_path(self, shard_id: str) -> str:
        return self.path(MANIFEST_DIR, "done", f"{shard_id}.json")

    def failed_path(self, shard_id: str) -> str:
        return self.path(MANIFEST_DIR, "failed", f"{shard_id}.json")

    def lease_path(self) -> str:
        return self.path(LEASE_FILE)


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Guard:
    """The file that pins an output prefix to one set of settings (``Manifest.claim``): ``record()`` is what
    the first run writes, ``check(existing)`` raises OutputConflictError when this run may not add to it."""

    name: str
    record: Callable[[], dict[str, Any]]
    check: Callable[[dict[str, Any]], None]


class Manifest:
    """Reads and writes the run file and the per-shard markers of one output prefix."""

    def __init__(self, out: OutputLocation) -> None:
        self.out = out

    # ------------------------------------------------------------------ run.json
    def claim(self, guard: Guard) -> dict[str, Any]:
        """The output's guard file: written with ``guard.record()`` for a new prefix, else read and passed to
        ``guard.check`` (which raises OutputConflictError when this run may not add to the prefix).

        One guard for every job: ``run.json`` pins an archive to its codec, ``restore.json`` and
        ``audit.json`` pin their outputs to the archive and settings that made them. A prefix with done
        markers but no guard file is refused: nothing says how those shards were made.
        """
        fs, path = self.out.fs, self.out.path(guard.name)
        if storage.exists(fs, path):
            existing = json.loads(storage.read_bytes(fs, path))
            guard.check(existing)
            return existing
        if self.done_shards():
            raise OutputConflictError(f"{self.out.url} has done markers but no {guard.name}; refusing to guess how "
                                      "they were made")
        new = guard.record()
        storage.write_bytes_atomic(fs, path, _dump(new))
        return new

    def run_guard(self, identity: CodecIdentity, job_config: dict[str, Any]) -> Guard:
        """``run.json``: an archive prefix holds one codec and one archive format."""
        return Guard(RUN_FILE, lambda: {"format": ARCHIVE_FORMAT, "format_version": FORMAT_VERSION,
                                        "codec": identity.to_dict(), "created_at": utc_now(), "job": job_config},
                     lambda run: self._check_run(run, identity))

    def settings_guard(self, name: str, settings: dict[str, Any], extra: dict[str, Any]) -> Guard:
        """``<name>`` holding ``settings`` (what must not change between the runs that fill this output) and
        ``extra`` (recorded, not compared)."""

        def check(existing: dict[str, Any]) -> None:
            before = existing.get("settings", {})
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            if diff:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
                raise OutputConflictError(
                    f"refusing to add to {self.out.url}: it was written with other settings ({shown}). "
                    "Use a new --output, or rerun with the settings that wrote it.")

        return Guard(name, lambda: {"settings": settings, **extra, "created_at": utc_now()}, check)

    def _check_run(self, run: dict[str, Any], identity: CodecIdentity) -> None:
        where = self.out.to_url(self.out.path(RUN_FILE))
        if run.get("format") != ARCHIVE_FORMAT:
            raise OutputConflictError(f"{where} is not an {ARCHIVE_FORMAT} run file (format={run.get('format')!r})")
        if int(run.get("format_version", 0)) > FORMAT_VERSION:
            raise OutputConflictError(
                f"{where} has archive format version {run['format_version']}; this version writes "
                f"{FORMAT_VERSION} and must not add to it"
            )
        codec = run.get("codec", {})
        if codec.get("fingerprint") != identity.fingerprint:
            raise OutputConflictError(
                f"refusing to write into {self.out.url}: it was archived with codec {codec.get('name')!r} "
                f"fingerprint {codec.get('fingerprint')}, but this run's codec {identity.name!r} has fingerprint "
                f"{identity.fingerprint}. One output prefix holds one codec: choose a new --output, or rerun "
                f"with the model that wrote it."
            )

    # ------------------------------------------------------------------ markers
    def done_shards(self) -> set[str]:
        names = storage.list_names(self.out.fs, self.out.path(MANIFEST_DIR, "done"))
        return {n[: -len(".json")] for n in names if n.endswith(".json")}

    def read_done(self, shard_ids: list[str] | None = None) -> list[ShardStats]:
        """Stats of done shards (all of them by default), read concurrently where the store allows."""
        ids = sorted(self.done_shards()) if shard_ids is None else list(shard_ids)
        if not ids:
            return []
        paths = [self.out.done_path(s) for s in ids]
        blobs = {k.rsplit("/", 1)[-1]: v for k, v in self.out.fs.cat(paths, on_error="return").items()}
        stats = []
        for shard_id, path in zip(ids, paths):
            blob = blobs.get(f"{shard_id}.json")
            if isinstance(blob, FileNotFoundError):
                continue  # no such marker (asked for a shard that is not done)
            if not isinstance(blob, bytes):  # failed after the library's retries: once more, with ours
                try:
                    blob = storage.read_bytes(self.out.fs, path)
                except FileNotFoundError:
                    continue
            stats.append(ShardStats.from_dict(json.loads(blob)))
        return stats

    def mark_done(self, stats: ShardStats) -> None:
        """Write the done marker (after the archive!) and drop a stale failure marker."""
        self.out.check_lease()
        storage.write_bytes_atomic(self.out.fs, self.out.done_path(stats.shard_id), _dump(stats.to_dict()))
        storage.remove_if_exists(self.out.fs, self.out.failed_path(stats.shard_id))

    def mark_failed(self, shard_id: str, url: str, error: str, attempts: int) -> None:
        record = {"shard_id": shard_id, "url": url, "error": error, "attempts": attempts, "at": utc_now()}
        self.out.check_lease()
        storage.write_bytes_atomic(self.out.fs, self.out.failed_path(shard_id), _dump(record))

    def write_summary(self, summary: dict[str, Any]) -> str:
        """Store a run summary under ``_manifest/runs/`` and as ``_manifest/summary.json``; returns its URL."""
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{summary.get('run_id', 'run')}.json"
        data = _dump(summary)
        path = self.out.path(MANIFEST_DIR, "runs", name)
        self.out.check_lease()
        storage.write_bytes_atomic(self.out.fs, path, data)
        storage.write_bytes_atomic(self.out.fs, self.out.path(MANIFEST_DIR, "summary.json"), data)
        return self.out.to_url(path)
