"""``rdeic submit``: run a job spec on a Ray cluster through the Ray Jobs API.

    rdeic submit jobs/archive.yaml --address http://HEAD:8265 [-- --num-actors 16]

The cluster runs exactly what a local run would: ``python -m jobs.cli <kind> --config <spec>``
(plus the flags after ``--``) from the uploaded working directory, so ``rdeic archive --config
jobs/archive.yaml`` on a laptop and this command do the same thing. Then the driver's logs are
streamed here until the job ends; the exit status is 0 when it SUCCEEDED, 1 otherwise. With
``--no-wait`` the job id is printed and the command returns at once. ``rdeic job status|logs|stop
JOB_ID`` work on the job afterwards.

The runtime environment (see :func:`build_runtime_env`):

* ``working_dir``: the project (default: the repo root, without ``.venv``, ``data``, ``.git``,
  checkpoints, ...; the spec must be inside it), or with ``--working-dir ''`` / ``submit.working_dir:
  ''`` only the spec, for clusters whose image already has the project (infra/Dockerfile);
* ``pip``: the project's pinned requirements (constraints.txt, Ray itself excluded: the cluster
  provides it) unless ``--no-pip`` / ``submit.pip: false`` (an image or shared venv has them);
* ``env_vars``: the S3 credentials and endpoint **taken from the submitter's environment**
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``,
  ``AWS_DEFAULT_REGION``, ...) plus ``submit.pass_env`` names. Their values are never printed,
  logged or written into the spec; job logs streamed here are redacted too.

Ray's token authentication (on by default for Ray-started local clusters since 2.52/2.60): the
token comes from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (Ray's
own order) and is sent as ``Authorization: Bearer``; it is never printed.

Exit status: 0 job SUCCEEDED (or submitted, with --no-wait), 1 job FAILED/STOPPED, 2 bad spec or
options, 3 cluster unreachable or authentication refused, 130 interrupted (the job keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .. import exits
from ..config import DEFAULT_PASS_ENV, ConfigError, JobSpec, load_spec
from ..exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError, run_command
from ..logs import redact_text

HELP = 'submit a job spec to a Ray cluster (Ray Jobs API) and stream its logs'
PASSTHROUGH = True  # the arguments after `--` are appended to the job's command line on the cluster

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # jobs/commands/submit.py -> the repository
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
EXTRAS = ("pipeline", "metrics")
# Never uploaded: environments, data, caches, weights (the working dir upload is capped by Ray).
DEFAULT_EXCLUDES = (".git", ".venv", "venv", "data", "outputs", "runs", "models", "build", "*.egg-info",
                    "__pycache__", ".pytest_cache", ".hypothesis", "*.ckpt", "*.safetensors", "*.pt", "*.pth",
                    "*.tar", "*.parquet")
# Set for every submitted job: JSON logs (per-shard events, redacted), unbuffered output, no hub access.
JOB_ENV = {"RDEIC_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
WORKER_SETUP_HOOK = "jobs.logs.setup_worker_logging"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(exits.ClusterError):
    """The cluster cannot be reached, refused the token, or rejected a request (message says which). Exit 3.

    The message is redacted: it may quote a URL or a Ray error that echoes credentials.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))


# ------------------------------------------------------------------------------------ address + auth
def resolve_address(flag: str | None, spec_value: str | None, environ: Mapping[str, str] | None = None) -> str:
    """CLI flag > spec (``submit.address``) > ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` > local default."""
    env = os.environ if environ is None else environ
    for value in (flag, spec_value, *(env.get(name) for name in ADDRESS_ENVS)):
        if value and value.startswith(("http://", "https://")):
            return value.rstrip("/")
        if value and value not in ("auto", "local") and "://" not in value:
            return f"http://{value}".rstrip("/")  # HOST:PORT of the dashboard
    return DEFAULT_ADDRESS


def read_auth_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """Ray's token lookup order: ``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ClusterError(f"{TOKEN_PATH_ENV} points at {str(path)!r}, which cannot be read: "
                               f"{exc.strerror or exc}") from None
        if not token:
            raise ClusterError(f"{TOKEN_PATH_ENV} points at an empty file {str(path)!r}")
        return token
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    token = read_auth_token(environ)
    return {"Authorization": f"Bearer {token}"} if token else {}


def make_client(address: str, environ: Mapping[str, str] | None = None) -> Any:
    """A ``JobSubmissionClient`` with the token attached; ClusterError with a useful message if it fails."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(environ))
    except AuthenticationError as exc:
        raise ClusterError(_auth_message(address, exc)) from None
    except (ConnectionError, OSError) as exc:
        raise ClusterError(f"cannot reach the Ray dashboard at {address}: {exc}. Is the cluster up, and is "
                           f"the address the dashboard (port 8265), not the GCS (6379)?") from None


def _auth_message(address: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"{address} refused the request ({first}). The cluster uses token authentication: set "
            f"{TOKEN_ENV} (or {TOKEN_PATH_ENV}, or put the token in ~/.ray/auth_token); on KubeRay read it "
            f"from the cluster's auth Secret (infra/README.md)")


def call(address: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a client call, turning Ray's errors into ClusterError (redacted)."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError as exc:
        raise ClusterError(_auth_message(address, exc)) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(str(exc)) from None


# ------------------------------------------------------------------------------------ runtime env
def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def read_constraints(path: Path) -> dict[str, str]:
    """Canonical package name -> pinned ``name==version`` line of a constraints file."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name = line.split("==", 1)[0].split("[", 1)[0].strip()
            pins[_canonical(name)] = line
    return pins


def _requirement_closure(roots: Iterable[str], extras: Mapping[str, set[str]], skip: set[str]) -> set[str]:
    """Canonical names of ``roots`` and everything they require (installed metadata; markers evaluated)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    queue = [(r, extras.get(r, set())) for r in roots]
    while queue:
        name, wanted = queue.pop()
        if name in skip or name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: pinned itself, its own requirements resolve on the cluster
        for text in requires:
            req = Requirement(text)
            envs = [{"extra": e} for e in (wanted or {""})]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                queue.append((_canonical(req.name), set(req.extras)))
    return seen


def pinned_requirements(project_root: Path = PROJECT_ROOT, extras: Iterable[str] = EXTRAS) -> list[str]:
    """``name==version`` for the project's runtime dependencies and their dependencies, from constraints.txt.

    Ray and what only Ray needs are left out: the cluster's Ray is the one that runs the job (the
    image pins the same version), and reinstalling it inside a job's environment breaks workers.
    Test-only extras are not included.
    """
    from packaging.requirements import Requirement

    project = tomllib.loads((project_root / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in extras:
        declared += project.get("optional-dependencies", {}).get(extra, [])
    roots, root_extras = [], {}
    for text in declared:
        req = Requirement(text)
        name = _canonical(req.name)
        roots.append(name)
        root_extras[name] = set(req.extras)
    pins = read_constraints(project_root / "constraints.txt")
    names = _requirement_closure(roots, root_extras, skip={"ray"})
    return sorted((pins.get(n, n) for n in names), key=str.lower)


@dataclass(frozen=True)
class Submission:
    """Everything sent to the cluster for one job (``runtime_env`` holds secret values: never print it)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str]
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    spec_only_dir: str | None = None  # temporary working dir holding just the spec (image mode)

    def describe(self) -> str:
        """A printable summary: env var names only, never their values."""
        env = self.runtime_env.get("env_vars", {})
        pip = self.runtime_env.get("pip")
        wd = ("(the spec only: the cluster's image has the project)" if self.spec_only_dir
              else self.runtime_env.get("working_dir"))
        lines = [f"  entrypoint: {self.entrypoint}",
                 f"  working_dir: {wd}",
                 f"  pip: {len(pip['packages'])} pinned packages" if pip else "  pip: (none)",
                 f"  env vars: {', '.join(sorted(env)) or '(none)'} (values not shown)"]
        return "\n".join(lines)

    def cleanup(self) -> None:
        if self.spec_only_dir:
            shutil.rmtree(self.spec_only_dir, ignore_errors=True)


def build_runtime_env(spec: JobSpec, environ: Mapping[str, str], *, working_dir: str, pip: bool,
                      excludes: bool = True, project_root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The job's runtime_env: working dir, pinned pip packages, env vars passed from ``environ``."""
    names = list(dict.fromkeys([*DEFAULT_PASS_ENV, *(spec.submit.pass_env or [])]))
    env_vars = {name: environ[name] for name in names if environ.get(name)}
    env_vars.update(spec.submit.env or {})
    env_vars.update(JOB_ENV)
    runtime_env: dict[str, Any] = {"working_dir": working_dir, "env_vars": env_vars,
                                   "worker_process_setup_hook": WORKER_SETUP_HOOK}
    if excludes:
        runtime_env["excludes"] = list(dict.fromkeys([*DEFAULT_EXCLUDES, *(spec.submit.excludes or [])]))
    if pip:
        root = _project_root("submit.pip") if project_root == PROJECT_ROOT else project_root
        runtime_env["pip"] = {"packages": pinned_requirements(root), "pip_check": False}
    return runtime_env


def _project_root(what: str) -> Path:
    """The checkout this module runs from; an installed copy (site-packages) has no pyproject/constraints."""
    if (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "constraints.txt").is_file():
        return PROJECT_ROOT
    raise ConfigError(f"{what} needs the project checkout (pyproject.toml, constraints.txt), but jobs/ runs from "
                      f"{PROJECT_ROOT}: submit from the repository, or use --working-dir '' --no-pip when the "
                      f"cluster's image has the project")


def _spec_path_in(spec: JobSpec, working_dir: str) -> str:
    """The spec's path relative to the uploaded working dir (where the job finds it)."""
    assert spec.path is not None
    wd, path = Path(working_dir).resolve(), spec.path.resolve()
    try:
        return path.relative_to(wd).as_posix()
    except ValueError:
        raise ConfigError(f"{spec.path}: the spec must be inside the uploaded working dir {wd} so the job can "
                          f"read it (move it there, set submit.working_dir, or use --working-dir '' when the "
                          f"cluster's image has the project)") from None


def build_submission(spec: JobSpec, environ: Mapping[str, str], *, working_dir: str | None = None,
                     pip: bool | None = None, extra_args: Iterable[str] = (), submission_id: str | None = None,
                     num_cpus: float | None = None, num_gpus: float | None = None) -> Submission:
    """Resolve flags > spec ``submit:`` > defaults into what ``submit_job`` takes.

    Working dir: the project (default), another directory holding the spec, or ``''`` ("image
    mode": the cluster's image has the project, so only the spec is uploaded, from a temporary
    directory the caller removes with :meth:`Submission.cleanup` after submitting).
    """
    assert spec.path is not None
    s = spec.submit
    if working_dir is None:
        working_dir = s.working_dir if s.working_dir is not None else str(_project_root("the default working dir"))
    spec_only = None
    if working_dir:
        if not Path(working_dir).is_dir():
            raise ConfigError(f"submit.working_dir: {working_dir!r} is not a directory")
        working_dir = str(Path(working_dir).resolve())
        spec_arg = _spec_path_in(spec, working_dir)
    else:
        spec_only = tempfile.mkdtemp(prefix="rdeic-spec-")
        spec_arg = spec.path.name
        shutil.copyfile(spec.path, Path(spec_only) / spec_arg)
        working_dir = spec_only
    pip = (True if s.pip is None else s.pip) if pip is None else pip
    entrypoint = shlex.join(["python", "-m", "jobs.cli", spec.kind, "--config", spec_arg, *extra_args])
    sid = submission_id or s.submission_id or (
        f"rdeic-{spec.kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}")
    metadata = {"rdeic.kind": spec.kind, "rdeic.spec": spec_arg, **(s.metadata or {})}
    try:
        runtime_env = build_runtime_env(spec, environ, working_dir=working_dir, pip=pip, excludes=spec_only is None)
    except BaseException:
        if spec_only:
            shutil.rmtree(spec_only, ignore_errors=True)
        raise
    return Submission(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=sid, metadata=metadata,
                      entrypoint_num_cpus=num_cpus if num_cpus is not None else s.entrypoint_num_cpus,
                      entrypoint_num_gpus=num_gpus if num_gpus is not None else s.entrypoint_num_gpus,
                      spec_only_dir=spec_only)


# ------------------------------------------------------------------------------------ running
def submit(client: Any, address: str, sub: Submission) -> str:
    kwargs = {k: v for k, v in (("entrypoint_num_cpus", sub.entrypoint_num_cpus),
                                ("entrypoint_num_gpus", sub.entrypoint_num_gpus)) if v is not None}
    return call(address, client.submit_job, entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                submission_id=sub.submission_id, metadata=sub.metadata, **kwargs)


def follow_logs(client: Any, job_id: str, out: TextIO) -> None:
    """Stream the driver's output until the job ends (every chunk redacted)."""
    import aiohttp

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(redact_text(chunk))
            out.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:
        raise ClusterError(str(exc) or type(exc).__name__) from None


def wait_terminal(client: Any, address: str, job_id: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> str:
    """The job's status once terminal (or the last one seen when ``timeout_s`` passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(call(address, client.get_job_status, job_id))
        status = status.rsplit(".", 1)[-1]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("submit", help=HELP,
                              usage="rdeic submit SPEC.yaml [options] [-- JOB FLAGS...]",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Flags after `--` are appended to the job's command line on the cluster "
                                     "(they override the spec, as on a local command line).")
    p.add_argument("spec", metavar="SPEC.yaml", help="job spec with an archive/restore/audit section")
    p.add_argument("--address", default=None,
                   help="Ray dashboard URL (default: submit.address, $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                        f"{DEFAULT_ADDRESS})")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="directory uploaded as the job's working dir, holding the spec (default: "
                        "submit.working_dir, else the project root); '' uploads only the spec (the image has "
                        "the project)")
    pip = p.add_mutually_exclusive_group()
    pip.add_argument("--pip", dest="pip", action="store_true", default=None,
                     help="install the pinned requirements in the job's runtime env (default unless the spec "
                          "says submit.pip: false)")
    pip.add_argument("--no-pip", dest="pip", action="store_false",
                     help="no pip install (the cluster's image or venv already has the project's packages)")
    p.add_argument("--submission-id", default=None, help="job id to use (must be new on the cluster)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None)
    p.add_argument("--entrypoint-num-gpus", type=float, default=None)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be submitted (env var names only) and exit")
    p.set_defaults(func=lambda args: run_command("submit", lambda: run(args)))
    return p


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
        sub = build_submission(spec, os.environ, working_dir=args.working_dir, pip=args.pip,
                               extra_args=getattr(args, "passthrough", []), submission_id=args.submission_id,
                               num_cpus=args.entrypoint_num_cpus, num_gpus=args.entrypoint_num_gpus)
    except ConfigError as exc:
        raise UsageError(redact_text(str(exc))) from None
    address = resolve_address(args.address, spec.submit.address)
    try:
        if args.dry_run:
            print(f"would submit {spec.kind} job {sub.submission_id} to {address}\n{sub.describe()}")
            return EXIT_OK
        client = make_client(address)
        job_id = submit(client, address, sub)
    finally:
        sub.cleanup()  # the working dir is uploaded by now
    print(f"submitted {spec.kind} job {job_id} to {address}\n{sub.describe()}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return EXIT_OK
    try:
        follow_logs(client, job_id, sys.stdout)
        status = wait_terminal(client, address, job_id)
    except KeyboardInterrupt:  # the job goes on: say how to stop it
        print(f"\nstopped following; job {job_id} keeps running. `rdeic job stop {job_id} --address {address}` "
              f"stops it.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ClusterError as exc:
        raise ClusterError(f"lost the job's logs ({exc}); `rdeic job status {job_id} --address {address}`") from None
    print(f"job {job_id}: {status}", file=sys.stderr)
    print(job_id)
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED
