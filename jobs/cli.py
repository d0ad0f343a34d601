"""The ``rdeic`` command: one entry point, one subcommand per job.

Each job module exposes ``add_parser(subparsers)``, which registers its subcommand and sets
``func`` (argparse namespace -> exit status). Adding ``restore``, ``audit``, ``get``, ``inspect``,
``encode``, ``decode``, ``status`` or ``submit`` means writing ``jobs/<name>.py`` with that
function and listing it in ``SUBCOMMANDS``; nothing else here changes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Subcommand name -> module under ``jobs`` providing ``add_parser``. Imported lazily in ``main``
# only for the chosen command, so ``rdeic --help`` does not import torch or Ray.
SUBCOMMANDS: dict[str, str] = {
    "archive": "jobs.archive",
}
SUBCOMMAND_HELP: dict[str, str] = {
    "archive": "encode WebDataset shards into Parquet archives (resumable)",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (the others are listed for --help)."""
    parser = argparse.ArgumentParser(prog="rdeic", description="RDEIC extreme image compression: jobs and tools.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only == name:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=SUBCOMMAND_HELP.get(name))
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if a in SUBCOMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_chosen_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
