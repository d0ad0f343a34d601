"""bench.ceiling: the VAE round trip, the codec's decodes and the baselines at the bitstream's size are
what they claim to be (checked against independent computations on a real photo, tiny model)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import ceiling
from pipeline.metrics import psnr
from rdeic_core import RDEICCodec


@pytest.fixture(scope="module")
def photo(small_photo_paths: list[Path]) -> np.ndarray:
    with Image.open(small_photo_paths[0]) as im:
        return np.asarray(im.convert("RGB"))[:120, :200].copy()  # odd size: padding is cropped back


def test_colour_error_is_the_largest_channel_mean_difference() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[..., 1] = 8
    b[0, 0, 2] = 16  # 1 pixel of 16: mean 1
    assert ceiling.colour_error(a, b) == 8.0
    assert ceiling.colour_error(a, a) == 0.0


def test_baselines_keep_to_their_side_of_the_budget(photo: np.ndarray) -> None:
    budget = 1200
    data, dec, q = ceiling.at_budget(photo, "WEBP", range(0, 101), budget, larger=False)
    assert len(data) <= budget
    bigger = io.BytesIO()
    Image.fromarray(photo).save(bigger, format="WEBP", quality=q + 1)
    assert len(bigger.getvalue()) > budget  # the highest quality that fits
    assert np.array_equal(dec, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    data, _, q = ceiling.at_budget(photo, "JPEG", range(1, 96), budget, larger=True)
    assert len(data) >= budget or q == 95
    if q > 1:
        smaller = io.BytesIO()
        Image.fromarray(photo).save(smaller, format="JPEG", quality=q - 1)
        assert len(smaller.getvalue()) < budget  # the lowest quality that reaches it
    assert ceiling.at_budget(photo, "WEBP", range(0, 101), 10, larger=False) is None


def test_rows_equal_an_independent_round_trip(photo: np.ndarray, tiny_model_dir: Path, tmp_path: Path) -> None:
    codec = RDEICCodec.from_pretrained(tiny_model_dir)
    row = ceiling.measure("tiny", codec, "p.png", photo, steps=1)
    data = codec.encode([photo])[0]
    assert row.n_bytes == len(data) and row.bpp == 8 * len(data) / (120 * 200)
    assert row.s0_psnr == psnr(photo, codec.decode([data], steps=0)[0])
    assert row.steps == 1 and row.sd_psnr == psnr(photo, codec.decode([data], steps=1)[0])
    vae = ceiling.vae_round_trip(codec, photo)
    assert vae.shape == photo.shape and row.vae_psnr == psnr(photo, vae)
    # the CLI writes the same numbers
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(photo).save(folder / "p.png")
    out = tmp_path / "c.json"
    assert ceiling.main(["--model", f"tiny={tiny_model_dir}", "--images", str(folder), "--steps", "1",
                         "--json", str(out), "--markdown", str(tmp_path / "c.md")]) == 0
    got = json.loads(out.read_text())
    assert got["rows"][0]["sd_psnr"] == row.sd_psnr and got["means"]["tiny"]["photos"] == 1
    assert "**tiny**" in (tmp_path / "c.md").read_text()
