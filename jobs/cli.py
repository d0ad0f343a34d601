"""The ``rdeic`` command: one entry point, one subcommand per job.

Each command module (``jobs/commands/<name>.py``, found without a central list: ``jobs.commands``)
exposes ``add_parser(subparsers)``, which registers its subcommand and sets ``func`` (argparse
namespace -> exit status).

Commands with a spec schema (those defining ``OPTIONS``: archive, restore, audit) also get
``--config SPEC.yaml`` and ``--print-config`` here, so every job reads YAML the same way:
flags given on the command line win over the spec, the spec over environment-derived defaults,
those over built-in defaults (docs/jobs.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .commands import discover
from .exits import EXIT_USAGE, CommandError, UsageError, report

# Subcommand name -> module, and the line `rdeic --help` shows for it: found by listing
# ``jobs.commands`` (``jobs.commands.discover``, at every parse), so adding a command edits nothing here.
SUBCOMMANDS: dict[str, str] = {name: c.module for name, c in discover().items()}
SUBCOMMAND_HELP: dict[str, str] = {name: c.help for name, c in discover().items()}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _import_command(name: str) -> Any:
    module = discover()[name].module
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise SystemExit(f"rdeic {name}: not available in this installation (no module {exc.name})") from None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (the others are listed for --help)."""
    from .logs import LOG_FORMATS, log_format_from_env

    parser = argparse.ArgumentParser(
        prog="rdeic", description="RDEIC extreme image compression: jobs and tools.",
        epilog="Run `rdeic COMMAND --help` for a command's options. Precedence of settings: command-line "
               "flags > job spec (--config) > environment > defaults (docs/jobs.md).")
    parser.add_argument("--log-level", default=os.environ.get("RDEIC_LOG_LEVEL", "INFO").upper(), choices=LOG_LEVELS,
                        help="(env RDEIC_LOG_LEVEL)")
    parser.add_argument("--log-format", default=log_format_from_env(), choices=LOG_FORMATS,
                        help="text lines or JSON lines with per-shard events (env RDEIC_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = discover()
    for name, command in commands.items():
        if only == name:
            _import_command(name).add_parser(sub)
            if commands[name].has_spec:
                _add_config_options(sub.choices[name], name)
        else:
            sub.add_parser(name, help=command.help)
    return parser


def _add_config_options(p: argparse.ArgumentParser, name: str) -> None:
    known = {opt for a in p._actions for opt in a.option_strings}
    if "--config" not in known:
        p.add_argument("--config", metavar="SPEC.yaml", default=None,
                       help=f"job spec with a `{name}:` section (keys = long flags with '_'); flags given here "
                            f"override it (docs/jobs.md)")
    if "--print-config" not in known:
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved settings as a spec and exit without running")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _chosen_command(argv: Sequence[str]) -> str | None:
    commands = discover()
    return next((a for a in argv if a in commands), None)


def _relax_required(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """Required options may come from the spec: argparse must not demand them on the command line."""
    required = [a for a in p._actions if a.required and a.option_strings]
    for a in required:
        a.required = False
    return required


def _apply_spec(args: argparse.Namespace, p: argparse.ArgumentParser, sub_argv: list[str], name: str,
                required: list[argparse.Action]) -> int | None:
    """Merge ``--config`` into ``args``; an exit status when the command must not run."""
    from .config import apply_spec, dump_spec, load_spec, resolved_section

    try:
        if getattr(args, "config", None):
            apply_spec(args, p, sub_argv, load_spec(args.config, expect_kind=name))
        missing = [a for a in required if getattr(args, a.dest, None) in (None, [])]
        if missing:
            flags = ", ".join(a.option_strings[-1] for a in missing)
            keys = ", ".join(f"{name}.{a.dest}" for a in missing)
            raise UsageError(f"the following arguments are required: {flags} (on the command line, or as {keys} "
                             "in --config)")
        if getattr(args, "print_config", False):
            sys.stdout.write(dump_spec(name, resolved_section(args, name)))
            return 0
    except CommandError as exc:  # ConfigError, a bad value
        return report(name, exc)
    return None


def resolve_args(argv: Sequence[str]) -> tuple[argparse.Namespace | None, int | None]:
    """Parse ``argv`` and merge ``--config``: (namespace ready to run, None) or (namespace or None, exit status).

    This is everything ``main`` does before running the command, so tests (and ``rdeic submit``'s
    checks) see exactly what a command would run with. argparse usage errors exit (SystemExit 2).
    """
    argv = list(argv)
    name = _chosen_command(argv)
    parser = build_parser(only=name)
    required: list[argparse.Action] = []
    sub = None
    if name is not None and discover()[name].has_spec:
        sub = _subparser(parser, name)
        required = _relax_required(sub)
    passthrough: list[str] = []
    if name is not None and discover()[name].passthrough and "--" in argv[argv.index(name):]:
        cut = argv.index("--", argv.index(name))
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.passthrough = passthrough
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return None, EXIT_USAGE
    if sub is not None and name is not None:
        status = _apply_spec(args, sub, argv[argv.index(name) + 1:], name, required)
        if status is not None:
            return args, status
    return args, None


def main(argv: Sequence[str] | None = None) -> int:
    # compressai and diffusers call torch.jit at import; torch 2.14 deprecates it, noisily, for every command
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    args, status = resolve_args(sys.argv[1:] if argv is None else argv)
    if status is not None or args is None:
        return EXIT_USAGE if status is None else status
    from .logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
