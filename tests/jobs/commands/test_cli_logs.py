"""Structured logs: JSON lines with extra fields, per-shard events, secrets redacted in every format."""

from __future__ import annotations

import io
import json
import logging

import pytest

from jobs.logs import (
    JsonFormatter,
    StructuredProgress,
    configure_logging,
    progress_sink,
    redact_text,
    secret_env_values,
)
from pipeline.progress import TqdmProgress
from pipeline.types import ShardStats

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY"


@pytest.mark.parametrize("text, expected", [
    ('{"key": "AKIA123", "secret": "abc", "endpoint_url": "http://x"}',
     '{"key": "***", "secret": "***", "endpoint_url": "http://x"}'),
    ("{'key': 'AKIA', 'token': 'xyz', 'anon': False}", "{'key': '***', 'token': '***', 'anon': False}"),
    ("aws_secret_access_key = foo bar", "aws_secret_access_key = *** bar"),
    ("RAY_AUTH_TOKEN=tok123 ray start", "RAY_AUTH_TOKEN=*** ray start"),
    ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
    ("https://user:pa55@host/x", "https://user:***@host/x"),
    ("GET /b/k?X-Amz-Signature=abcd&X-Amz-Credential=AK%2F2020&x=1",
     "GET /b/k?X-Amz-Signature=***&X-Amz-Credential=***&x=1"),
    # ordinary words that merely contain "key" or "session" stay
    ("failed_keys: 3, keys=5, monkey=1, session_dir=/tmp/ray",
     "failed_keys: 3, keys=5, monkey=1, session_dir=/tmp/ray"),
])
def test_redact_text_patterns(text: str, expected: str) -> None:
    assert redact_text(text, secrets=[]) == expected


def test_secret_environment_values_are_redacted_wherever_they_appear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2-long")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # not secret: stays
    assert SECRET in secret_env_values() and "us-east-1" not in secret_env_values()
    assert redact_text(f"failed to open s3://b/{SECRET}/x in us-east-1 (pw hunter2-long)") == \
        "failed to open s3://b/***/x in us-east-1 (pw ***)"


def _log_through(fmt: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("INFO", fmt, stream=stream)
        log = logging.getLogger("rdeic.test")
        log.info("opening %s with %s", "s3://b/x", {"key": "AKIAXX", "secret": SECRET},
                 extra={"event": "probe", "shard": "s-1", "options": {"token": SECRET}})
        try:
            raise OSError(f"403 for credential {SECRET}")
        except OSError:
            log.exception("upload failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    return stream.getvalue().splitlines()


def test_json_lines_carry_extra_fields_and_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _log_through("json", monkeypatch)
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(records) == 2
    first, second = records
    assert first["event"] == "probe" and first["shard"] == "s-1" and first["level"] == "INFO"
    assert first["logger"] == "rdeic.test" and first["msg"].startswith("opening s3://b/x with ")
    assert first["options"] == {"token": "***"}
    assert second["level"] == "ERROR" and "OSError" in second["exc"]
    assert SECRET not in "\n".join(lines) and "AKIAXX" not in "\n".join(lines)


def test_text_lines_are_redacted_too(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _log_through("text", monkeypatch)
    text = "\n".join(lines)
    assert "INFO rdeic.test: opening s3://b/x" in text and "Traceback" in text
    assert SECRET not in text and "AKIAXX" not in text


def test_json_formatter_is_selected_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        monkeypatch.setenv("RDEIC_LOG_FORMAT", "json")
        configure_logging("INFO", None, stream=io.StringIO())
        assert isinstance(progress_sink(None), StructuredProgress)
        configure_logging("INFO", "text", stream=io.StringIO())
        sink = progress_sink(False)
        assert type(sink) is TqdmProgress and sink.disable is True
        assert sum(1 for h in root.handlers if getattr(h, "_rdeic", False)) == 1  # replaced, not stacked
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    with pytest.raises(ValueError, match="log format must be one of"):
        configure_logging("INFO", "xml")


def test_structured_progress_emits_one_event_per_shard(caplog: pytest.LogCaptureFixture) -> None:
    stats = ShardStats(shard_id="s-7", url="s3://b/s-7.tar", archive="a", codec_fingerprint="f", rows=5, ok=4,
                       failed=1, failed_by_reason={"too_large": 1}, bitstream_bytes=99, mean_bpp=0.05,
                       worker="w0", device="cpu", seconds={"total": 1.5}, images_per_s=3.3)
    sink = StructuredProgress()
    with caplog.at_level(logging.INFO, logger="rdeic.shards"):
        sink.start(3, 1)
        sink.shard_failed("s-8", "OSError: reset", will_retry=True)
        sink.shard_done(stats)
        sink.close()
    events = [(r.event, r.__dict__) for r in caplog.records]
    assert [e for e, _ in events] == ["run_start", "shard_failed", "shard_done"]
    done = events[2][1]
    assert (done["shard"], done["rows"], done["ok"], done["failed_by_reason"], done["seconds"]) == \
        ("s-7", 5, 4, {"too_large": 1}, 1.5)
    assert events[1][1]["will_retry"] is True and events[1][1]["error"] == "OSError: reset"
    line = json.loads(JsonFormatter().format(caplog.records[2]))
    assert line["event"] == "shard_done" and line["mean_bpp"] == 0.05
