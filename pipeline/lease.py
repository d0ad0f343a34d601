"""One live job per output prefix: a lease object on the store itself, ``<output>/_lease.json``.

A job (archive, restore or audit) takes the lease before it touches its output, renews it from a
heartbeat thread while it runs, and releases it at the end. A second job that finds a live lease
of another job is refused (:class:`LeaseHeldError`, ``rdeic`` exit status 75) with a message naming
the holder and when its lease expires. A lease is free again when it was released, when it expired
(no heartbeat for ``ttl_s``), when its holder's process is gone (same machine only: host, boot id and
PID namespace equal, PID not running), or when an operator breaks it (``--break-lease``).

The record (JSON)::

    {"lease_format": 1, "owner": "archive:1a2b3c4d@host-7:4242", "token": "<random, per acquisition>",
     "job": "archive", "run_id": "1a2b3c4d", "host": "host-7", "pid": 4242, "boot_id": "...", "pid_ns": 4026531836,
     "started": "<UTC ISO>", "heartbeat": "<UTC ISO>", "expires": "<UTC ISO>", "expires_unix": 1.7e9,
     "ttl_s": 60.0, "heartbeat_s": 10.0, "renewals": 12, "mode": "conditional-put",
     "released": null, "took_over": null | {"owner": ..., "why": "expired" | "released" | ...}}

Every write of the record is a compare-and-swap, so two jobs can never both believe they took it:

* **S3** (``mode: conditional-put``): ``PutObject`` with ``If-None-Match: *`` to create and
  ``If-Match: <ETag read>`` to take over, renew or release (AWS S3 since 2024, MinIO, moto >= 5).
  A store that ignores these headers is detected by a probe before the first write, and the job
  falls back to read-back (below).
* **Local paths** (``mode: local-lock``): an exclusive ``flock`` on the output directory around
  every read-compare-write (one machine; not over NFS).
* **Anything else** (``mode: read-back``): compare, write, wait ``settle_s``, read back and compare
  the token. Two jobs can both win only if one's read-then-write takes longer than the settle
  delay (docs/guarantees.md).

A lost acknowledgement (the store executed the PUT, the answer was lost, the retry failed its
condition) is recognised by reading the record back: if it is byte for byte what we wrote, it is ours.

The holder's workers carry a :class:`LeaseRef` (on the ``OutputLocation``) and check it before
each shard's output and done marker (:meth:`LeaseRef.check`): a job whose lease passed to another
stops with :class:`LeaseLostError` instead of overwriting that job's files. The check and the write
are two requests, so a write can still land just after a takeover: at most one shard per worker.

Clocks: expiry compares the reader's clock with the holder's ``expires_unix``; hosts must agree on
the time to well within ``ttl_s - heartbeat_s`` (NTP does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import fsspec

from . import storage
from .executors.errors import FatalShardError
from .manifest import Manifest, OutputLocation, _dump

log = logging.getLogger(__name__)

LEASE_FORMAT = 1
DEFAULT_TTL_S = 60.0
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_SETTLE_S = 2.0
TTL_ENV, HEARTBEAT_ENV, SETTLE_ENV = "RDEIC_LEASE_TTL_S", "RDEIC_LEASE_HEARTBEAT_S", "RDEIC_LEASE_SETTLE_S"
ACQUIRE_TRIES = 8


# ------------------------------------------------------------------------------------ errors
class LeaseHeldError(RuntimeError):
    """Another live job holds the output's lease; the message names it and when the lease expires."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class LeaseLostError(FatalShardError):
    """This job's lease passed to another job (taken over after expiry, or broken): stop writing."""


class LeaseContendedError(RuntimeError):
    """The lease changed hands under every try (many jobs starting at once); try again later."""


# ------------------------------------------------------------------------------------ helpers
def settings_from_env() -> tuple[float, float, float]:
    """(ttl_s, heartbeat_s, settle_s) from ``RDEIC_LEASE_*`` or the defaults (60 s, 10 s, 2 s)."""
    def value(name: str, default: float) -> float:
        text = os.environ.get(name)
        if not text:
            return default
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
        return v

    return value(TTL_ENV, DEFAULT_TTL_S), value(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S), value(SETTLE_ENV, DEFAULT_SETTLE_S)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _parse(data: bytes | None) -> dict[str, Any] | None:
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _node() -> dict[str, Any]:
    """What tells this machine and PID namespace apart: a PID can only be checked where they match."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot_id: str | None = f.read().strip() or None
    except OSError:
        boot_id = None
    try:
        pid_ns: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": boot_id, "pid_ns": pid_ns}


def _pid_running(pid: int) -> bool:
    """False only when the process surely does not exist (or is a zombie); True when unsure."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists (another user's) or cannot tell
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _holder_gone(record: dict[str, Any]) -> bool:
    """The holder ran on this machine, in this PID namespace, and its process no longer runs."""
    here = _node()
    same = (record.get("host") == here["host"] and here["boot_id"] and record.get("boot_id") == here["boot_id"]
            and here["pid_ns"] and record.get("pid_ns") == here["pid_ns"])
    pid = record.get("pid")
    return bool(same) and isinstance(pid, int) and pid != os.getpid() and not _pid_running(pid)


def free_because(record: dict[str, Any] | None, now: float) -> str | None:
    """Why a lease record no longer binds anyone (``released``, ``expired``, ...), or None while it is live."""
    if record is None:
        return "unreadable"
    if record.get("released"):
        return "released"
    expires = record.get("expires_unix")
    if not isinstance(expires, (int, float)):
        return "unreadable"
    if now >= expires:
        return "expired"
    if _holder_gone(record):
        return "holder process gone"
    return None


def describe_holder(record: dict[str, Any], now: float | None = None) -> str:
    """One line about a lease holder: who, where, since when, last heartbeat, expiry."""
    now = time.time() if now is None else now
    expires = record.get("expires_unix")
    left = f" (in {expires - now:.0f} s)" if isinstance(expires, (int, float)) and expires > now else \
        (" (already past)" if isinstance(expires, (int, float)) else "")
    beat = record.get("heartbeat") or "?"
    return (f"{record.get('job', '?')} run {record.get('run_id', '?')} (owner {record.get('owner', '?')}) on host "
            f"{record.get('host', '?')}, pid {record.get('pid', '?')}, started {record.get('started', '?')}, last "
            f"heartbeat {beat}; its lease expires at {record.get('expires', '?')}{left} unless renewed")


# ------------------------------------------------------------------------------------ stores
class LeaseStore(Protocol):
    """Read and compare-and-swap one small object. ``version`` is an opaque ETag or content hash;
    ``create``/``replace`` return the new version, or None when the condition failed."""

    mode: str

    def read(self) -> tuple[bytes | None, str | None]: ...

    def create(self, data: bytes, verify: bool = True) -> str | None: ...

    def replace(self, data: bytes, version: str, verify: bool = True) -> str | None: ...


def _client_error(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError behind an s3fs exception, or ('', 0)."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            return code, status
    return "", 0


def _condition_failed(exc: BaseException) -> bool:
    """A PUT refused by its condition: 412 PreconditionFailed, or AWS's 409 ConditionalRequestConflict
    (another conditional write to the key was in flight)."""
    if isinstance(exc, FileExistsError):
        return True
    code, status = _client_error(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class S3ConditionalStore:
    """``PutObject`` with ``If-None-Match``/``If-Match``; reads return the body with its ETag."""

    mode = "conditional-put"
    _UNSUPPORTED_CODES = ("NotImplemented", "InvalidArgument", "InvalidRequest", "InvalidHeader")

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    async def _get(self, key: str) -> tuple[bytes, str | None]:
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key)
        body = resp["Body"]
        try:
            data = await body.read()
        finally:
            with contextlib.suppress(Exception):
                body.close()
        length = resp.get("ContentLength")
        if isinstance(length, int) and len(data) != length:
            raise storage.ShortReadError(f"read {len(data)} of {length} bytes of s3://{self.bucket}/{key}")
        return data, resp.get("ETag")

    def read(self) -> tuple[bytes | None, str | None]:
        failures = 0
        while True:
            try:
                return fsspec.asyn.sync(self.fs.loop, self._get, self.key)
            except FileNotFoundError:
                return None, None
            except PermissionError:
                raise
            except Exception as exc:  # what the libraries gave up on: our bounded retries
                failures += 1
                if failures > storage.READ_RETRIES:
                    raise
                pause = storage.backoff_pause(failures)
                log.warning("reading the lease %s failed (%s: %s); again in %.1fs", self.path, type(exc).__name__,
                            exc, pause)
                time.sleep(pause)

    def _put(self, data: bytes, key: str | None = None, **condition: str) -> str | None:
        try:
            resp = self.fs.call_s3("put_object", Bucket=self.bucket, Key=key or self.key, Body=data,
                                   ContentType="application/json", **condition)
        except Exception as exc:
            if condition and _condition_failed(exc):
                return None
            raise
        return resp.get("ETag") or ""

    def create(self, data: bytes, verify: bool = True) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str, verify: bool = True) -> str | None:
        return self._put(data, IfMatch=version)

    def honours_conditions(self) -> bool:
        """Probe (on an object of its own) that the store refuses a PUT whose condition fails.

        A store that silently ignores ``If-None-Match``/``If-Match`` would let two jobs both take the
        lease; such a store gets the read-back protocol instead.
        """
        probe = f"{self.key}.probe-{uuid.uuid4().hex[:12]}"
        try:
            self._put(b"probe", key=probe)
            try:
                if self._put(b"probe 2", key=probe, IfNoneMatch="*") is not None:
                    return False
                if self._put(b"probe 3", key=probe, IfMatch='"' + "0" * 32 + '"') is not None:
                    return False
            except Exception as exc:
                code, status = _client_error(exc)
                if code in self._UNSUPPORTED_CODES or status in (400, 501):
                    log.info("%s refuses conditional writes (%s %s)", self.bucket, status, code)
                    return False
                raise
            return True
        finally:
            with contextlib.suppress(Exception):
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=probe)


class LocalLockedStore:
    """A local file; every read-compare-write runs under an exclusive ``flock`` of its directory."""

    mode = "local-lock"

    def __init__(self, path: str) -> None:
        self.path = path
        self.dir = os.path.dirname(path) or "."

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, _sha(data)

    def _write(self, data: bytes, expected: str | None) -> str | None:
        with self._locked():
            if self.read()[1] != expected:
                return None
            storage.write_bytes_atomic(fsspec.filesystem("file"), self.path, data)
        return _sha(data)

    def create(self, data: bytes, verify: bool = True) -> str | None:
        return self._write(data, None)

    def replace(self, data: bytes, version: str, verify: bool = True) -> str | None:
        return self._write(data, version)


class ReadBackStore:
    """No compare-and-swap from the store: compare, write, wait ``settle_s``, read back.

    Safe when every writer's read-then-write takes less than ``settle_s``: then a competing write
    lands before our read-back and one of the two sees the other's token. A writer paused for
    longer (or a store whose writes show up late) can leave two holders; docs/guarantees.md.
    """

    mode = "read-back"

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, settle_s: float) -> None:
        self.fs, self.path, self.settle_s = fs, path, settle_s

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            data = storage.read_bytes(self.fs, self.path)
        except FileNotFoundError:
            return None, None
        return data, _sha(data)

    def _write(self, data: bytes, expected: str | None, verify: bool) -> str | None:
        t0 = time.monotonic()
        if self.read()[1] != expected:
            return None
        storage.write_bytes_atomic(self.fs, self.path, data)
        if not verify:
            return _sha(data)
        took = time.monotonic() - t0
        if took > self.settle_s / 2:
            log.warning("writing the lease %s took %.1fs, more than half the settle delay (%.1fs): another job "
                        "starting now might not be noticed", self.path, took, self.settle_s)
        time.sleep(self.settle_s)
        back, version = self.read()
        return version if back == data else None

    def create(self, data: bytes, verify: bool = True) -> str | None:
        return self._write(data, None, verify)

    def replace(self, data: bytes, version: str, verify: bool = True) -> str | None:
        return self._write(data, version, verify)


def make_store(out: OutputLocation, settle_s: float = DEFAULT_SETTLE_S) -> LeaseStore:
    """The strongest store the output's filesystem allows (see the module doc)."""
    fs, path = out.fs, out.lease_path()
    if storage.is_local(fs):
        try:
            import fcntl  # noqa: F401
        except ImportError:  # pragma: no cover - not on Linux
            return ReadBackStore(fs, path, settle_s)
        return LocalLockedStore(path)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if {"s3", "s3a"} & set(protocols) and hasattr(fs, "call_s3"):
        store = S3ConditionalStore(fs, path)
        if store.honours_conditions():
            return store
        log.warning("%s ignores conditional writes (If-None-Match/If-Match): the output lease falls back to "
                    "write, wait %.1fs and read back", out.url, settle_s)
    return ReadBackStore(fs, path, settle_s)


# ------------------------------------------------------------------------------------ the lease
def _read_record(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """The lease record in one GET (None when absent, {} when unreadable after our retries).

    A body cut short does not parse, so it is read again like any failed read: no HEAD needed,
    which keeps the per-shard check at one small request.
    """
    failures = 0
    while True:
        try:
            record = _parse(fs.cat_file(path))
            if record is not None:
                return record
            error: BaseException = ValueError("not a JSON object (cut short?)")
        except FileNotFoundError:
            return None
        except PermissionError:
            raise
        except Exception as exc:  # noqa: BLE001 - what the libraries gave up on: bounded retries
            error = exc
        failures += 1
        if failures > storage.READ_RETRIES:
            if isinstance(error, ValueError):
                return {}
            raise error
        time.sleep(storage.backoff_pause(failures))


@dataclass(frozen=True)
class LeaseRef:
    """What a worker carries to check that its job still holds the output (picklable, tiny)."""

    path: str
    token: str
    owner: str

    def check(self, out: OutputLocation) -> None:
        """Raise LeaseLostError unless the lease record still carries this job's token."""
        record = _read_record(out.fs, self.path)
        if not record:
            why = "the lease object is gone or unreadable"
        elif record.get("token") != self.token:
            why = "it is now held by " + describe_holder(record)
        elif record.get("released"):
            why = "it was released"
        else:
            return
        raise LeaseLostError(f"stopped writing into {out.url}: this job ({self.owner}) no longer holds its lease "
                             f"({out.to_url(self.path)}): {why}. Nothing more is written by this job.")


class OutputLease:
    """Take, keep (heartbeat thread) and release the lease of one output prefix.

    Use as a context manager: on entry the lease is acquired (or :class:`LeaseHeldError` raised),
    the heartbeat starts and ``out.lease`` is set, so every ``Manifest`` write and every worker
    checks it; on exit the heartbeat stops and the lease is released.
    """

    def __init__(self, out: OutputLocation, job: str, run_id: str, *, break_lease: bool = False,
                 ttl_s: float | None = None, heartbeat_s: float | None = None, settle_s: float | None = None,
                 store: LeaseStore | None = None) -> None:
        env_ttl, env_beat, env_settle = settings_from_env()
        self.ttl_s = float(env_ttl if ttl_s is None else ttl_s)
        self.heartbeat_s = float(env_beat if heartbeat_s is None else heartbeat_s)
        self.settle_s = float(env_settle if settle_s is None else settle_s)
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError(f"the lease heartbeat ({self.heartbeat_s}s) must be > 0 and shorter than its TTL "
                             f"({self.ttl_s}s)")
        self.out, self.job, self.run_id, self.break_lease = out, job, run_id, break_lease
        self.node = _node()
        self.token = uuid.uuid4().hex
        self.owner = f"{job}:{run_id}@{self.node['host']}:{os.getpid()}"
        self.path = out.lease_path()
        self._store = store
        self.record: dict[str, Any] | None = None
        self.version: str | None = None
        self.took_over: dict[str, Any] | None = None
        self.lost: dict[str, Any] | None = None  # set when a renewal finds another holder
        self.renew_errors = 0
        self.recovered_writes = 0  # writes whose answer was lost, recognised by reading the record back
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- context manager
    def __enter__(self) -> OutputLease:
        self.acquire()
        self.start_heartbeat()
        self.out.lease = self.ref
        return self

    def __exit__(self, *exc: object) -> None:
        self.out.lease = None
        self.release()

    @property
    def store(self) -> LeaseStore:
        if self._store is None:
            self._store = make_store(self.out, self.settle_s)
        return self._store

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.path, self.token, self.owner)

    @property
    def url(self) -> str:
        return self.out.to_url(self.path)

    # -------------------------------------------------------------- record
    def _new_record(self, now: float, took_over: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "lease_format": LEASE_FORMAT, "owner": self.owner, "token": self.token, "job": self.job,
            "run_id": self.run_id, "host": self.node["host"], "pid": os.getpid(), "boot_id": self.node["boot_id"],
            "pid_ns": self.node["pid_ns"], "started": _iso(now), "heartbeat": _iso(now),
            "expires": _iso(now + self.ttl_s), "expires_unix": round(now + self.ttl_s, 3), "ttl_s": self.ttl_s,
            "heartbeat_s": self.heartbeat_s, "renewals": 0, "mode": self.store.mode, "released": None,
            "took_over": took_over,
        }

    def _write(self, record: dict[str, Any], version: str | None, verify: bool = True) -> str | None:
        """Compare-and-swap ``record`` in; also recognises our own write whose answer was lost."""
        data = _dump(record)
        new = self.store.create(data, verify) if version is None else self.store.replace(data, version, verify)
        if new is not None:
            return new
        back, back_version = self.store.read()
        if back == data and back_version is not None:
            self.recovered_writes += 1
            log.info("the lease write to %s was done, but its answer was lost (the retry failed its condition)",
                     self.url)
            return back_version
        return None

    # -------------------------------------------------------------- acquire / renew / release
    def acquire(self) -> None:
        """Take the lease; LeaseHeldError when another live job holds it (and --break-lease was not given)."""
        settle_s = float(getattr(self.store, "settle_s", 0.0))
        for _ in range(ACQUIRE_TRIES):
            data, version = self.store.read()
            now = time.time()
            took_over = None
            if data is not None:
                current = _parse(data)
                why = free_because(current, now)
                if why is None and not self.break_lease and settle_s > 0:
                    # a store without compare-and-swap: the holder seen now may still lose its own read-back
                    # to a later writer; look again once the race has settled, so the refusal names the winner
                    time.sleep(settle_s)
                    settle_s = 0.0
                    continue
                if why is None and not self.break_lease:
                    assert current is not None
                    raise LeaseHeldError(
                        f"refusing to write into {self.out.url}: another job holds its lease ({self.url}): "
                        f"{describe_holder(current, now)}. Wait for it to finish; if it is dead, rerun after the "
                        f"lease expires or with --break-lease.", current)
                if why is None:
                    why = "broken (--break-lease)"
                    log.warning("breaking the lease of %s: %s", self.out.url, describe_holder(current or {}, now))
                keep = ("owner", "job", "run_id", "host", "pid", "started", "heartbeat", "expires", "released")
                took_over = {"why": why, **{k: (current or {}).get(k) for k in keep}}
            record = self._new_record(now, took_over)
            new_version = self._write(record, version)
            if new_version is not None:
                with self._lock:
                    self.record, self.version, self.took_over = record, new_version, took_over
                if took_over and took_over["why"] != "released":
                    log.info("took over the lease of %s from %s (%s)", self.out.url, took_over.get("owner"), why)
                return
            # another job wrote the lease between our read and our write: look again
        raise LeaseContendedError(f"could not take the lease of {self.out.url}: it changed under each of "
                                  f"{ACQUIRE_TRIES} tries")

    def renew(self) -> bool:
        """Push the expiry ``ttl_s`` ahead; False (and :attr:`lost` set) when another job holds the lease."""
        with self._lock:
            if self.record is None or self.lost is not None:
                return False
            now = time.time()
            record = dict(self.record, heartbeat=_iso(now), expires=_iso(now + self.ttl_s),
                          expires_unix=round(now + self.ttl_s, 3), renewals=int(self.record["renewals"]) + 1)
            new_version = self._write(record, self.version)
            if new_version is not None:
                self.record, self.version = record, new_version
                return True
            data, _ = self.store.read()
            self.lost = _parse(data) or {"missing": data is None}
        log.error("lost the lease of %s: %s; this job stops writing there", self.out.url,
                  describe_holder(self.lost) if "owner" in self.lost else "the lease object is gone")
        return False

    def start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="rdeic-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.renew():
                    return
                self.renew_errors = 0
            except Exception as exc:  # noqa: BLE001 - storage trouble: try again at the next beat
                self.renew_errors += 1
                expires = (self.record or {}).get("expires_unix", 0)
                log.warning("renewing the lease of %s failed (%s: %s); it expires in %.0fs unless a later "
                            "heartbeat gets through", self.out.url, type(exc).__name__, exc, expires - time.time())

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(30.0, self.settle_s * 3))
            self._thread = None

    def release(self) -> None:
        """Mark the lease released (best effort: an unreleased lease just expires after ``ttl_s``)."""
        self.stop_heartbeat()
        with self._lock:
            if self.record is None or self.lost is not None:
                return
            now = time.time()
            record = dict(self.record, released=_iso(now), heartbeat=_iso(now), expires=_iso(now),
                          expires_unix=round(now, 3))
            try:
                if self._write(record, self.version, verify=False) is None:
                    log.warning("not releasing the lease of %s: another job holds it now", self.out.url)
                    return
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("releasing the lease of %s failed (%s: %s); it expires at %s", self.out.url,
                            type(exc).__name__, exc, self.record.get("expires"))
                return
            self.record = record

    def raise_if_lost(self) -> None:
        if self.lost is not None:
            who = describe_holder(self.lost) if "owner" in self.lost else "the lease object is gone"
            raise LeaseLostError(f"stopped writing into {self.out.url}: this job ({self.owner}) lost its lease "
                                 f"({self.url}): {who}")

    def write_summary(self, manifest: Manifest, summary: dict[str, Any]) -> None:
        """Store a job's run summary, stamped with this lease: refused (LeaseLostError) once the lease is
        lost, so a job that was taken over never writes the summary of an output it no longer owns."""
        self.raise_if_lost()
        summary["lease"] = self.describe()
        summary["summary_url"] = manifest.write_summary(summary)

    def describe(self) -> dict[str, Any]:
        """For run summaries: who held the lease, how it was kept, whom it was taken from."""
        record = self.record or {}
        return {"owner": self.owner, "mode": self.store.mode, "ttl_s": self.ttl_s, "heartbeat_s": self.heartbeat_s,
                "renewals": record.get("renewals", 0), "recovered_writes": self.recovered_writes,
                "took_over": self.took_over}


def read_lease(out: OutputLocation) -> dict[str, Any] | None:
    """The lease record of an output prefix (None when there is none), with ``free_because``."""
    try:
        data = storage.read_bytes(out.fs, out.lease_path())
    except FileNotFoundError:
        return None
    record = _parse(data) or {}
    record["free_because"] = free_because(record or None, time.time())
    return record
