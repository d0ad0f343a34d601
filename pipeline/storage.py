"""fsspec helpers: one way to reach local paths, ``file://``, ``s3://`` and anything fsspec opens.

Why the helpers exist instead of bare fsspec calls:

* **Atomic writes.** A crash must never leave a file that looks finished. Locally that is a
  temporary name in the same directory plus ``os.replace``; on S3 an object only appears when its
  upload completes, so the object is written under its final key and *discarded* (not committed)
  on error. s3fs's ``with fs.open(...)`` would commit a half-written upload on an exception.
* **Fresh listings.** s3fs caches directory listings per process; done markers are written by
  other processes (Ray workers), so every listing here invalidates the cache first.
* **Storage options** (``--storage-options`` JSON) go to every non-local filesystem; the standard
  AWS environment (credentials, ``AWS_ENDPOINT_URL``) is honoured by s3fs/botocore itself.
* **Retries.** Every S3 call retries in botocore (:data:`S3_RETRIES`, unless the options set
  ``config_kwargs.retries``): throttling (503 SlowDown), 500s and dropped connections. s3fs adds
  its own retries around reading a response body (a reset or cut-off body is read again). What
  no library notices, a response that is consistently framed but shorter than the object, is
  caught here (:func:`read_bytes`) and in ``pipeline.reader``, and retried. See docs/guarantees.md.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

# Streaming reads fetch this much per request; a shard is never read whole into memory.
READ_BLOCK_SIZE = 8 * 1024 * 1024
# botocore retry settings for S3 clients when the storage options set none. "adaptive" is the
# standard retry policy (exponential backoff with jitter on throttling, 5xx and connection errors)
# plus client-side rate limiting once the store throttles: many workers back off together.
S3_RETRIES = {"max_attempts": 10, "mode": "adaptive"}
# Our own retries, for reads that come back short without any error (see pipeline.reader too):
# this many consecutive failures, pausing READ_BACKOFF_S, doubled each time (at most 5 s).
READ_RETRIES = 5
READ_BACKOFF_S = 0.2
READ_BACKOFF_MAX_S = 5.0

_OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"}
_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (protocol stripped, local paths absolute).

    ``storage_options`` are passed to remote filesystems only: a local path ignores them, so one
    set of options can serve a local input and an S3 output.
    """
    protocol = fsspec.utils.get_protocol(url)
    local = protocol in ("file", "local")
    options = {} if local else with_defaults(protocol, storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open storage for {url!r}: {exc}") from exc
    return fs, path


def with_defaults(protocol: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` plus our defaults for the protocol (S3: botocore retries, :data:`S3_RETRIES`)."""
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(S3_RETRIES))
        options["config_kwargs"] = config
    return options


def backoff_pause(failures: int) -> float:
    """Seconds to wait before retry number ``failures`` (1, 2, ...) of our own read retries."""
    return min(READ_BACKOFF_S * 2 ** (failures - 1), READ_BACKOFF_MAX_S)


def normalize_url(url: str) -> str:
    """Local paths and ``file://`` URLs become absolute plain paths; other URLs are kept as given."""
    if fsspec.utils.get_protocol(url) in ("file", "local"):
        return os.path.abspath(fsspec.utils.stringify_path(url.split("://", 1)[1] if "://" in url else url))
    return url


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for ``path`` that :func:`filesystem` maps back to the same file (local stays a plain path)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(*parts: str) -> str:
    """Join path parts with single slashes (fsspec paths always use '/')."""
    head, *rest = parts
    out = head.rstrip("/")
    for part in rest:
        out = f"{out}/{part.strip('/')}"
    return out


def open_for_streaming(fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    """Open for sequential reading with read-ahead buffering (bounded memory, few requests)."""
    if is_local(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=READ_BLOCK_SIZE, cache_type="readahead")


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` either does not change or holds all of it."""
    with open_atomic(fs, path) as f:
        f.write(data)


@contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """A binary writer whose result appears at ``path`` only if the block finishes without error."""
    if is_local(fs):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    if _is_object_store(fs):
        # The object appears at close(); discard() aborts the upload so nothing appears on error.
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            f.discard()
            f.closed = True  # discard() leaves it "open"; its __del__ would then try to commit nothing
            raise
        f.close()
        return
    # Anything else: write a temporary sibling and move it into place.
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Stores whose writers upload on close and can abort (``discard``) instead."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool(set(protocols) & _OBJECT_STORE_PROTOCOLS)


class ShortReadError(OSError):
    """The store kept delivering fewer (or more) bytes than it says the object has."""


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole file. On an object store the length is checked against a fresh HEAD: a body of
    another length (cut short without an HTTP error, or a HEAD that lied), or one botocore refused
    (response checksum mismatch, which s3fs does not retry), is read again, READ_RETRIES times."""
    if is_local(fs) or not _is_object_store(fs):
        return fs.cat_file(path)
    failures = 0
    while True:
        try:
            data = fs.cat_file(path)
            fs.invalidate_cache(path)
            size = fs.info(path).get("size")
            if size is None or len(data) == size:
                return data
            error: Exception = ShortReadError(f"read {len(data)} bytes of {to_url(fs, path)}, which has {size} "
                                              "bytes by its HEAD")
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the libraries gave up on: bounded retries
            error = exc
        failures += 1
        if failures > READ_RETRIES:
            if isinstance(error, ShortReadError):
                raise ShortReadError(f"{error} (still after {READ_RETRIES} retries)")
            raise error
        pause = backoff_pause(failures)
        log.warning("reading %s failed (%s: %s); again in %.1fs (retry %d of %d)", to_url(fs, path),
                    type(error).__name__, error, pause, failures, READ_RETRIES)
        time.sleep(pause)


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Existence as the store sees it now (no cached listing)."""
    fs.invalidate_cache(path)
    return fs.exists(path)


def list_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Base names of the files directly under ``path`` (empty if it does not exist), sorted."""
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")


def remove_if_exists(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def redact(options: Any) -> Any:
    """A copy of storage options safe to write into metadata: secret-looking values become '***'."""
    if isinstance(options, dict):
        out = {}
        for k, v in options.items():
            secret = any(word in str(k).lower() for word in _SECRET_WORDS) and not isinstance(v, (dict, bool))
            out[k] = "***" if secret and v is not None else redact(v)
        return out
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options


def with_env_endpoint(urls: Sequence[str], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` plus the S3 endpoint from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` when one of
    ``urls`` is on S3 and the options name none themselves.

    botocore reads those variables too, but only in processes that have them: putting the endpoint
    into the options carries it to workers on other nodes along with the rest of the job.
    """
    out = dict(options or {})
    uses_s3 = any(u.lstrip("@").startswith(("s3://", "s3a://")) for u in urls)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = dict(out.get("client_kwargs") or {})
    if uses_s3 and endpoint and not out.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        client_kwargs["endpoint_url"] = endpoint
        out["client_kwargs"] = client_kwargs
    return out
