"""Input shard lists: brace patterns, globs and list files -> ``ShardRef`` with stable ids.

Accepted forms (several may be given; the shards of all of them are processed, in order, once):

* a brace pattern, WebDataset style: ``s3://b/shards/{000000..000999}.tar``, ``{a,b}``, nested;
* a glob: ``s3://b/shards/*.tar`` (``*``, ``?``, ``[...]``, expanded by the filesystem);
* a list file: ``@urls.txt`` or any name ending in ``.txt``: one URL (or pattern) per line, blank
  lines and ``#`` comments ignored;
* a plain URL or local path.

The shard id is the file name without its tar suffix (``.../000123.tar`` -> ``000123``). It names
every output of the shard, so it must not depend on the order of the inputs or on the number of
workers: that is what makes a rerun with other inputs or another cluster size resume correctly.
Two different URLs with the same id are refused (their outputs would overwrite each other).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from . import storage
from .types import ShardRef

TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
_GLOB_CHARS = re.compile(r"[*?\[]")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
MAX_BRACE_EXPANSION = 10_000_000


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and ``{000..010}`` / ``{0..10..2}`` ranges (nesting allowed).

    A brace group that is neither (``{x}``) stays literal, as in bash. Zero padding follows the
    wider endpoint when either endpoint has a leading zero.
    """
    start = pattern.find("{")
    while start != -1:
        end = _matching_brace(pattern, start)
        if end is None:
            raise ValueError(f"unbalanced '{{' at position {start} in shard pattern {pattern!r}")
        options = _brace_options(pattern[start + 1:end], pattern)
        if options is not None:
            head, tail = pattern[:start], pattern[end + 1:]
            tails = expand_braces(tail)
            out = [head + o + t for opt in options for o in expand_braces(opt) for t in tails]
            if len(out) > MAX_BRACE_EXPANSION:
                raise ValueError(f"shard pattern {pattern!r} expands to more than {MAX_BRACE_EXPANSION} names")
            return out
        start = pattern.find("{", end + 1)
    if "}" in pattern and pattern.count("}") > pattern.count("{"):
        raise ValueError(f"unbalanced '}}' in shard pattern {pattern!r}")
    return [pattern]


def _matching_brace(s: str, start: int) -> int | None:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _brace_options(inner: str, pattern: str) -> list[str] | None:
    """The alternatives of one brace group, or None when the group is literal."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur.append(ch)
    parts.append("".join(cur))
    if len(parts) > 1:
        return parts
    m = _RANGE.match(inner)
    if not m:
        return None
    lo, hi, step = m.group(1), m.group(2), int(m.group(3) or 1)
    if step == 0:
        raise ValueError(f"range step 0 in shard pattern {pattern!r}")
    pad = max(len(lo.lstrip("-")), len(hi.lstrip("-"))) if _zero_padded(lo) or _zero_padded(hi) else 0
    a, b = int(lo), int(hi)
    if abs(b - a) // step + 1 > MAX_BRACE_EXPANSION:
        raise ValueError(f"range {{{inner}}} in shard pattern {pattern!r} is too large")
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [f"{'-' if v < 0 else ''}{abs(v):0{pad}d}" for v in values]


def _zero_padded(num: str) -> bool:
    digits = num.lstrip("-")
    return len(digits) > 1 and digits.startswith("0")


def shard_id_from_url(url: str) -> str:
    """Stable id of a shard: its file name without query string and tar suffix, made filename-safe."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    shard_id = _UNSAFE_ID_CHARS.sub("_", name)
    if not shard_id or shard_id in (".", ".."):
        raise ValueError(f"cannot derive a shard id from {url!r} (empty file name)")
    return shard_id


def is_list_file(arg: str) -> bool:
    return arg.startswith("@") or arg.split("?", 1)[0].lower().endswith(".txt")


def read_list_file(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Lines of a URL list (blank lines and ``#`` comments dropped); the file may be remote."""
    fs, path = storage.filesystem(url, storage_options)
    try:
        text = storage.read_bytes(fs, path).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"shard list file {url!r} does not exist") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _expand_one(pattern: str, storage_options: dict[str, Any] | None) -> list[str]:
    urls: list[str] = []
    for name in expand_braces(pattern):
        if not _GLOB_CHARS.search(name):
            urls.append(storage.normalize_url(name))
            continue
        fs, path = storage.filesystem(name, storage_options)
        fs.invalidate_cache()
        matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not matches:
            raise ValueError(f"glob {name!r} matches no files")
        urls.extend(storage.to_url(fs, p) for p in matches)
    return urls


def expand_inputs(patterns: Sequence[str] | str, storage_options: dict[str, Any] | None = None) -> list[ShardRef]:
    """All shards named by ``patterns`` (see the module doc), in order, each URL once."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for arg in patterns:
        if is_list_file(arg):
            for line in read_list_file(arg[1:] if arg.startswith("@") else arg, storage_options):
                urls.extend(_expand_one(line, storage_options))
        else:
            urls.extend(_expand_one(arg, storage_options))
    return make_refs(urls)


def make_refs(urls: Iterable[str]) -> list[ShardRef]:
    """ShardRefs for URLs, duplicates dropped; refuses two URLs that would share a shard id."""
    refs: list[ShardRef] = []
    by_id: dict[str, str] = {}
    for url in urls:
        shard_id = shard_id_from_url(url)
        seen = by_id.get(shard_id)
        if seen == url:
            continue
        if seen is not None:
            raise ValueError(
                f"shards {seen!r} and {url!r} have the same shard id {shard_id!r} (the file name); "
                "their archives would overwrite each other. Archive them into different outputs or rename one."
            )
        by_id[shard_id] = url
        refs.append(ShardRef(shard_id, url))
    if not refs:
        raise ValueError("the input patterns name no shards")
    return refs
