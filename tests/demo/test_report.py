"""`make demo` end to end at tiny size, and its report as a browser shows it.

The real flow of ``demo.run`` (photos -> WebDataset shards -> embedded S3 -> archive, restore and
audit jobs on Ray -> JPEG/WebP at the nearest rate -> report.html) with the tiny random-weights
codec and two real photos (one validation, one training) shrunk to ~0.05 MP, so it takes seconds
per job; then ``report.html`` is opened in headless Chromium: every <img> loaded, the page is not
blank, and every archived photo is shown with its restoration.

Chromium missing is a FAILURE with the install command, never a skip (as in tests/pipeline/restore).
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.run import read_parquet_dir
from tests.pipeline.restore.chromium_cdp import INSTALL_HINT, find_chromium, inspect_page

PHOTOS = ("Dune.jpg", "GreenMeadow.jpg")  # validation, training (split.json)


@dataclass(frozen=True)
class DemoRun:
    code: int
    out: Path
    stdout: str

    @property
    def report(self) -> Path:
        return self.out / "report" / "report.html"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, photos_root: Path,
             ray_address: str) -> DemoRun:
    """One tiny demo on the session's Ray (the demo uses a Ray that is already up as it is)."""
    from demo.run import main

    out = tmp_path_factory.mktemp("demo") / "out"
    argv = ["--model", str(tiny_model_dir), "--photos-dir", str(photos_root), "--megapixels", "0.05",
            "--min-megapixels", "0", "--out", str(out), "--no-progress"]
    for name in PHOTOS:
        argv += ["--photo", name]
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.delenv("PYTHONWARNINGS", raising=False)  # the demo sets it for its Ray workers; undone here
        code = main(argv)
    return DemoRun(code, out, buf.getvalue())


@pytest.mark.ray
@pytest.mark.s3
def test_demo_runs_every_step_and_ends_with_where_the_report_is(demo_run: DemoRun) -> None:
    assert demo_run.code == 0, demo_run.stdout
    for step in range(1, 8):
        assert f"{step}/7 " in demo_run.stdout
    last = demo_run.stdout.strip().splitlines()[-2:]
    assert last[0] == f"report: {demo_run.report.resolve()}"
    assert last[1].startswith(f"open it: xdg-open {demo_run.report.resolve()}")
    assert demo_run.report.is_file()
    for copied in ("archive/run.json", "restored/restore.json", "audit/summary.json", "summary.json",
                   "report/rate_quality.png"):
        assert (demo_run.out / copied).is_file(), copied


@pytest.mark.ray
@pytest.mark.s3
def test_every_archived_photo_appears_with_its_restoration(demo_run: DemoRun) -> None:
    from demo.report import slug

    rows = read_parquet_dir(demo_run.out / "archive" / "archive")
    assert sorted(r["key"].split("/")[1] for r in rows) == sorted(Path(n).stem for n in PHOTOS)
    assert all(r["status"] == "ok" for r in rows)
    html = demo_run.report.read_text()
    for row in rows:
        name = next(n for n in PHOTOS if Path(n).stem == row["key"].split("/")[1])
        restored = demo_run.out / "restored" / "images" / f"{row['key']}.png"
        shown = demo_run.out / "report" / "img" / f"{slug(name)}-rdeic.png"
        assert shown.read_bytes() == restored.read_bytes()  # the restore job's own PNG, not a re-encode
        assert f'href="img/{shown.name}"' in html
        assert f'alt="RDEIC {name}"' in html and f'alt="RDEIC crop {name}"' in html
        with Image.open(shown) as img, Image.open(demo_run.out / "photos" / f"{Path(name).stem}.png") as orig:
            assert img.size == orig.size
    assert "validation: never trained on" in html and "training photo" in html
    assert "<script" not in html.lower()
    # every local file the page links to or shows exists beside it
    for ref in re.findall(r'(?:src|href)="([^"#][^"]*)"', html):
        target = (demo_run.report.parent / ref).resolve()
        assert target.exists(), ref


@pytest.mark.ray
@pytest.mark.s3
def test_report_renders_in_headless_chromium(demo_run: DemoRun, tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.fail(f"Chromium is not installed: run `{INSTALL_HINT}`", pytrace=False)
    page = inspect_page(demo_run.report, width=1280, height=1000)
    assert page.problems == [], page.problems
    assert page.title.startswith("RDEIC archive demo: 2 photos")
    # the plot, then per photo 4 previews (original, RDEIC, JPEG, WebP) and their 4 crops
    assert len(page.images) == 1 + len(PHOTOS) * 8
    broken = [i for i in page.images if not i["complete"] or i["w"] == 0 or i["h"] == 0]
    assert broken == []
    alts = {i["alt"] for i in page.images}
    for name in PHOTOS:
        assert {f"{m} {name}" for m in ("original", "RDEIC", "JPEG", "WebP")} <= alts
    shot = Image.open(io.BytesIO(page.screenshot_png))
    assert shot.width >= 1000 and shot.height > 2000  # the whole page, not one viewport
    pixels = np.asarray(shot.convert("RGB"), dtype=np.int16)
    assert pixels.std() > 10  # not blank
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 40).mean() > 0.005  # photos and the plot were painted
    (tmp_path / "report.png").write_bytes(page.screenshot_png)


# ------------------------------------------------------------------------------------ pure parts
def _photo(photos_root: Path, name: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(photos_root / "full" / name) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.Resampling.BOX))


@pytest.mark.parametrize("fmt, qualities", [("JPEG", range(1, 96)), ("WEBP", range(101))])
def test_nearest_quality_matches_an_exhaustive_search(photos_root: Path, fmt: str, qualities: range) -> None:
    from demo.report import encoded_size, nearest_quality

    image = _photo(photos_root, "Storm.jpg", (160, 112))
    sizes = {q: encoded_size(image, fmt, q) for q in qualities}
    lo, hi = min(sizes.values()), max(sizes.values())
    for target in (lo // 2, lo, (lo + hi) // 3, (lo + hi) // 2, hi, 2 * hi):
        best = min(abs(s - target) for s in sizes.values())
        q = nearest_quality(image, fmt, target, qualities)
        assert abs(sizes[q] - target) == best, (target, q)
    assert nearest_quality(image, fmt, 1, qualities) == min(qualities)  # below reach: the lowest quality


def test_demo_size_keeps_aspect_and_the_megapixel_floor() -> None:
    from demo.run import demo_size

    for w, h in ((5312, 2988), (2560, 3837), (1280, 1024), (1365, 1074)):
        tw, th = demo_size(w, h, 1.0, 1.0)
        assert tw * th >= 1_000_000 and tw <= w and th <= h
        assert abs(tw / th - w / h) < 0.01
        tw, th = demo_size(w, h, 1.1, 1.0)
        assert abs(tw * th / 1.1e6 - 1) < 0.01
    with pytest.raises(ValueError):
        demo_size(800, 600, 1.1, 1.0)  # never upscaled to reach the floor


def test_demo_refuses_photos_below_one_megapixel(tmp_path: Path) -> None:
    from demo.run import main

    assert main(["--megapixels", "0.5", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_report_escapes_every_data_string(tmp_path: Path) -> None:
    from demo.report import Coded, DemoReport, JobStats, PhotoResult, render_html

    evil = '<img src=x onerror="alert(1)">&'
    coded = Coded("RDEIC", "S=2", 100, 0.05, 20.0, 0.8, "a.png", "a-preview.png", "a-crop.png", note=evil)
    photo = PhotoResult(f"{evil}.jpg", f"shard/{evil}", "validation", 10, 10, [coded], (0, 0, 4, 4),
                        failure=evil, notes=[evil])
    report = DemoReport(evil, {"model": evil}, [JobStats("archive", 1.0, 1, 0, 1, 1.0, (evil,))], {evil: evil},
                        [photo], notes=[evil], links={evil: f"../{evil}"})
    page = render_html(report)
    assert "<img src=x" not in page and 'onerror="alert' not in page
    assert page.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;") >= 8
