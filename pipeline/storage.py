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
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Streaming reads fetch this much per request; a shard is never read whole into memory.
READ_BLOCK_SIZE = 8 * 1024 * 1024

_OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"}
_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (protocol stripped, local paths absolute).

    ``storage_options`` are passed to remote filesystems only: a local path ignores them, so one
    set of options can serve a local input and an S3 output.
    """
    protocol = fsspec.utils.get_protocol(url)
    local = protocol in ("file", "local")
    options = {} if local else dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open storage for {url!r}: {exc}") from exc
    return fs, path


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


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


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
