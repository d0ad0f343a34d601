"""The ``rdeic`` subcommands: one module per command, found by listing this package.

A module here is a command named after its file. It defines ``HELP`` (a string literal: the line
``rdeic --help`` shows) and ``add_parser(subparsers)``; a shard job also defines ``OPTIONS`` (its
options dataclass, from which its flags and its spec section are derived, ``jobs.options``); a
command that hands the arguments after ``--`` on (``submit``) sets ``PASSTHROUGH = True``.
Nothing else is edited to add one (docs/jobs.md, "Add a job").

Listing reads the files' source (``ast``) instead of importing them, so ``rdeic --help`` stays
quick and imports neither torch nor Ray; only the chosen command is imported.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CommandInfo:
    name: str
    module: str
    help: str
    has_spec: bool  # defines OPTIONS: takes --config SPEC.yaml / --print-config and a spec section
    passthrough: bool  # PASSTHROUGH = True: the arguments after `--` are handed on untouched (args.passthrough)


def _module_names(tree: ast.Module) -> dict[str, ast.expr]:
    out: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out[node.target.id] = node.value
    return out


def discover() -> dict[str, CommandInfo]:
    """Every command module on this package's path (sorted by name), without importing any.

    Listed once per package path (one `rdeic` start asks several times); a folder added to the path
    (tests add a toy command this way) is listed anew."""
    return _discover(tuple(__path__))


@functools.cache
def _discover(folders: tuple[str, ...]) -> dict[str, CommandInfo]:
    found: dict[str, CommandInfo] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.py")):
            if path.stem.startswith("_"):
                continue
            names = _module_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
            text = names.get("HELP")
            if not (isinstance(text, ast.Constant) and isinstance(text.value, str)):
                continue  # a helper module, not a command
            passthrough = names.get("PASSTHROUGH")
            found.setdefault(path.stem, CommandInfo(
                path.stem, f"{__name__}.{path.stem}", text.value, "OPTIONS" in names,
                isinstance(passthrough, ast.Constant) and passthrough.value is True))
    return dict(sorted(found.items()))
