"""``rdeic evaluate`` (jobs/commands/evaluate.py + jobs/rd_eval.py) on a random tiny codec and two real photos.

Every reported number is recomputed here independently (Pillow, numpy, pytorch_msssim called
directly), so a wrong bpp denominator, a PSNR on padded pixels or a mismatched interpolation fails.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_msssim import ms_ssim as ref_ms_ssim

from jobs import rd_eval
from jobs.commands import evaluate
from jobs.exits import EXIT_USAGE
from rdeic_core.codec import RDEICCodec


@pytest.fixture(scope="module")
def image_dir(photos_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two photos: a 256x160 one (a smaller MS-SSIM window) and a 240x200 crop (standard 5 scales)."""
    d = tmp_path_factory.mktemp("eval_images")
    Image.open(photos_root / "small" / "Aqua.png").convert("RGB").save(d / "a_small.png")
    with Image.open(sorted((photos_root / "val768").glob("*.png"))[0]) as im:
        im.convert("RGB").crop((100, 100, 340, 300)).save(d / "b_crop.png")
    return d


@pytest.fixture(scope="module")
def report_dir(image_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rd")
    torch.set_num_threads(1)
    rc = evaluate.main(["--images", str(image_dir), "--model", str(tiny_model_dir), "--steps", "0,1",
                        "--jpeg-qualities", "5,50,90", "--webp-qualities", "0-100:50", "--out", str(out)])
    assert rc == 0
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def _per_image(report_dir: Path) -> list[dict[str, str]]:
    with (report_dir / "rd_per_image.csv").open() as f:
        return list(csv.DictReader(f))


def test_outputs_written_with_expected_columns(report_dir: Path) -> None:
    png = (report_dir / "rd.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with (report_dir / "rd.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "setting", "bpp", "psnr", "ms_ssim", "n_images", "encode_s", "decode_s"]
    settings = {(r["method"], r["setting"]) for r in rows}
    assert settings == {("tiny", "S=0"), ("tiny", "S=1"), ("jpeg", "q=5"), ("jpeg", "q=50"),
                        ("jpeg", "q=90"), ("webp", "q=0"), ("webp", "q=50"), ("webp", "q=100")}
    assert all(r["n_images"] == "2" for r in rows)
    md = (report_dir / "rd.md").read_text()
    header = md.splitlines()[0]
    for col in ("bpp", "PSNR", "MS-SSIM", "jpeg PSNR@bpp", "webp MS-SSIM@bpp", "ΔPSNR vs jpeg"):
        assert f" {col} " in header, col
    assert md.count("| tiny |") == 2


def test_baseline_values_equal_independent_computation(report_dir: Path, image_dir: Path) -> None:
    rows = {(r["method"], r["setting"], r["image"]): r for r in _per_image(report_dir)}
    for name, fmt, q in (("b_crop.png", "JPEG", 50), ("a_small.png", "WEBP", 0)):
        img = np.asarray(Image.open(image_dir / name).convert("RGB"))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, quality=q)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        r = rows[(fmt.lower(), f"q={q}", name)]
        assert int(r["n_bytes"]) == len(buf.getvalue())
        assert float(r["bpp"]) == pytest.approx(8 * len(buf.getvalue()) / (img.shape[0] * img.shape[1]), rel=1e-12)
        assert float(r["psnr"]) == pytest.approx(_psnr(img, dec), abs=1e-9)
    # 200 px short side: the standard 5-scale MS-SSIM, exactly pytorch_msssim's default call
    img = np.asarray(Image.open(image_dir / "b_crop.png").convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=50)
    dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    t = lambda a: torch.from_numpy(a.copy()).permute(2, 0, 1)[None].double()  # noqa: E731  (float64 reference)
    expected = float(ref_ms_ssim(t(img), t(dec), data_range=255))
    assert float(rows[("jpeg", "q=50", "b_crop.png")]["ms_ssim"]) == pytest.approx(expected, abs=1e-5)


def test_model_values_equal_independent_roundtrip(report_dir: Path, image_dir: Path, tiny_model_dir: Path) -> None:
    rows = {(r["setting"], r["image"]): r for r in _per_image(report_dir) if r["method"] == "tiny"}
    codec = RDEICCodec.from_pretrained(tiny_model_dir)
    img = np.asarray(Image.open(image_dir / "b_crop.png").convert("RGB"))
    data = codec.encode([img])[0]
    dec0 = codec.decode([data], steps=0)[0]
    r = rows[("S=0", "b_crop.png")]
    assert float(r["bpp"]) == pytest.approx(8 * len(data) / (200 * 240), rel=1e-12)
    assert float(r["psnr"]) == pytest.approx(_psnr(img, dec0), abs=1e-9)
    assert rows[("S=1", "b_crop.png")]["n_bytes"] == r["n_bytes"]  # one encode, decoded at every S


def test_curves_are_means_and_matching_interpolates(report_dir: Path) -> None:
    per = _per_image(report_dir)
    data = json.loads((report_dir / "rd.json").read_text())
    jpeg = {c["setting"]: c for c in data["baselines"]["jpeg"]}
    q50 = [float(r["psnr"]) for r in per if r["method"] == "jpeg" and r["setting"] == "q=50"]
    assert jpeg["q=50"]["psnr"] == pytest.approx(np.mean(q50), abs=1e-9)
    bpp_curve = sorted((c["bpp"], c["psnr"]) for c in jpeg.values())
    for mp in data["models"]["tiny"]:
        m = mp["matched"]["jpeg"]["psnr"]
        if bpp_curve[0][0] <= mp["bpp"] <= bpp_curve[-1][0]:
            expected = np.interp(math.log(mp["bpp"]), [math.log(b) for b, _ in bpp_curve], [p for _, p in bpp_curve])
            assert m == pytest.approx(expected, abs=1e-9)
        else:
            assert m is None


def test_interpolation_is_log_bpp_and_refuses_extrapolation() -> None:
    bpp, val = [0.1, 0.4, 0.2], [10.0, 30.0, 20.0]
    assert rd_eval.interpolate_log_bpp(bpp, val, 0.2) == pytest.approx(20.0)
    assert rd_eval.interpolate_log_bpp(bpp, val, math.sqrt(0.1 * 0.2)) == pytest.approx(15.0)  # log midpoint
    assert rd_eval.interpolate_log_bpp(bpp, val, 0.09) is None
    assert rd_eval.interpolate_log_bpp(bpp, val, 0.41) is None


def test_metrics_are_the_audit_metrics() -> None:
    """evaluate and audit must agree on the same pair of images (one definition, pipeline.metrics)."""
    from pipeline import metrics

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    assert rd_eval.ms_ssim(a, a) == pytest.approx(1.0)
    assert rd_eval.ms_ssim(a, 255 - a) < 0.5
    assert rd_eval.ms_ssim(a, b) == metrics.ms_ssim(a, b)[0]
    assert rd_eval.psnr(a, b) == metrics.psnr(a, b)
    assert rd_eval.psnr(a, a) == rd_eval.PSNR_CAP  # audit says inf; a mean over images needs a finite cap
    assert math.isnan(rd_eval.ms_ssim(a[:20, :20], b[:20, :20]))  # no window fits below 33 px


def test_usage_errors(tmp_path: Path, image_dir: Path, tiny_model_dir: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--images", str(tmp_path), "--model", "tiny"]) == EXIT_USAGE
    assert "no images" in capsys.readouterr().err
    assert evaluate.main(["--images", str(image_dir), "--model", str(tmp_path / "nope")]) == EXIT_USAGE
    assert "no model directory" in capsys.readouterr().err
    twice = ["--model", str(tiny_model_dir), "--model", str(tiny_model_dir)]
    assert evaluate.main(["--images", str(image_dir), *twice]) == 2
    assert "labelled 'tiny'" in capsys.readouterr().err
    assert evaluate.model_label("lo=runs/x/model") == ("lo", "runs/x/model")
    assert evaluate.model_label("mini") == ("mini", "mini")
