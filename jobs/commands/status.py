"""``rdeic status``: how far an archive job got, read from its output location alone.

    rdeic status s3://bucket/archive-v1 [--storage-options JSON] [--json] [--watch SECONDS]
    rdeic status --config jobs/archive.yaml          # the spec's output and storage options

Storage artifacts are the truth (docs/archive-format.md), so this works the same for a job that
is running, was stopped, or finished, wherever it ran (laptop, Ray cluster, KubeRay): it reads
``run.json`` (codec), ``job.yaml`` (the latest run's resolved settings: its inputs give the
total), the done and failed markers under ``_manifest/``, the latest run summary and the output's
lease (``_lease.json``: which job, if any, is writing there now).

Printed: shards done/failed/pending, images (ok/failed, by reason), bytes (source, bitstreams,
Parquet), mean bpp over archived images, throughput and an ETA while work is pending.

Exit status: 0 when the location holds an archive job (whatever its state), 1 when it does not,
2 for bad options.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from datetime import datetime
from typing import Any

import yaml

from ..exits import EXIT_OK, PlainError, UsageError, run_command
from ..options import json_object

HELP = 'progress of an archive job (running or stopped) from its output location'


class NoJobError(PlainError, LookupError):
    """The location holds no archive job (no run.json and no markers). Printed as ``rdeic status: MESSAGE``; exit 1."""


def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    from pipeline import storage

    if not storage.exists(fs, path):
        return None
    return json.loads(storage.read_bytes(fs, path))


def _job_inputs(out: Any, run: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    """Input patterns of the latest run (``job.yaml``), else of the first (``run.json``)."""
    from pipeline import storage

    from ..config import RESOLVED_CONFIG_FILE

    path = out.path(RESOLVED_CONFIG_FILE)
    if storage.exists(out.fs, path):
        section = (yaml.safe_load(storage.read_bytes(out.fs, path)) or {}).get("archive") or {}
        if section.get("input"):
            return list(section["input"]), dict(section.get("storage_options") or {})
    job = (run or {}).get("job") or {}
    return list(job.get("inputs") or []), dict(job.get("storage_options") or {})


def _count_inputs(patterns: list[str], storage_options: dict[str, Any]) -> tuple[int | None, str | None]:
    from pipeline.shards import expand_inputs

    if not patterns:
        return None, "no input list recorded"
    try:
        return len(expand_inputs(patterns, storage_options)), None
    except Exception as exc:  # noqa: BLE001 - the total is informative; any listing failure just leaves it unknown
        return None, f"{type(exc).__name__}: {exc}"


def collect_status(output: str, storage_options: dict[str, Any] | None = None,
                   count_inputs: bool = True) -> dict[str, Any]:
    """Progress of the archive job at ``output`` (see the module doc); raises NoJobError."""
    from pipeline import storage
    from pipeline.lease import read_lease
    from pipeline.manifest import MANIFEST_DIR, RUN_FILE, Manifest, OutputLocation

    out = OutputLocation(output, storage_options or {})
    manifest = Manifest(out)
    run = _read_json(out.fs, out.path(RUN_FILE))
    done = manifest.read_done()
    done_ids = {s.shard_id for s in done}
    failed_names = storage.list_names(out.fs, out.path(MANIFEST_DIR, "failed"))
    failed_paths = [out.path(MANIFEST_DIR, "failed", n) for n in failed_names if n.endswith(".json")]
    failed = [json.loads(b) for b in out.fs.cat(failed_paths, on_error="omit").values()] if failed_paths else []
    failed = [f for f in failed if f.get("shard_id") not in done_ids]
    if run is None and not done and not failed:
        raise NoJobError(f"no archive job at {out.url} (no {RUN_FILE}, no markers under {MANIFEST_DIR}/)")
    summary = _read_json(out.fs, out.path(MANIFEST_DIR, "summary.json"))
    lease = read_lease(out)

    total, total_note = None, None
    if count_inputs:
        patterns, options = _job_inputs(out, run)
        # the recorded options are redacted: the caller's options (real credentials) win
        total, total_note = _count_inputs(patterns, {**options, **(storage_options or {})})
    if total is None and summary:
        total = summary.get("shards", {}).get("total")
    pending = max(total - len(done) - len(failed), 0) if total is not None else None

    reasons: Counter[str] = Counter()
    for s in done:
        reasons.update(s.failed_by_reason)
    ok = sum(s.ok for s in done)
    bpp_weight = sum(s.ok for s in done if s.mean_bpp is not None)
    mean_bpp = (sum(s.mean_bpp * s.ok for s in done if s.mean_bpp is not None) / bpp_weight) if bpp_weight else None
    starts = [t for t in (_parse_time(s.started_at) for s in done) if t]
    ends = [t for t in (_parse_time(s.finished_at) for s in done) if t]
    images = sum(s.rows for s in done)
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    rate = images / wall if wall > 0 else None
    eta = None
    if pending and rate and done:
        eta = round(pending * (images / len(done)) / rate, 1)
    if total is not None and pending == 0 and not failed:
        state = "complete"
    elif total is not None and pending == 0:
        state = "finished with failed shards"
    else:
        state = "incomplete (running or stopped)"
    return {
        "output": out.url,
        "state": state,
        "codec": {k: (run or {}).get("codec", {}).get(k) for k in ("name", "fingerprint")},
        "created_at": (run or {}).get("created_at"),
        "last_activity": max(ends).isoformat(timespec="seconds") if ends else None,
        "shards": {"total": total, "done": len(done), "failed": len(failed), "pending": pending,
                   "damaged": sum(1 for s in done if s.damage)},
        "total_note": total_note if total is None else None,
        "images": {"total": images, "ok": ok, "failed": sum(s.failed for s in done),
                   "failed_by_reason": dict(sorted(reasons.items()))},
        "bytes": {"source": sum(s.src_bytes for s in done), "bitstreams": sum(s.bitstream_bytes for s in done),
                  "parquet": sum(s.parquet_bytes for s in done)},
        "mean_bpp": round(mean_bpp, 6) if mean_bpp is not None else None,
        "images_per_s": round(rate, 3) if rate else None,
        "eta_s": eta,
        "failed_shards": [{"shard_id": f.get("shard_id"), "attempts": f.get("attempts"), "error": f.get("error")}
                          for f in failed],
        "last_run": ({k: summary.get(k) for k in ("run_id", "started_at", "finished_at", "exit_code")}
                     if summary else None),
        "lease": ({k: lease.get(k) for k in ("owner", "job", "run_id", "host", "pid", "started", "heartbeat",
                                            "expires", "released", "free_because")} if lease else None),
    }


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_status(s: dict[str, Any]) -> str:
    sh, im, by = s["shards"], s["images"], s["bytes"]
    total = "?" if sh["total"] is None else sh["total"]
    pending = "?" if sh["pending"] is None else sh["pending"]
    lines = [
        f"archive {s['output']}: {s['state']}",
        f"  codec: {s['codec']['name']} {str(s['codec']['fingerprint'] or '')[:16]}  created {s['created_at']}",
        f"  shards: {sh['done']}/{total} done, {sh['failed']} failed, {pending} pending, {sh['damaged']} damaged",
        f"  images: {im['total']} ({im['ok']} ok, {im['failed']} failed)",
        f"  bytes: source {_size(by['source'])}, bitstreams {_size(by['bitstreams'])}, parquet {_size(by['parquet'])}",
        f"  mean bpp: {'-' if s['mean_bpp'] is None else format(s['mean_bpp'], '.4f')}",
    ]
    if s.get("total_note"):
        lines.append(f"  (total unknown: {s['total_note']})")
    if im["failed_by_reason"]:
        lines.append("  failed by reason: " + ", ".join(f"{k}={v}" for k, v in im["failed_by_reason"].items()))
    if s["images_per_s"]:
        eta = f", ETA {s['eta_s']:.0f}s" if s["eta_s"] else ""
        lines.append(f"  throughput: {s['images_per_s']:.2f} img/s over the done shards{eta}")
    if s["last_activity"]:
        lines.append(f"  last shard finished: {s['last_activity']}")
    if s["last_run"]:
        r = s["last_run"]
        lines.append(f"  last completed run: {r['run_id']} finished {r['finished_at']} (exit {r['exit_code']})")
    lease = s.get("lease")
    if lease and lease.get("free_because") is None:
        lines.append(f"  writing now: {lease['job']} run {lease['run_id']} on {lease['host']} (pid {lease['pid']}), "
                     f"last heartbeat {lease['heartbeat']}, lease until {lease['expires']}")
    elif lease:
        lines.append(f"  no job holds the output's lease ({lease['free_because']}; last holder {lease.get('owner')})")
    for f in s["failed_shards"]:
        lines.append(f"  FAILED shard {f['shard_id']} after {f['attempts']} attempt(s): {f['error']}")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", nargs="?", metavar="OUTPUT", help="the job's output prefix (s3://..., path)")
    p.add_argument("--config", metavar="SPEC.yaml", help="take OUTPUT and storage options from an archive spec")
    p.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                   help="fsspec options for remote storage, JSON or @file.json")
    p.add_argument("--no-count-inputs", dest="count_inputs", action="store_false",
                   help="do not list the inputs to count the total (pending shown as '?')")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="refresh every SECONDS until the job is complete (Ctrl-C to leave)")
    p.set_defaults(func=lambda args: run_command("status", lambda: run(args)))
    return p


def _target(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from ..config import load_spec

    output, options = args.output, args.storage_options
    if args.config:
        try:
            section = load_spec(args.config).job
        except ValueError as exc:  # ConfigError: the spec is unreadable or invalid
            raise UsageError(str(exc)) from None
        output = output or getattr(section, "output", None)
        if options is None:
            options = getattr(section, "storage_options", None)
    if not output:
        raise UsageError("give OUTPUT or --config SPEC.yaml")
    return output, dict(options or {})


def run(args: argparse.Namespace) -> int:
    output, options = _target(args)
    while True:
        s = collect_status(output, options, count_inputs=args.count_inputs)
        print(json.dumps(s, indent=2) if args.json else format_status(s), flush=True)
        if not args.watch or s["state"] != "incomplete (running or stopped)":
            return EXIT_OK
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:  # leaving --watch is how it ends
            return EXIT_OK
