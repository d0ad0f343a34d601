"""Logging for jobs: text or JSON lines, one event per shard, secrets redacted everywhere.

    rdeic --log-format json archive ...      # or RDEIC_LOG_FORMAT=json (what `rdeic submit` sets)

Why redaction lives in the formatter, not at the call sites: a secret reaches a log line through
paths nobody reviews (an exception message quoting a URL with a signature, an fsspec error echoing
storage options, a library's debug line). Every line this process writes passes through
:func:`redact_text`, which removes the *values* of secret environment variables (whatever text
they appear in) and ``key=value`` / ``"key": "value"`` pairs whose key looks secret.

Per-shard events: :class:`StructuredProgress` turns the executor's progress callbacks into one
record per shard event (``shard_start``/``shard_done``/``shard_failed``) with the shard's numbers
as fields, so a log pipeline can aggregate them without parsing prose.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pipeline.progress import TqdmProgress
from pipeline.types import ShardStats

LOG_FORMAT_ENV = "RDEIC_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
REDACTED = "***"
_MIN_SECRET_LEN = 4
_SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|(^|_)KEY$",
                              re.IGNORECASE)
# A key naming a secret: anything containing secret/token/password/credential/access key/api key,
# or exactly `key` (s3fs's option for the access key). Plain words like `keys` or `session_dir` are not.
_KEY_NAME = (r"(?:[\w.-]*(?:secret|token|password|passwd|credential|access[_-]?key(?:[_-]?id)?|api[_-]?key|"
             r"private[_-]?key)[\w.-]*|key)")
# "secret": "v" / 'secret': 'v' (JSON, Python reprs) and secret=v / secret: v (URLs, env dumps, CLI args)
_QUOTED_PAIR = re.compile(rf"""(["']{_KEY_NAME}["']\s*[:=]\s*)(["'])(?:(?!\2).)+\2""", re.IGNORECASE)
_PLAIN_PAIR = re.compile(rf"""((?<![\w.-]){_KEY_NAME}\s*[:=]\s*)(?!["'{{\[])([^\s"',;&}}\]]+)""", re.IGNORECASE)
_BEARER = re.compile(r"(\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+(@)", re.IGNORECASE)
_AMZ_SIGNATURE = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+", re.IGNORECASE)


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (longest first, so overlaps redact fully)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV_NAME.search(k) and v and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with secret values and secret-looking key/value pairs replaced by ``***``."""
    for value in secret_env_values() if secrets is None else secrets:
        if value and value in text:
            text = text.replace(value, REDACTED)
    text = _QUOTED_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}{m.group(2)}", text)
    text = _PLAIN_PAIR.sub(lambda m: m.group(1) + (m.group(2) if m.group(2) == REDACTED else REDACTED), text)
    text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
    text = _URL_USERINFO.sub(rf"\g<1>{REDACTED}\g<2>", text)
    return _AMZ_SIGNATURE.sub(rf"\g<1>{REDACTED}", text)


def _redact_value(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {k: _redact_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v, secrets) for v in value]
    return value


# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD_ATTRS = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


class RedactingTextFormatter(logging.Formatter):
    """The usual one-line text format, redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's ``extra`` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        secrets = secret_env_values()
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(_redact_value(out, secrets), default=str, sort_keys=False)


def log_format_from_env(default: str = "text") -> str:
    value = os.environ.get(LOG_FORMAT_ENV, default).strip().lower()
    return value if value in LOG_FORMATS else default


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (in-process callers and tests swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: str = "INFO", fmt: str | None = None, stream: Any = None) -> None:
    """Install one redacting handler on the root logger (replacing earlier handlers of ours)."""
    fmt = fmt or log_format_from_env()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_rdeic", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    handler._rdeic = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else RedactingTextFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def structured_enabled() -> bool:
    """Whether the root logger currently writes JSON lines (then progress is reported as events)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def setup_worker_logging() -> None:
    """Ray ``worker_process_setup_hook``: workers of a submitted job log like its driver."""
    configure_logging(os.environ.get("RDEIC_LOG_LEVEL", "INFO"), log_format_from_env())


# ------------------------------------------------------------------------------------ per shard
log = logging.getLogger("rdeic.shards")


def shard_fields(stats: ShardStats) -> dict[str, Any]:
    """The numbers of one finished shard worth a log field (the done marker has everything)."""
    return {
        "shard": stats.shard_id, "url": stats.url, "rows": stats.rows, "ok": stats.ok, "failed": stats.failed,
        "failed_by_reason": dict(stats.failed_by_reason), "damaged": bool(stats.damage),
        "bitstream_bytes": stats.bitstream_bytes, "mean_bpp": stats.mean_bpp, "attempt": stats.attempt,
        "worker": stats.worker, "device": stats.device, "seconds": stats.seconds.get("total"),
        "images_per_s": stats.images_per_s,
    }


class StructuredProgress(TqdmProgress):
    """Progress as structured log events (one per shard event); bars stay off (logs are the UI)."""

    def __init__(self) -> None:
        super().__init__(disable=True)

    def start(self, total_shards: int, already_done: int) -> None:
        self._total_shards = total_shards
        log.info("%s %d shard(s); %d already done", getattr(self, "verb", "archiving"), total_shards, already_done,
                 extra={"event": "run_start", "pending_shards": total_shards, "done_before": already_done})

    def shard_done(self, stats: ShardStats) -> None:
        self._in_flight.pop(stats.shard_id, None)
        log.info("shard %s done: %d ok, %d failed", stats.shard_id, stats.ok, stats.failed,
                 extra={"event": "shard_done", **shard_fields(stats)})

    def shard_failed(self, shard_id: str, error: str, will_retry: bool) -> None:
        self._in_flight.pop(shard_id, None)
        log.warning("shard %s attempt failed%s: %s", shard_id, " (will retry)" if will_retry else "", error,
                    extra={"event": "shard_failed", "shard": shard_id, "error": error, "will_retry": will_retry})

    def close(self) -> None:
        pass


def progress_sink(show_bars: bool | None) -> TqdmProgress:
    """Structured events when logging JSON, else tqdm bars (``None``: bars only on a terminal)."""
    if structured_enabled():
        return StructuredProgress()
    return TqdmProgress(disable=None if show_bars is None else not show_bars)
