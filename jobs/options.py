"""Job options: one typed dataclass per job, from which its flags, its spec schema and its job.yaml come.

A shard job's options are a frozen dataclass of :func:`option` fields (``JobOptions`` and its
subclasses). From that one declaration come:

- the command-line flags (:func:`add_flags`; ``--max-shard-retries`` for ``max_shard_retries``),
- the spec schema with its error messages (:func:`spec_schema`, validated by ``jobs.config``),
- the values a command runs with (:func:`from_args`), checked once (``JobOptions.__post_init__``),
- the resolved spec saved as ``<output>/job.yaml`` and shown by ``--print-config`` (:func:`to_spec`).

Why: a setting used to be written four or five times (flag, spec schema, job dataclass, the
mapping between them), and a new one was easy to add to some of them only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

from pipeline.restore import DEFAULT_DECODE_BATCH

from .exits import UsageError

EXECUTORS = ("ray", "local")
MODEL_ENV = "RDEIC_MODEL"
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# one text for the --tile-batch flag and the tile_batch key of every job spec
TILE_BATCH_HELP = ("tiles (or whole images) per network pass: bounds codec memory; does not change which pixels "
                   "are computed, but, like --batch-size, batch composition can move a few pixels by one level "
                   "(default: the codec's own)")
_OPTION = "rdeic.option"


class JobConfigError(UsageError, ValueError):
    """A job cannot start as configured; the message says which value is wrong (exit status 2)."""


def json_object(text: str) -> dict[str, Any]:
    """``--storage-options``: a JSON object, inline or ``@file.json``."""
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}: {text!r}")
    return value


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low`` (the flag's error names the bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


@dataclass(frozen=True)
class OptionMeta:
    """How one field shows up as a flag and as a spec key (see :func:`option`)."""

    help: str
    key: str | None = None  # flag/spec name when it differs from the field's (``input`` for ``inputs``)
    spec_help: str | None = None  # the spec schema's text, when it differs from the flag's
    metavar: str | None = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    nonempty: bool = False
    required: bool = False  # on the command line or in the spec
    repeat: bool = False  # a repeatable flag (``--input A --input B``); a list in the spec
    parse: Callable[[str], Any] | None = None  # flag text -> value (a spec string goes through it too)
    unparse: Callable[[Any], Any] | None = None  # value -> its spec form (job.yaml)
    env: str | None = None  # the flag's default comes from this environment variable
    saved: bool = True  # written to job.yaml (an operator's one-off, like --break-lease, is not)
    exposed: bool = True  # a flag and a spec key at all (False: a knob for code and tests only)
    negative_help: str | None = None  # for an optional bool: the help of its --no-FLAG

    def spec_meta(self) -> dict[str, Any]:
        return {"help": self.spec_help or self.help, "min": self.min, "max": self.max, "choices": self.choices,
                "nonempty": self.nonempty}


def option(help: str, *, default: Any = None, factory: Callable[[], Any] | None = None, **meta: Any) -> Any:
    """A job option field; ``meta`` are :class:`OptionMeta` fields (``min``, ``choices``, ``repeat``...)."""
    if "choices" in meta and meta["choices"] is not None:
        meta["choices"] = tuple(meta["choices"])
    info = {_OPTION: OptionMeta(help=help, **meta)}
    if meta.get("required") and default is None and factory is None:
        return field(metadata=info)  # no default: a job built in code must name it too
    if factory is not None:
        return field(default_factory=factory, metadata=info)
    return field(default=default, metadata=info)


def meta_of(f: dataclasses.Field[Any]) -> OptionMeta:
    m = f.metadata.get(_OPTION)
    return m if isinstance(m, OptionMeta) else OptionMeta(help="", exposed=False)


def is_mapping(tp: Any) -> bool:
    return tp is dict or get_origin(tp) is dict


def strip_optional(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is not None and len(args) == 1 and type(None) in get_args(tp):
        return args[0]
    return tp


def flag_name(f: dataclasses.Field[Any]) -> str:
    return "--" + key_of(f).replace("_", "-")


def key_of(f: dataclasses.Field[Any]) -> str:
    return meta_of(f).key or f.name


def exposed_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields that are flags and spec keys: the class's own first, then those it shares (JobOptions)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if meta_of(f).exposed}
    order: list[str] = []
    for k in cls.__mro__:  # most derived first; each field where it was first declared
        declared = list(k.__dict__.get("__annotations__", {}))
        introduced = [n for n in declared if n in fields and not any(
            n in b.__dict__.get("__annotations__", {}) for b in k.__mro__[1:])]
        order.extend(introduced)
    return [fields[n] for n in order]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


# ------------------------------------------------------------------------------------ the options
@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """What every shard job shares: where and how shards run. Each job's options class embeds it."""

    config_error: ClassVar[type[Exception]] = JobConfigError  # what a bad value, model or output raises

    model: str | None = option("model directory or shipped name", metavar="NAME_OR_DIR")
    executor: str = option("where shards run", default="ray", choices=EXECUTORS)
    num_actors: int | None = option("Ray workers (default: one per GPU, else CPUs)", min=1, metavar="N")
    storage_options: dict[str, Any] = option(
        "fsspec options for remote storage (inputs and output), JSON or @file.json", factory=dict, metavar="JSON",
        spec_help="fsspec options for remote storage (no secrets here: use the AWS_* environment)")
    ray_address: str | None = option("Ray cluster to join (default: RAY_ADDRESS or a local Ray)")
    device: str = option("auto (CUDA if visible), cpu, cuda, cuda:N", default="auto",
                         spec_help="auto, cpu, cuda, cuda:N")
    compute_dtype: str | None = option("VAE/UNet dtype on GPU (CPU is always float32)", choices=COMPUTE_DTYPES)
    batch_size: int = option("images per network batch", default=1, min=1)
    tile_batch: int | None = option(TILE_BATCH_HELP, min=1, metavar="N")
    max_shard_retries: int = option("retries of a failed shard attempt", default=2, min=0)
    restart_timeout_s: float = option(
        "Ray: seconds to wait for a dead worker to come back (on any node with a free slot) before giving it "
        "up; with no worker left, the pending shards are marked failed instead of waiting", default=600.0, min=0,
        metavar="S")
    break_lease: bool = option(
        "take the output's lease even though another job holds it and it has not expired: only when you know "
        "that job is dead (its next write then fails, exit status 75)", default=False, saved=False,
        spec_help="take the output's lease even from a job that has not released it and whose lease has not "
                  "expired: only when that job is known to be dead (never saved in job.yaml)")
    progress: bool | None = option("always draw bars", negative_help="never draw bars",
                                   spec_help="draw progress bars (default: only on a terminal)")

    def __post_init__(self) -> None:
        if self.compute_dtype == "float32":  # CPU and GPU default: the codec's own dtype
            object.__setattr__(self, "compute_dtype", None)
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            meta, value = meta_of(f), getattr(self, f.name)
            if meta.repeat and isinstance(value, (list, str)):
                object.__setattr__(self, f.name, (value,) if isinstance(value, str) else tuple(value))
            self._check(f, meta, getattr(self, f.name), hints[f.name])
        self.check()

    def _check(self, f: dataclasses.Field[Any], meta: OptionMeta, value: Any, tp: Any) -> None:
        flag = flag_name(f)
        if meta.nonempty and not value:
            raise self.config_error(f"no {flag} given")
        if value is None:
            return
        if meta.choices and value not in meta.choices:
            raise self.config_error(f"unknown {flag[2:].replace('-', ' ')} {value!r}; expected one of {meta.choices}")
        if meta.min is not None and value < meta.min:
            raise self.config_error(f"{flag} must be >= {_num(meta.min)}, got {value}")
        if meta.max is not None and value > meta.max:
            raise self.config_error(f"{flag} must be <= {_num(meta.max)}, got {value}")
        if is_mapping(strip_optional(tp)) and not isinstance(value, dict):
            raise self.config_error(f"storage options must be a JSON object, got {value!r}"
                                    if f.name == "storage_options" else f"{flag} must be a JSON object")

    def check(self) -> None:
        """A job's own rules across fields (override); raise ``self.config_error``."""

    def to_config(self) -> dict[str, Any]:
        """Every field, JSON-able, secrets in the storage options redacted (run.json, archive metadata)."""
        from pipeline.storage import redact

        config = dataclasses.asdict(self)
        for name, value in config.items():
            if isinstance(value, tuple):
                config[name] = list(value)
        config["storage_options"] = redact(self.storage_options)
        return config


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ------------------------------------------------------------------------------------ flags
def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse option per exposed field (the spec keys are the same names)."""
    hints = get_type_hints(cls)
    for f in exposed_fields(cls):
        meta, tp, key = meta_of(f), strip_optional(hints[f.name]), key_of(f)
        default = _default(f)
        if meta.env:
            default = os.environ.get(meta.env, default)
        kw: dict[str, Any] = {"dest": key, "help": meta.help}
        if meta.metavar:
            kw["metavar"] = meta.metavar
        if tp is bool and _default(f) is None:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag_name(f), action="store_true", default=None, **kw)
            group.add_argument("--no-" + key.replace("_", "-"), dest=key, action="store_false",
                               help=meta.negative_help)
            continue
        if tp is bool:
            parser.add_argument(flag_name(f), action="store_true", default=bool(default), **kw)
            continue
        if meta.repeat:
            kw.update(action="append", default=None)
        else:
            kw["default"] = default
            kw["type"] = meta.parse or (json_object if is_mapping(tp) else
                                        at_least(int(meta.min)) if tp is int and meta.min is not None else tp)
        if meta.choices and not meta.parse:
            kw["choices"] = meta.choices
        parser.add_argument(flag_name(f), required=meta.required, **kw)


def from_args(cls: Any, args: argparse.Namespace) -> Any:
    """The options a parsed command line (merged with its spec) stands for; ``cls.config_error`` if invalid."""
    values: dict[str, Any] = {}
    for f in exposed_fields(cls):
        meta, value = meta_of(f), getattr(args, key_of(f), None)
        if meta.parse is not None and isinstance(value, str):
            try:
                value = meta.parse(value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise cls.config_error(str(exc)) from None
        if meta.repeat:
            value = () if value is None else (value,) if isinstance(value, str) else tuple(value)
        values[f.name] = value
    return cls(**values)


def to_spec(options: Any) -> dict[str, Any]:
    """The options as a spec section (keys = flags with '_'; job.yaml, --print-config): saved fields only,
    secrets in the storage options redacted."""
    from pipeline.storage import redact

    out: dict[str, Any] = {}
    for f in exposed_fields(type(options)):
        meta, value = meta_of(f), getattr(options, f.name)
        if not meta.saved:
            continue
        if meta.unparse is not None:
            value = meta.unparse(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key_of(f)] = value
    if isinstance(out.get("storage_options"), dict):
        out["storage_options"] = redact(out["storage_options"])
    return out


# ------------------------------------------------------------------------------------ spec schema
def spec_field(help: str, *, min: float | None = None, max: float | None = None,
               choices: Sequence[str] | None = None, nonempty: bool = False) -> Any:
    """A spec schema field: ``None`` means "not given" (the flag's default or the CLI decides)."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "nonempty": nonempty}
    return field(default=None, metadata=meta)


def spec_schema(cls: type, kind: str) -> type:
    """The spec section of a job as a dataclass of optional fields (``jobs.config`` validates with it).

    A repeatable flag takes a list; a flag with its own parser takes the text it parses.
    """
    hints = get_type_hints(cls)
    fields = []
    for f in exposed_fields(cls):
        meta, tp = meta_of(f), strip_optional(hints[f.name])
        if meta.repeat:
            tp = list[str]
        elif meta.parse is not None:
            tp = str
        elif is_mapping(tp):
            tp = dict[str, Any]
        fields.append((key_of(f), tp | None, spec_field(**meta.spec_meta())))
    name = f"{kind.title()}Spec"
    schema = dataclasses.make_dataclass(name, fields, frozen=True)
    schema.__doc__ = f"``rdeic {kind}``: one field per long flag (derived from {cls.__name__})."
    return schema


@dataclass(frozen=True, kw_only=True)
class DecodeJobOptions(JobOptions):
    """What the jobs that decode an archive (restore, audit) add to the shared options."""

    archive: str = option("archive prefix written by `rdeic archive`", required=True, metavar="URL")
    steps: int | None = option("relay steps (default: each bitstream header's)", min=0,
                               spec_help="relay steps (default: each bitstream header's)")
    detail_scale: float | None = option("detail scale (default: each header's)", min=0,
                                        spec_help="detail scale (default: each bitstream header's)")
    model: str | None = option(f"model (default: ${MODEL_ENV}, else the model in the archive's run.json)",
                               metavar="NAME_OR_DIR",
                               spec_help="model directory or shipped name (default: $RDEIC_MODEL, else the model "
                                         "named in the archive's run.json)")
    storage_options: dict[str, Any] = option(
        "fsspec options for remote storage (archive, sources and output), JSON or @file.json", factory=dict,
        metavar="JSON", spec_help="fsspec options for remote storage")
    batch_size: int = option("streams decoded together (only streams of one padded size share a batch)",
                             default=DEFAULT_DECODE_BATCH, min=1, spec_help="bitstreams decoded together")
