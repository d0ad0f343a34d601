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
import functools
import importlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from pipeline.manifest import JOB_SPEC_FILE

from .commands import discover
from .exits import UsageError
from .options import spec_field, spec_schema, strip_optional

RESOLVED_CONFIG_FILE = JOB_SPEC_FILE
SUBMIT_SECTION = "submit"


class ConfigError(UsageError, ValueError):
    """A spec value is missing, unknown or invalid; the message starts with the field path (exit status 2)."""


# ------------------------------------------------------------------------------------ fields
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


def _check_value(path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """The validated (and lightly normalised) value, or ConfigError naming ``path``."""
    tp = strip_optional(tp)
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


# ------------------------------------------------------------------------------------ schemas
@functools.cache
def job_schemas() -> dict[str, type]:
    """Job name -> its spec section's schema, derived from each job command's ``OPTIONS`` (``jobs.options``).

    Found by listing ``jobs.commands``: a new job's section is valid in specs without an edit here.
    """
    return {name: spec_schema(importlib.import_module(c.module).OPTIONS, name)
            for name, c in discover().items() if c.has_spec}


def job_kinds() -> tuple[str, ...]:
    return tuple(job_schemas())


def __getattr__(name: str) -> Any:
    """``SCHEMAS``, ``JOB_KINDS`` and ``<Kind>Spec`` (e.g. ``ArchiveSpec``), derived on first use: deriving
    them imports the job commands, which import this module's neighbours."""
    if name == "SCHEMAS":
        return job_schemas()
    if name == "JOB_KINDS":
        return job_kinds()
    for schema in job_schemas().values():
        if name == schema.__name__:
            return schema
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Env vars `rdeic submit` passes from the submitter into the Ray runtime_env (values never logged).
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
    kinds_all = job_kinds()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with one of {', '.join(kinds_all)}, got {data!r}")
    allowed = (*kinds_all, SUBMIT_SECTION)
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; expected {', '.join(kinds_all)} (one of them) "
                          f"and optionally {SUBMIT_SECTION}")
    kinds = [k for k in kinds_all if k in data]
    if len(kinds) != 1:
        raise ConfigError(f"{source}: expected exactly one job section ({', '.join(kinds_all)}), got "
                          f"{kinds or 'none'}")
    kind = kinds[0]
    job = validate_section(job_schemas()[kind], data[kind], kind)
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
    convert: Any = action.type
    if not isinstance(value, str) or convert is None or convert is str or isinstance(convert, type):
        return value
    try:
        return convert(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolved_section(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The job's effective settings (flags > spec > environment > defaults) in spec form, secrets redacted;
    the same text the job saves as ``job.yaml`` (``break_lease``, an operator's one-off, is never in it)."""
    from .options import from_args, to_spec

    module = importlib.import_module(discover()[kind].module)
    return to_spec(from_args(module.OPTIONS, args))


def dump_spec(kind: str, section: Mapping[str, Any]) -> str:
    """YAML text of a spec with one job section (what ``job.yaml`` and ``--print-config`` show)."""
    plain = json.loads(json.dumps(dict(section), default=str))
    return yaml.safe_dump({kind: plain}, sort_keys=False, default_flow_style=False)
