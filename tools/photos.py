#!/usr/bin/env python3
"""Real test photos: fetch them from pinned Debian packages, verify them, derive the sizes tests use.

Why Debian packages: they are the only image source every machine of this project (developers and
CI) can reach, a ``name=version`` pin fixes the exact bytes, and each carries a clear licence. The
allowed list, with a sha256 per file, is ``shared/data/photos.tsv`` beside the repo (override with
the environment variable ``RDEIC_PHOTOS_TSV``); its columns are
``debian_package`` (name=version), ``path_in_package``, ``width_x_height``, ``sha256``, ``license``.

Layout written under ``--dest`` (default ``data/photos``)::

    full/<name>          the original file, sha256-verified against the TSV
    small/<stem>.png     every photo, Lanczos-resized so its long side is 256 px (aspect kept)
    val768/<stem>.png    VALIDATION photos only: 768x512 (landscape) or 512x768 (portrait) centre crop
    split.json           {"validation": [...], "train": [...]} file names; the two are disjoint
    LICENSES.tsv         name, package, license of every photo

Everything derived is a pure function of the verified originals (same bytes on every run), and a
re-run only redoes work whose output is missing or older than its inputs (this script included).

CLI: ``python tools/photos.py fetch [--dest DIR] [--tsv FILE] [--cache DIR]``. Needs only the
standard library, Pillow, and ``apt-get``/``dpkg-deb`` (Debian).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO_ROOT / "data" / "photos"
DEFAULT_CACHE = REPO_ROOT / "data" / "cache" / "debs"
TSV_ENV = "RDEIC_PHOTOS_TSV"

# Held out from every training run; chosen to mix landscape/portrait and scene types.
VALIDATION: tuple[str, ...] = (
    "Dune.jpg",
    "Storm.jpg",
    "Wine_by_Jakkub_Mede.jpg",
    "sunset_by_Aitzol_Berasategi.jpg",
)

SMALL_LONG_SIDE = 256
# Kodak-like evaluation size (the usual 768x512 benchmark geometry), as (long side, short side).
VAL_LONG, VAL_SHORT = 768, 512

TSV_COLUMNS = ("debian_package", "path_in_package", "width_x_height", "sha256", "license")
LICENSES_COLUMNS = ("name", "package", "license")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SIZE_RE = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


class PhotoError(RuntimeError):
    """A photo could not be fetched, or is not the file the manifest promises."""


@dataclass(frozen=True)
class PhotoEntry:
    """One row of photos.tsv."""

    package: str  # "name=version", as apt-get takes it
    path_in_package: str
    width: int
    height: int
    sha256: str
    license: str

    @property
    def name(self) -> str:
        """File name under full/ (the basename in the package)."""
        return Path(self.path_in_package).name

    @property
    def stem(self) -> str:
        return Path(self.path_in_package).stem

    @property
    def package_name(self) -> str:
        return self.package.split("=", 1)[0]

    @property
    def package_version(self) -> str:
        return self.package.split("=", 1)[1]


# ---------------------------------------------------------------------------------------------------
# Manifest


def default_tsv_path() -> Path:
    """$RDEIC_PHOTOS_TSV, else shared/data/photos.tsv beside the repo (where CI puts shared/)."""
    env = os.environ.get(TSV_ENV)
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data" / "photos.tsv"


def parse_manifest(text: str, source: str = "<photos.tsv>") -> list[PhotoEntry]:
    """Parse and validate the TSV text; every problem names the line and the bad value."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise PhotoError(f"{source}: empty manifest")
    header = tuple(lines[0].split("\t"))
    if header != TSV_COLUMNS:
        raise PhotoError(f"{source}: header is {header!r}, expected {TSV_COLUMNS!r}")
    entries: list[PhotoEntry] = []
    for lineno, line in enumerate(lines[1:], start=2):
        entries.append(_parse_row(line, f"{source}:{lineno}"))
    _check_unique_names(entries, source)
    return entries


def _parse_row(line: str, where: str) -> PhotoEntry:
    cols = line.split("\t")
    if len(cols) != len(TSV_COLUMNS):
        raise PhotoError(f"{where}: {len(cols)} columns, expected {len(TSV_COLUMNS)}: {line!r}")
    package, path, size, sha, lic = (c.strip() for c in cols)
    if "=" not in package or not all(package.split("=", 1)):
        raise PhotoError(f"{where}: debian_package must be NAME=VERSION, got {package!r}")
    if not path or path.startswith("/") or ".." in Path(path).parts:
        raise PhotoError(f"{where}: path_in_package must be relative and inside the package, got {path!r}")
    m = _SIZE_RE.match(size)
    if not m:
        raise PhotoError(f"{where}: width_x_height must look like 1920x1080, got {size!r}")
    if not _SHA256_RE.match(sha):
        raise PhotoError(f"{where}: sha256 must be 64 lowercase hex digits, got {sha!r}")
    if not lic:
        raise PhotoError(f"{where}: empty license")
    return PhotoEntry(package, path, int(m.group(1)), int(m.group(2)), sha, lic)


def _check_unique_names(entries: Sequence[PhotoEntry], source: str) -> None:
    """full/<name> and small/<stem>.png are flat: two rows may not share a name or stem."""
    seen: dict[str, str] = {}
    for e in entries:
        for key in (e.name, e.stem + ".png"):
            if key in seen and seen[key] != e.path_in_package:
                raise PhotoError(f"{source}: {e.path_in_package!r} and {seen[key]!r} both map to {key!r}")
            seen[key] = e.path_in_package


def read_manifest(path: Path | None = None) -> list[PhotoEntry]:
    """Read photos.tsv (default: default_tsv_path()) and check that every VALIDATION photo is listed."""
    path = Path(path) if path is not None else default_tsv_path()
    if not path.is_file():
        raise PhotoError(
            f"photo manifest {path} not found: CI puts shared/ beside the repo clone; "
            f"set {TSV_ENV}=/path/to/photos.tsv to use another one"
        )
    entries = parse_manifest(path.read_text(encoding="utf-8"), str(path))
    names = {e.name for e in entries}
    missing = [n for n in VALIDATION if n not in names]
    if missing:
        raise PhotoError(f"{path}: validation photos {missing} are not in the manifest")
    return entries


def split_names(entries: Iterable[PhotoEntry]) -> dict[str, list[str]]:
    """The fixed split: VALIDATION vs everything else, as sorted file names."""
    names = sorted(e.name for e in entries)
    return {
        "validation": sorted(n for n in names if n in VALIDATION),
        "train": [n for n in names if n not in VALIDATION],
    }


# ---------------------------------------------------------------------------------------------------
# Hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise PhotoError naming the file and both hashes when the content is not the pinned one."""
    actual = sha256_file(path)
    if actual != expected:
        raise PhotoError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


def _has_valid_copy(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_file(path) == expected


# ---------------------------------------------------------------------------------------------------
# Fetching from Debian packages


class _Apt:
    """apt-get download with a single `apt-get update` retry (a fresh machine may have no package lists)."""

    def __init__(self) -> None:
        self._updated = False

    def download(self, package: str, cache_dir: Path) -> Path:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached = self._cached_deb(package, cache_dir)
        if cached is not None:
            return cached
        result = self._run(["apt-get", "download", package], cache_dir)
        if result.returncode != 0 and not self._updated:
            log(f"apt-get download {package} failed; running apt-get update once and retrying")
            update = self._run(["apt-get", "update"], cache_dir)
            self._updated = True
            if update.returncode != 0:
                raise PhotoError(f"apt-get update failed (exit {update.returncode}):\n{update.stderr.strip()}")
            result = self._run(["apt-get", "download", package], cache_dir)
        if result.returncode != 0:
            raise PhotoError(f"apt-get download {package} failed (exit {result.returncode}):\n{result.stderr.strip()}")
        cached = self._cached_deb(package, cache_dir)
        if cached is None:
            raise PhotoError(f"apt-get download {package} succeeded but no matching .deb appeared in {cache_dir}")
        return cached

    @staticmethod
    def _cached_deb(package: str, cache_dir: Path) -> Path | None:
        name, version = package.split("=", 1)
        # apt names files NAME_VERSION_ARCH.deb with an epoch's ':' written as '%3a'.
        matches = sorted(cache_dir.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
        return matches[0] if matches else None

    @staticmethod
    def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        except FileNotFoundError as exc:
            raise PhotoError(f"{cmd[0]} not found: fetching photos needs a Debian machine (apt-get, dpkg-deb)") from exc


def _extract(deb: Path, entries: Sequence[PhotoEntry], full_dir: Path, scratch_root: Path) -> None:
    """Unpack the .deb, verify each wanted file, then move it into full/ atomically."""
    scratch_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="extract-", dir=scratch_root) as tmp:
        result = subprocess.run(["dpkg-deb", "-x", str(deb), tmp], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PhotoError(f"dpkg-deb -x {deb} failed (exit {result.returncode}): {result.stderr.strip()}")
        for e in entries:
            src = Path(tmp) / e.path_in_package
            if not src.is_file():
                raise PhotoError(f"{e.path_in_package} is not in {deb} (package {e.package})")
            actual = sha256_file(src)
            if actual != e.sha256:
                raise PhotoError(
                    f"sha256 mismatch for {e.name} ({e.path_in_package} in {deb}): expected {e.sha256}, "
                    f"got {actual}; delete {deb} to download it again"
                )
            _atomic_copy(src, full_dir / e.name)


def fetch_full(entries: Sequence[PhotoEntry], full_dir: Path, cache_dir: Path) -> int:
    """Make full/ hold every listed original with the right hash; returns how many files were (re)fetched."""
    full_dir.mkdir(parents=True, exist_ok=True)
    by_package: dict[str, list[PhotoEntry]] = {}
    for e in entries:
        by_package.setdefault(e.package, []).append(e)
    apt = _Apt()
    fetched = 0
    for package, group in sorted(by_package.items()):
        wanted = [e for e in group if not _has_valid_copy(full_dir / e.name, e.sha256)]
        if not wanted:
            continue
        log(f"fetching {len(wanted)} photo(s) from {package}")
        deb = apt.download(package, cache_dir)
        _extract(deb, wanted, full_dir, cache_dir.parent)
        fetched += len(wanted)
    for e in entries:  # always re-check: nothing unverified may reach the tests
        verify_sha256(full_dir / e.name, e.sha256)
        _check_size(full_dir / e.name, e)
    return fetched


def _check_size(path: Path, entry: PhotoEntry) -> None:
    with Image.open(path) as im:
        if im.size != (entry.width, entry.height):
            raise PhotoError(f"{path}: size {im.size[0]}x{im.size[1]}, manifest says {entry.width}x{entry.height}")


# ---------------------------------------------------------------------------------------------------
# Derived images (pure functions of the originals)


def load_rgb(path: Path) -> Image.Image:
    """Decode to upright 8-bit RGB (EXIF orientation applied), with no metadata carried along."""
    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    rgb.info = {}
    return rgb


def resize_long_side(img: Image.Image, long_side: int) -> Image.Image:
    """Lanczos resize so max(w, h) == long_side, aspect kept (short side rounded, at least 1 px)."""
    w, h = img.size
    scale = long_side / max(w, h)
    size = (long_side, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), long_side)
    return img.resize(size, Image.Resampling.LANCZOS)


def val_target_size(width: int, height: int) -> tuple[int, int]:
    """768x512 for landscape (and square) photos, 512x768 for portrait ones."""
    return (VAL_LONG, VAL_SHORT) if width >= height else (VAL_SHORT, VAL_LONG)


def resize_cover_crop(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Lanczos resize to the smallest size covering ``target`` (aspect kept), then centre crop to it.

    For aspect ratios >= 3:2 this is "short side to 512 then crop"; for squarer photos (4:3, 5:4)
    scaling the short side to 512 would leave the long side under 768, so the long side decides.
    """
    tw, th = target
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    resized = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return resized.crop((left, top, left + tw, top + th))


def make_small(src: Path) -> Image.Image:
    return resize_long_side(load_rgb(src), SMALL_LONG_SIDE)


def make_val768(src: Path) -> Image.Image:
    img = load_rgb(src)
    return resize_cover_crop(img, val_target_size(*img.size))


def _is_fresh(out: Path, inputs: Sequence[Path]) -> bool:
    if not out.is_file():
        return False
    newest_input = max(p.stat().st_mtime_ns for p in inputs)
    return out.stat().st_mtime_ns >= newest_input


def derive(entries: Sequence[PhotoEntry], dest: Path) -> tuple[int, int]:
    """Write small/ for every photo and val768/ for VALIDATION; returns (small made, val768 made)."""
    full_dir, small_dir, val_dir = dest / "full", dest / "small", dest / "val768"
    small_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    made_small = made_val = 0
    for e in entries:
        src = full_dir / e.name
        inputs = (src, script)
        out = small_dir / f"{e.stem}.png"
        if not _is_fresh(out, inputs):
            save_png(make_small(src), out)
            made_small += 1
        if e.name in VALIDATION:
            out = val_dir / f"{e.stem}.png"
            if not _is_fresh(out, inputs):
                save_png(make_val768(src), out)
                made_val += 1
    _remove_strays(small_dir, {f"{e.stem}.png" for e in entries})
    _remove_strays(val_dir, {f"{e.stem}.png" for e in entries if e.name in VALIDATION})
    return made_small, made_val


def _remove_strays(directory: Path, keep: set[str]) -> None:
    """Drop PNGs of photos no longer in the manifest, so a glob of the folder matches the manifest."""
    for p in directory.glob("*.png"):
        if p.name not in keep:
            log(f"removing {p} (not in the manifest)")
            p.unlink()


# ---------------------------------------------------------------------------------------------------
# Writing files


def _atomic_write_bytes(data: bytes, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_png(img: Image.Image, dst: Path) -> None:
    """Write a PNG atomically; fixed settings and no metadata, so equal pixels give equal bytes."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    img.save(tmp, format="PNG", compress_level=9)
    os.replace(tmp, dst)


def _write_if_changed(text: str, dst: Path) -> None:
    """Keep the mtime of unchanged files, so re-runs leave the tree untouched."""
    data = text.encode("utf-8")
    if dst.is_file() and dst.read_bytes() == data:
        return
    _atomic_write_bytes(data, dst)


def write_split(entries: Sequence[PhotoEntry], dest: Path) -> None:
    _write_if_changed(json.dumps(split_names(entries), indent=2) + "\n", dest / "split.json")


def write_licenses(entries: Sequence[PhotoEntry], dest: Path) -> None:
    rows = ["\t".join(LICENSES_COLUMNS)]
    rows += ["\t".join((e.name, e.package, e.license)) for e in sorted(entries, key=lambda e: e.name)]
    _write_if_changed("\n".join(rows) + "\n", dest / "LICENSES.tsv")


def load_split(dest: Path = DEFAULT_DEST) -> dict[str, list[str]]:
    """Read split.json written by `fetch` ({"validation": [...], "train": [...]} file names)."""
    return json.loads((Path(dest) / "split.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------
# CLI


def log(msg: str) -> None:
    print(f"photos: {msg}", file=sys.stderr, flush=True)


def fetch(dest: Path = DEFAULT_DEST, tsv: Path | None = None, cache: Path = DEFAULT_CACHE) -> None:
    """Fetch + verify the originals, then derive small/, val768/, split.json and LICENSES.tsv."""
    t0 = time.monotonic()
    entries = read_manifest(tsv)
    dest.mkdir(parents=True, exist_ok=True)
    fetched = fetch_full(entries, dest / "full", cache)
    made_small, made_val = derive(entries, dest)
    write_split(entries, dest)
    write_licenses(entries, dest)
    log(
        f"{len(entries)} photos verified in {dest} ({fetched} fetched, {made_small} small and "
        f"{made_val} val768 made) in {time.monotonic() - t0:.1f}s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="fetch, verify and derive the test photos (idempotent)")
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"output folder (default {DEFAULT_DEST})")
    p.add_argument("--tsv", type=Path, default=None, help=f"manifest (default ${TSV_ENV} or {default_tsv_path()})")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"downloaded .deb cache (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    try:
        fetch(args.dest, args.tsv, args.cache)
    except PhotoError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
