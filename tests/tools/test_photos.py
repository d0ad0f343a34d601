"""Tests of tools/photos.py and of the photo set it produced (data/photos, made by `make photos`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tools import photos as pt

# One training photo (4:3, where "short side to 512" alone would not cover 768x512) + the validation set.
SAMPLE_TRAIN = "FreshFlower.jpg"


@pytest.fixture(scope="module")
def manifest() -> list[pt.PhotoEntry]:
    return pt.read_manifest()


def _tsv_text(entries: list[pt.PhotoEntry]) -> str:
    rows = ["\t".join(pt.TSV_COLUMNS)]
    rows += [
        "\t".join((e.package, e.path_in_package, f"{e.width}x{e.height}", e.sha256, e.license)) for e in entries
    ]
    return "\n".join(rows) + "\n"


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# The produced photo set


def test_full_photos_match_manifest(photos_root: Path, manifest: list[pt.PhotoEntry]) -> None:
    full = photos_root / "full"
    assert sorted(p.name for p in full.iterdir() if p.is_file()) == sorted(e.name for e in manifest)
    for e in manifest:
        assert pt.sha256_file(full / e.name) == e.sha256, e.name
        with Image.open(full / e.name) as im:
            assert im.size == (e.width, e.height), e.name


def test_small_photos_have_long_side_256_and_keep_aspect(
    small_photo_paths: list[Path], manifest: list[pt.PhotoEntry]
) -> None:
    by_stem = {e.stem: e for e in manifest}
    assert [p.stem for p in small_photo_paths] == sorted(by_stem)
    for p in small_photo_paths:
        e = by_stem[p.stem]
        with Image.open(p) as im:
            assert im.mode == "RGB", p.name
            w, h = im.size
        assert max(w, h) == 256, (p.name, im.size)
        # Orientation kept, short side within rounding of the original aspect.
        assert (w >= h) == (e.width >= e.height), p.name
        expected_short = round(min(e.width, e.height) * 256 / max(e.width, e.height))
        assert min(w, h) == expected_short, (p.name, im.size)


def test_val768_holds_exactly_the_validation_crops(
    val_photo_paths: list[Path], manifest: list[pt.PhotoEntry]
) -> None:
    assert [p.stem for p in val_photo_paths] == sorted(Path(n).stem for n in pt.VALIDATION)
    by_stem = {e.stem: e for e in manifest}
    for p in val_photo_paths:
        e = by_stem[p.stem]
        with Image.open(p) as im:
            expected = (768, 512) if e.width >= e.height else (512, 768)
            assert (im.size, im.mode) == (expected, "RGB"), p.name
    # The set has both orientations, so both branches of the crop are exercised on real data.
    assert {Image.open(p).size for p in val_photo_paths} == {(768, 512), (512, 768)}


def test_split_is_fixed_and_disjoint(photos_root: Path, manifest: list[pt.PhotoEntry]) -> None:
    assert pt.VALIDATION == (
        "Dune.jpg",
        "Storm.jpg",
        "Wine_by_Jakkub_Mede.jpg",
        "sunset_by_Aitzol_Berasategi.jpg",
    )
    split = json.loads((photos_root / "split.json").read_text())
    assert set(split) == {"validation", "train"}
    assert split["validation"] == sorted(pt.VALIDATION)
    assert not set(split["train"]) & set(split["validation"])
    assert sorted(split["train"] + split["validation"]) == sorted(e.name for e in manifest)
    assert len(split["train"]) >= 20


def test_train_fixture_excludes_validation(train_photo_paths: list[Path], small_photo_paths: list[Path]) -> None:
    val_stems = {Path(n).stem for n in pt.VALIDATION}
    assert not {p.stem for p in train_photo_paths} & val_stems
    assert len(train_photo_paths) == len(small_photo_paths) - len(pt.VALIDATION)


def test_licenses_tsv_lists_every_photo(photos_root: Path, manifest: list[pt.PhotoEntry]) -> None:
    lines = (photos_root / "LICENSES.tsv").read_text().splitlines()
    assert tuple(lines[0].split("\t")) == pt.LICENSES_COLUMNS
    rows = {tuple(ln.split("\t")) for ln in lines[1:]}
    assert rows == {(e.name, e.package, e.license) for e in manifest}


# ---------------------------------------------------------------------------------------------------
# The tool itself


def test_fetch_is_deterministic_idempotent_and_prunes_strays(
    photos_root: Path, manifest: list[pt.PhotoEntry], tmp_path: Path
) -> None:
    """Re-deriving from verified originals gives the bytes in data/photos; a second run changes nothing."""
    subset = [e for e in manifest if e.name in pt.VALIDATION or e.name == SAMPLE_TRAIN]
    tsv = tmp_path / "photos.tsv"
    tsv.write_text(_tsv_text(subset))
    dest = tmp_path / "photos"
    (dest / "full").mkdir(parents=True)
    for e in subset:  # originals already present and valid: no apt-get needed
        shutil.copy2(photos_root / "full" / e.name, dest / "full" / e.name)
    (dest / "small").mkdir()
    stray = dest / "small" / "NotInManifest.png"
    Image.new("RGB", (4, 4)).save(stray)

    pt.fetch(dest, tsv, tmp_path / "cache" / "debs")

    assert not stray.exists()
    for e in subset:
        small = f"small/{e.stem}.png"
        assert (dest / small).read_bytes() == (photos_root / small).read_bytes(), small
    for name in pt.VALIDATION:
        val = f"val768/{Path(name).stem}.png"
        assert (dest / val).read_bytes() == (photos_root / val).read_bytes(), val
    assert not (dest / "val768" / f"{Path(SAMPLE_TRAIN).stem}.png").exists()
    assert pt.load_split(dest) == {"validation": sorted(pt.VALIDATION), "train": [SAMPLE_TRAIN]}

    before = _snapshot(dest)
    pt.fetch(dest, tsv, tmp_path / "cache" / "debs")
    assert _snapshot(dest) == before


def _cached_deb(package_name: str) -> Path:
    debs = sorted(pt.DEFAULT_CACHE.glob(f"{package_name}_*.deb"))
    if not debs:
        pytest.fail(f"no {package_name} .deb in {pt.DEFAULT_CACHE}: run `make photos`", pytrace=False)
    return debs[0]


def test_fetch_replaces_a_corrupted_original_from_the_deb(manifest: list[pt.PhotoEntry], tmp_path: Path) -> None:
    entry = next(e for e in manifest if e.name == SAMPLE_TRAIN)
    cache = tmp_path / "cache" / "debs"
    cache.mkdir(parents=True)
    deb = _cached_deb(entry.package_name)
    os.symlink(deb, cache / deb.name)
    full = tmp_path / "full"
    full.mkdir()
    (full / entry.name).write_bytes(b"not the photo")

    assert pt.fetch_full([entry], full, cache) == 1
    assert pt.sha256_file(full / entry.name) == entry.sha256
    assert pt.fetch_full([entry], full, cache) == 0  # now valid: nothing refetched


def test_fetch_rejects_a_file_whose_hash_differs_from_the_manifest(
    manifest: list[pt.PhotoEntry], tmp_path: Path
) -> None:
    real = next(e for e in manifest if e.name == SAMPLE_TRAIN)
    wrong = "0" * 64
    entry = pt.PhotoEntry(real.package, real.path_in_package, real.width, real.height, wrong, real.license)
    cache = tmp_path / "cache" / "debs"
    cache.mkdir(parents=True)
    deb = _cached_deb(entry.package_name)
    os.symlink(deb, cache / deb.name)

    with pytest.raises(pt.PhotoError) as info:
        pt.fetch_full([entry], tmp_path / "full", cache)
    msg = str(info.value)
    assert entry.name in msg and wrong in msg and real.sha256 in msg
    assert not (tmp_path / "full" / entry.name).exists()


def test_verify_sha256_names_file_and_both_hashes(tmp_path: Path) -> None:
    f = tmp_path / "x.jpg"
    f.write_bytes(b"abc")
    actual = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    pt.verify_sha256(f, actual)
    with pytest.raises(pt.PhotoError) as info:
        pt.verify_sha256(f, "f" * 64)
    assert str(f) in str(info.value) and actual in str(info.value) and "f" * 64 in str(info.value)


GOOD_ROW = "pkg=1.0-1\tusr/share/a/b.jpg\t640x480\t" + "a" * 64 + "\tCC0-1.0"


@pytest.mark.parametrize(
    ("row", "bad"),
    [
        ("pkg\tusr/share/a/b.jpg\t640x480\t" + "a" * 64 + "\tCC0-1.0", "'pkg'"),
        ("pkg=1\t/abs/b.jpg\t640x480\t" + "a" * 64 + "\tCC0-1.0", "'/abs/b.jpg'"),
        ("pkg=1\tusr/../b.jpg\t640x480\t" + "a" * 64 + "\tCC0-1.0", "'usr/../b.jpg'"),
        ("pkg=1\tusr/b.jpg\t640*480\t" + "a" * 64 + "\tCC0-1.0", "'640*480'"),
        ("pkg=1\tusr/b.jpg\t640x480\t" + "A" * 64 + "\tCC0-1.0", "A" * 64),
        ("pkg=1\tusr/b.jpg\t640x480\tabc\tCC0-1.0", "'abc'"),
        ("pkg=1\tusr/b.jpg\t640x480\t" + "a" * 64, "4 columns"),
        ("pkg=1\tusr/other/b.jpg\t640x480\t" + "a" * 64 + "\tCC0-1.0", "'b.jpg'"),  # duplicate name
    ],
)
def test_parse_manifest_rejects_bad_rows(row: str, bad: str) -> None:
    text = "\t".join(pt.TSV_COLUMNS) + "\n" + GOOD_ROW + "\n" + row + "\n"
    with pytest.raises(pt.PhotoError) as info:
        pt.parse_manifest(text, "t.tsv")
    assert bad in str(info.value)


def test_parse_manifest_accepts_good_rows_and_checks_header() -> None:
    (e,) = pt.parse_manifest("\t".join(pt.TSV_COLUMNS) + "\n" + GOOD_ROW + "\n")
    assert (e.package_name, e.package_version, e.name, e.stem, e.width, e.height) == (
        "pkg", "1.0-1", "b.jpg", "b", 640, 480
    )
    with pytest.raises(pt.PhotoError, match="header"):
        pt.parse_manifest("a\tb\n" + GOOD_ROW + "\n")


def test_read_manifest_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(pt.PhotoError, match="not found"):
        pt.read_manifest(tmp_path / "nope.tsv")


@pytest.mark.parametrize(
    ("size", "target"),
    [
        ((1600, 1200), (768, 512)),  # 4:3: short side to 512 would give 683 < 768
        ((1280, 1024), (768, 512)),  # 5:4
        ((1920, 1280), (768, 512)),  # exactly 3:2
        ((4272, 2848), (768, 512)),
        ((2560, 3837), (512, 768)),  # portrait, just under 3:2
        ((600, 600), (768, 512)),  # square upsampled
    ],
)
def test_resize_cover_crop_always_gives_the_target(size: tuple[int, int], target: tuple[int, int]) -> None:
    assert pt.val_target_size(*size) == target
    img = Image.new("RGB", size, (10, 20, 30))
    out = pt.resize_cover_crop(img, target)
    assert out.size == target


def test_resize_cover_crop_is_centred() -> None:
    """A centred white square on black must stay centred after the crop."""
    img = Image.new("L", (1600, 1200), 0)
    img.paste(255, (700, 500, 900, 700))
    out = pt.resize_cover_crop(img, (768, 512))
    bbox = out.point(lambda v: 255 if v > 128 else 0).getbbox()
    assert bbox is not None
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    assert abs(cx - 384) <= 1 and abs(cy - 256) <= 1, bbox


def test_resize_long_side_keeps_aspect() -> None:
    assert pt.resize_long_side(Image.new("RGB", (2056, 3088)), 256).size == (170, 256)
    assert pt.resize_long_side(Image.new("RGB", (5312, 2988)), 256).size == (256, 144)
