"""Job specs: YAML files validated into typed configs, and how they combine with flags.

A spec names one job section (``archive``, ``restore`` or ``audit``) and, optionally, a ``submit``
section used only by ``rdeic submit``::

    archive:                       # the job: keys are the command's long flags, '-' -> '_'
      input: ["s3://b/shards/{000000..000999}.tar"]
      output: s3://b/archive-v1
      num_actors: 8
    submit:                        # cluster submission (ignored by `rdeic archive --config`)
      address: http://HEAD:8265
      pip: true

Why typed schemas instead of passing YAML straight to the job: a typo (``num_actor``) or a wrong
type (``num_actors: eight``) must stop the job before it touches storage, with a message naming
the field (``archive.num_actors: expected int >= 1, got 'eight'``), not surface as a KeyError
halfway through a cluster run.

Precedence (docs/jobs.md): **CLI flags > job YAML > environment > defaults**. Environment values
(e.g. ``RDEIC_MODEL``) are the flags' defaults, so YAML values replace them and flags given on the
command line replace YAML values. ``jobs.cli`` applies this for every command with a schema.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

RESOLVED_CONFIG_FILE = "job.yaml"
JOB_KINDS = ("archive", "restore", "audit")
SUBMIT_SECTION = "submit"


class ConfigError(ValueError):
    """A spec value is missing, unknown or invalid; the message starts with the field path."""


# ------------------------------------------------------------------------------------ fields
def spec_field(help: str, *, min: float | None = None, max: float | None = None,
               choices: Sequence[str] | None = None, nonempty: bool = False, default: Any = None) -> Any:
    """A schema field: ``None`` means "not given" (the flag's default or the CLI decides)."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "nonempty": nonempty}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (list, tuple, Sequence):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin in (dict, Mapping):
        return "mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    name = _type_name(tp)
    for key, op in (("min", ">="), ("max", "<=")):
        if meta.get(key) is not None:
            bound = meta[key]
            name += f"{' and' if op == '<=' and meta.get('min') is not None else ''} {op} " \
                    f"{int(bound) if float(bound).is_integer() else bound}"
    if meta.get("nonempty"):
        name = f"non-empty {name}"
    return name


def _strip_optional(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is not None and len(args) == 1 and type(None) in get_args(tp):
        return args[0]
    return tp


def _check_value(path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """The validated (and lightly normalised) value, or ConfigError naming ``path``."""
    tp = _strip_optional(tp)
    want = _describe(tp, meta)

    def bad() -> ConfigError:
        return ConfigError(f"{path}: expected {want}, got {value!r}")

    origin = get_origin(tp)
    if tp is Any:
        out = value
    elif tp is bool:
        if not isinstance(value, bool):
            raise bad()
        out = value
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        out = value
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        out = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad()
        out = value
    elif origin in (list, tuple, Sequence):
        item_tp = get_args(tp)[0]
        if isinstance(value, str) and item_tp is str:
            value = [value]  # `input: s3://...` is a one-element list
        if not isinstance(value, list):
            raise bad()
        out = [_check_value(f"{path}[{i}]", v, item_tp, {}) for i, v in enumerate(value)]
    elif origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise bad()
        key_tp, val_tp = get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{path}: keys must be strings, got {k!r}")
            out[k] = _check_value(f"{path}.{k}", v, val_tp, {})
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported schema type {tp!r} for {path}")
    if meta.get("choices") and out not in meta["choices"]:
        raise bad()
    if meta.get("min") is not None and out < meta["min"]:
        raise bad()
    if meta.get("max") is not None and out > meta["max"]:
        raise bad()
    if meta.get("nonempty") and not out:
        raise bad()
    return out


def validate_section(schema: type, data: Any, path: str) -> Any:
    """Build ``schema`` (a dataclass) from a mapping; unknown keys and bad values raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {data!r}")
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown setting; expected one of {', '.join(sorted(fields))}")
    values = {}
    for name, value in data.items():
        if value is None:
            continue  # `key: null` = not given
        values[name] = _check_value(f"{path}.{name}", value, hints[name], fields[name].metadata)
    return schema(**values)


def given(section: Any) -> dict[str, Any]:
    """The fields a spec section sets (None = not given)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if getattr(section, f.name) is not None}


def schema_help(schema: type) -> dict[str, str]:
    """Field name -> one-line description (docs/jobs.md is checked against this)."""
    hints = get_type_hints(schema)
    return {f.name: f"{_describe(hints[f.name], f.metadata)}: {f.metadata['help']}" for f in dataclasses.fields(schema)}


# ------------------------------------------------------------------------------------ schemas
_EXECUTORS = ("ray", "local")
# --tile-batch (jobs.codec.add_tile_batch_option): codec.tiling.batch of every worker's codec
_BREAK_LEASE_HELP = ("take the output's lease even from a job that has not released it and whose lease has not "
                     "expired: only when that job is known to be dead (never saved in job.yaml)")
# one text for the --tile-batch flag (jobs.codec) and the tile_batch key of every job spec
TILE_BATCH_HELP = ("tiles (or whole images) per network pass: bounds codec memory; does not change which pixels "
                   "are computed, but, like --batch-size, batch composition can move a few pixels by one level "
                   "(default: the codec's own)")


@dataclass(frozen=True)
class ArchiveSpec:
    """``rdeic archive`` (jobs/commands/archive.py): one field per long flag."""

    input: list[str] | None = spec_field("shards: brace pattern, glob, @list.txt or URL (flag: --input, repeatable)",
                                         nonempty=True)
    output: str | None = spec_field("output prefix (s3://..., file://..., path)")
    model: str | None = spec_field("model directory or shipped name (env RDEIC_MODEL)")
    executor: str | None = spec_field("where shards run", choices=_EXECUTORS)
    num_actors: int | None = spec_field("Ray workers (default: one per GPU, else CPUs)", min=1)
    storage_options: dict[str, Any] | None = spec_field("fsspec options for remote storage (no secrets here: "
                                                        "use the AWS_* environment)")
    ray_address: str | None = spec_field("Ray cluster to join (default: RAY_ADDRESS or a local Ray)")
    device: str | None = spec_field("auto, cpu, cuda, cuda:N")
    compute_dtype: str | None = spec_field("VAE/UNet dtype on GPU", choices=("float32", "bfloat16", "float16"))
    batch_size: int | None = spec_field("images per encoder batch", min=1)
    tile_batch: int | None = spec_field(TILE_BATCH_HELP, min=1)
    max_pixels: int | None = spec_field("larger images are recorded as failed (too_large)", min=1)
    max_member_bytes: int | None = spec_field("larger tar members are skipped (member_too_large)", min=1)
    row_group_size: int | None = spec_field("Parquet rows per row group", min=1)
    max_shard_retries: int | None = spec_field("retries of a failed shard attempt", min=0)
    retry_failed: bool | None = spec_field("also redo the rows of done shards that failed for a transient reason "
                                           "(out of memory); permanent failures are left alone")
    break_lease: bool | None = spec_field(_BREAK_LEASE_HELP)
    progress: bool | None = spec_field("draw progress bars (default: only on a terminal)")


@dataclass(frozen=True)
class _DecodeJobSpec:
    """Options restore and audit share with archive (``jobs.commands.restore.add_common_arguments``)."""

    model: str | None = spec_field("model directory or shipped name (default: $RDEIC_MODEL, else the model "
                                   "named in the archive's run.json)")
    executor: str | None = spec_field("where shards run", choices=_EXECUTORS)
    num_actors: int | None = spec_field("Ray workers (default: one per GPU, else CPUs)", min=1)
    storage_options: dict[str, Any] | None = spec_field("fsspec options for remote storage")
    ray_address: str | None = spec_field("Ray cluster to join (default: RAY_ADDRESS or a local Ray)")
    device: str | None = spec_field("auto, cpu, cuda, cuda:N")
    compute_dtype: str | None = spec_field("VAE/UNet dtype on GPU", choices=("float32", "bfloat16", "float16"))
    batch_size: int | None = spec_field("bitstreams decoded together", min=1)
    tile_batch: int | None = spec_field(TILE_BATCH_HELP, min=1)
    max_shard_retries: int | None = spec_field("retries of a failed shard attempt", min=0)
    break_lease: bool | None = spec_field(_BREAK_LEASE_HELP)
    progress: bool | None = spec_field("draw progress bars (default: only on a terminal)")


@dataclass(frozen=True)
class RestoreSpec(_DecodeJobSpec):
    """``rdeic restore`` (jobs/commands/restore.py): archive -> PNG WebDataset shards or a folder tree."""

    archive: str | None = spec_field("archive prefix written by `rdeic archive`")
    output: str | None = spec_field("output prefix (s3://..., file://..., path)")
    format: str | None = spec_field("wds: shards/<shard>.tar; folder: images/<shard>/<key>.png",
                                    choices=("wds", "folder"))
    steps: int | None = spec_field("relay steps (default: each bitstream header's)", min=0)
    detail_scale: float | None = spec_field("detail scale (default: each bitstream header's)", min=0)


@dataclass(frozen=True)
class AuditSpec(_DecodeJobSpec):
    """``rdeic audit`` (jobs/commands/audit.py): decode (a sample of) an archive and measure it against the sources."""

    archive: str | None = spec_field("archive prefix written by `rdeic archive`")
    source: list[str] | None = spec_field("source shards, as archive's input (flag: --source, repeatable)",
                                          nonempty=True)
    output: str | None = spec_field("where metrics, summary.json and report.html go")
    fraction: float | None = spec_field("fraction of archived keys to audit (hash-sampled)", min=0, max=1)
    seed: int | None = spec_field("seed of the key sample", min=0)
    steps: int | None = spec_field("relay steps (default: each bitstream header's)", min=0)
    detail_scale: float | None = spec_field("detail scale (default: each bitstream header's)", min=0)
    perceptual: str | None = spec_field("perceptual metrics tried when their weights exist: 'lpips,dists,fid' "
                                        "(any subset) or 'none'")
    fid_patch: int | None = spec_field("FID/KID patch size in px", min=1)
    worst_k: int | None = spec_field("worst images (by PSNR) shown in the report", min=0)


# Env var names that are never copied into a spec or a log (values come from the submitter's
# environment into the Ray runtime_env only).
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
DEFAULT_PASS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                    "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "RDEIC_MODEL")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|(^|_)KEY(_|$)|ACCESS_KEY", re.IGNORECASE)


def looks_secret(name: str) -> bool:
    """Whether an env var name looks like it holds a secret (such values are never written down)."""
    return bool(_SECRET_NAME.search(name))


@dataclass(frozen=True)
class SubmitSpec:
    """``rdeic submit`` settings: where and how the job section runs on a Ray cluster."""

    address: str | None = spec_field("Ray dashboard URL, e.g. http://HEAD:8265 (env RAY_API_SERVER_ADDRESS, "
                                     "RAY_ADDRESS)")
    working_dir: str | None = spec_field("directory uploaded as the job's working dir (default: the project "
                                         "root); '' = none (the image has the project)")
    excludes: list[str] | None = spec_field("extra paths/globs left out of the working dir upload")
    pip: bool | None = spec_field("install the project's pinned requirements (constraints.txt) in the job's "
                                  "runtime env; false when the image/venv already has them")
    pass_env: list[str] | None = spec_field("environment variables copied from the submitter into the job "
                                            "(added to the AWS_* defaults); values are never logged")
    env: dict[str, str] | None = spec_field("literal, non-secret environment variables for the job")
    entrypoint_num_cpus: float | None = spec_field("CPUs reserved for the job's driver", min=0)
    entrypoint_num_gpus: float | None = spec_field("GPUs reserved for the job's driver", min=0)
    submission_id: str | None = spec_field("job id (default: rdeic-<kind>-<time>-<random>)")
    metadata: dict[str, str] | None = spec_field("job metadata shown by Ray")

    def __post_init__(self) -> None:
        for name in self.env or {}:
            if looks_secret(name):
                raise ConfigError(f"submit.env.{name}: looks like a secret; secrets are never written into a "
                                  f"spec: export it and list it under submit.pass_env")
        for name in self.pass_env or []:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ConfigError(f"submit.pass_env: {name!r} is not an environment variable name")


SCHEMAS: dict[str, type] = {"archive": ArchiveSpec, "restore": RestoreSpec, "audit": AuditSpec}


@dataclass(frozen=True)
class JobSpec:
    """A validated spec file: one job section plus optional submission settings."""

    kind: str
    job: Any
    submit: SubmitSpec
    path: Path | None = None

    def job_values(self) -> dict[str, Any]:
        return given(self.job)


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Validate a loaded YAML document (see the module doc for its shape)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with one of {', '.join(JOB_KINDS)}, got {data!r}")
    allowed = (*JOB_KINDS, SUBMIT_SECTION)
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; expected {', '.join(JOB_KINDS)} (one of them) "
                          f"and optionally {SUBMIT_SECTION}")
    kinds = [k for k in JOB_KINDS if k in data]
    if len(kinds) != 1:
        raise ConfigError(f"{source}: expected exactly one job section ({', '.join(JOB_KINDS)}), got "
                          f"{kinds or 'none'}")
    kind = kinds[0]
    job = validate_section(SCHEMAS[kind], data[kind], kind)
    submit = validate_section(SubmitSpec, data.get(SUBMIT_SECTION), SUBMIT_SECTION)
    return JobSpec(kind=kind, job=job, submit=submit)


def load_spec(path: str | Path, expect_kind: str | None = None) -> JobSpec:
    """Read and validate a spec file; ``expect_kind`` refuses a spec for another command."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read spec {str(p)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    spec = parse_spec(data, str(p))
    if expect_kind is not None and spec.kind != expect_kind:
        raise ConfigError(f"{p}: is a {spec.kind!r} spec, not {expect_kind!r}")
    return dataclasses.replace(spec, path=p)


# ------------------------------------------------------------------------------------ argparse
def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options actually given in ``argv`` (not filled from defaults).

    argparse cannot tell "given" from "defaulted" after parsing, so the arguments are parsed again
    with every default suppressed; only what the user typed lands in the namespace.
    """
    saved = [(a, a.default, a.required) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in parser._actions:
            a.default, a.required = argparse.SUPPRESS, False
        parser._defaults.clear()
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
        parser._defaults.update(saved_defaults)
    return set(vars(ns))


def apply_spec(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str],
               spec: JobSpec) -> list[str]:
    """Fill ``args`` from the spec's job section where no flag was given; returns the fields applied."""
    explicit = explicit_dests(parser, argv)
    actions = {a.dest: a for a in parser._actions}
    applied = []
    for name, value in spec.job_values().items():
        if name not in actions:
            raise ConfigError(f"{spec.kind}.{name}: this version of `rdeic {spec.kind}` has no --"
                              f"{name.replace('_', '-')} option")
        if name not in explicit:
            setattr(args, name, _as_flag_value(f"{spec.kind}.{name}", value, actions[name]))
            applied.append(name)
    return applied


def _as_flag_value(path: str, value: Any, action: argparse.Action) -> Any:
    """A spec string goes through the flag's own converter (e.g. ``--perceptual lpips,fid`` -> a tuple),
    so the command sees the same value it would get from the command line."""
    convert = action.type
    if not isinstance(value, str) or convert is None or convert is str or isinstance(convert, type):
        return value
    try:
        return convert(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolved_section(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The job's effective settings (flags > spec > environment > defaults) in spec form, secrets redacted."""
    from pipeline.storage import redact

    out = {}
    schema = SCHEMAS[kind]
    own = set(schema.__dict__.get("__annotations__", {}))  # the command's own fields first, shared ones after
    hints = get_type_hints(schema)
    for f in sorted(dataclasses.fields(schema), key=lambda f: f.name not in own):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if isinstance(value, (tuple, list)) and _strip_optional(hints[f.name]) is str:
                value = ",".join(value) or "none"  # a flag that parses "a,b" into a tuple: back to its text
            out[f.name] = list(value) if isinstance(value, tuple) else value
    if isinstance(out.get("storage_options"), dict):
        out["storage_options"] = redact(out["storage_options"])
    out.pop("break_lease", None)  # an operator's one-off: a saved spec must never break a live job's lease
    return out


def dump_spec(kind: str, section: Mapping[str, Any]) -> str:
    """YAML text of a spec with one job section (what ``job.yaml`` and ``--print-config`` show)."""
    plain = json.loads(json.dumps(dict(section), default=str))
    return yaml.safe_dump({kind: plain}, sort_keys=False, default_flow_style=False)


def write_resolved_config(output: str, kind: str, section: Mapping[str, Any],
                          storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``<output>/job.yaml`` (the resolved spec, rerunnable with ``--config``); returns its URL.

    Jobs call this once their output location has been accepted, so a refused run never
    overwrites the record of the run that owns the prefix.
    """
    from pipeline import storage

    fs, root = storage.filesystem(storage.normalize_url(output), dict(storage_options or {}))
    path = storage.join(root, RESOLVED_CONFIG_FILE)
    storage.write_bytes_atomic(fs, path, dump_spec(kind, section).encode())
    return storage.to_url(fs, path)
