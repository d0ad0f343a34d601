"""``rdeic job``: a submitted Ray job's status, logs, or stop (the Ray Jobs API, token handled).

    rdeic job status JOB_ID [--address URL] [--json]
    rdeic job logs   JOB_ID [--address URL] [--follow]
    rdeic job stop   JOB_ID [--address URL] [--wait SECONDS]
    rdeic job list          [--address URL] [--json]

``JOB_ID`` is what ``rdeic submit`` printed. The address and token are found as for ``submit``
(``--address`` > ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` > http://127.0.0.1:8265; token from
``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``/``~/.ray/auth_token``). The progress of the work itself
(shards done, images, bpp) is read from the job's output location: ``rdeic status OUTPUT``.

Nothing here prints a job's runtime_env values: Ray keeps the env vars (S3 credentials) in the
job's record, so only their names are shown.

Exit status: 0 done (``status``: the job SUCCEEDED or is still running), 1 the job FAILED or was
STOPPED (``status``) / did not stop in time (``stop``), 3 cluster unreachable or token refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from ..exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, run_command
from ..logs import redact_text
from .submit import call, follow_logs, make_client, resolve_address, wait_terminal

HELP = 'status, logs or stop of a submitted Ray job'


def _time(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else None


def job_summary(info: Any) -> dict[str, Any]:
    """The printable part of a JobDetails/JobInfo: no runtime_env values (env var names only)."""
    runtime_env = getattr(info, "runtime_env", None) or {}
    status = str(getattr(info, "status", "")).rsplit(".", 1)[-1]
    return {
        "job_id": getattr(info, "submission_id", None) or getattr(info, "job_id", None),
        "status": status,
        "message": redact_text(getattr(info, "message", None) or ""),
        "entrypoint": redact_text(getattr(info, "entrypoint", "") or ""),
        "start_time": _time(getattr(info, "start_time", None)),
        "end_time": _time(getattr(info, "end_time", None)),
        "metadata": dict(getattr(info, "metadata", None) or {}),
        "env_var_names": sorted((runtime_env.get("env_vars") or {}).keys()),
        "working_dir": runtime_env.get("working_dir"),
    }


def _print_summary(s: dict[str, Any]) -> None:
    print(f"job {s['job_id']}: {s['status']}")
    for key in ("message", "entrypoint", "start_time", "end_time"):
        if s[key]:
            print(f"  {key}: {s[key]}")
    if s["metadata"]:
        print("  metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(s["metadata"].items())))
    if s["env_var_names"]:
        print(f"  env vars: {', '.join(s['env_var_names'])} (values not shown)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("job", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(name: str, help: str, with_id: bool = True) -> argparse.ArgumentParser:
        q = actions.add_parser(name, help=help)
        if with_id:
            q.add_argument("job_id", metavar="JOB_ID")
        q.add_argument("--address", default=None, help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, "
                                                        "$RAY_ADDRESS, http://127.0.0.1:8265)")
        return q

    q = common("status", "status of a job")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q = common("logs", "the job driver's logs (redacted)")
    q.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
    q = common("stop", "stop a running job")
    q.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the job to reach STOPPED (0: do not wait)")
    q = common("list", "jobs on the cluster", with_id=False)
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda args: run_command(f"job {args.action}", lambda: run(args)))
    return p


def run(args: argparse.Namespace) -> int:
    address = resolve_address(args.address, None)
    try:
        return _ACTIONS[args.action](make_client(address), address, args)
    except KeyboardInterrupt:  # leaving `logs --follow` or `stop --wait`: quietly, like `tail -f`
        return EXIT_INTERRUPTED


def _status(client: Any, address: str, args: argparse.Namespace) -> int:
    summary = job_summary(call(address, client.get_job_info, args.job_id))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return EXIT_FAILED if summary["status"] in ("FAILED", "STOPPED") else EXIT_OK


def _logs(client: Any, address: str, args: argparse.Namespace) -> int:
    if args.follow:
        follow_logs(client, args.job_id, sys.stdout)
    else:
        sys.stdout.write(redact_text(call(address, client.get_job_logs, args.job_id)))
    return EXIT_OK


def _stop(client: Any, address: str, args: argparse.Namespace) -> int:
    stopped = call(address, client.stop_job, args.job_id)
    if not stopped:
        status = str(call(address, client.get_job_status, args.job_id)).rsplit(".", 1)[-1]
        print(f"job {args.job_id} was not running ({status})")
        return EXIT_OK
    if args.wait <= 0:
        print(f"stop requested for job {args.job_id}")
        return EXIT_OK
    status = wait_terminal(client, address, args.job_id, timeout_s=args.wait)
    print(f"job {args.job_id}: {status}")
    return EXIT_OK if status in ("STOPPED", "FAILED", "SUCCEEDED") else EXIT_FAILED


def _list(client: Any, address: str, args: argparse.Namespace) -> int:
    jobs = [job_summary(j) for j in call(address, client.list_jobs)]
    jobs.sort(key=lambda j: j["start_time"] or "")
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        for j in jobs:
            print(f"{j['job_id']}  {j['status']:<9}  {j['start_time'] or '-'}  {j['entrypoint']}")
    return EXIT_OK


_ACTIONS = {"status": _status, "logs": _logs, "stop": _stop, "list": _list}
