"""The shipped ``mini`` models (rdeic_core/zoo/mini*, trained by ``make mini``) load and still code well.

The floors below are the values measured on the validation photo when the weights were shipped
(docs/mini.md), minus a margin: a corrupted, truncated or re-initialised weight file, a changed
architecture config or a decoder regression falls far below them (random weights give ~10 dB).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdeic_core.codec import RDEICCodec, resolve_model_path

VAL_PHOTO = "Dune.png"  # a validation photo (never trained on); its central 256x256 keeps the test fast
CROP = 256
# name -> (bpp range, PSNR floor at S=0, PSNR floor at S=2), measured at shipping time minus margins
EXPECTED = {
    "mini-lo": ((0.04, 0.08), 17.2, 17.3),  # shipped: 0.057 bpp, 18.26 / 18.39 dB
    "mini": ((0.075, 0.15), 17.4, 17.5),  # shipped: 0.107 bpp, 18.41 / 18.56 dB
    "mini-hi": ((0.16, 0.30), 17.6, 17.7),  # shipped: 0.226 bpp, 18.68 / 18.75 dB
}
MAX_WEIGHTS_BYTES = 20_000_000


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def val_photo(photos_root: Path) -> np.ndarray:
    img = np.asarray(Image.open(photos_root / "val768" / VAL_PHOTO).convert("RGB"))
    h, w = img.shape[:2]
    top, left = (h - CROP) // 2, (w - CROP) // 2
    return np.ascontiguousarray(img[top:top + CROP, left:left + CROP])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_model_files_and_card(name: str) -> None:
    d = resolve_model_path(name)
    assert d.parent.name == "zoo", f"{name} should resolve to the shipped copy, got {d}"
    assert (d / "model.safetensors").stat().st_size <= MAX_WEIGHTS_BYTES
    meta = json.loads((d / "config.json").read_text())
    assert meta["config"]["name"] == "mini"
    assert [s["stage"] for s in meta["training"]["stages"]] == ["vae", "prior", "stage1", "stage2"]
    card = (d / "README.md").read_text()
    for needle in ("tools/train_mini.py", "sha256", "trained by commit", "perceptual loss", "lambda_g"):
        assert needle in card, needle


@pytest.fixture(scope="module")
def encoded(val_photo: np.ndarray) -> dict[str, tuple[RDEICCodec, bytes]]:
    out = {}
    for name in EXPECTED:
        codec = RDEICCodec.from_pretrained(name)
        out[name] = (codec, codec.encode([val_photo])[0])
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_model_round_trips_a_validation_photo(name: str, val_photo: np.ndarray,
                                                      encoded: dict[str, tuple[RDEICCodec, bytes]]) -> None:
    (bpp_lo, bpp_hi), floor0, floor2 = EXPECTED[name]
    codec, data = encoded[name]
    bpp = 8 * len(data) / (val_photo.shape[0] * val_photo.shape[1])
    assert bpp_lo <= bpp <= bpp_hi, f"{name}: {bpp:.4f} bpp"
    out0 = codec.decode([data], steps=0)[0]
    out2 = codec.decode([data])[0]  # the header's default S = 2
    assert out0.shape == out2.shape == val_photo.shape
    assert _psnr(val_photo, out0) >= floor0, f"{name} S=0: {_psnr(val_photo, out0):.2f} dB"
    assert _psnr(val_photo, out2) >= floor2, f"{name} S=2: {_psnr(val_photo, out2):.2f} dB"


def test_rate_points_are_ordered(encoded: dict[str, tuple[RDEICCodec, bytes]]) -> None:
    """mini-lo < mini < mini-hi in bytes: the rate points are what their names say."""
    sizes = [len(encoded[name][1]) for name in ("mini-lo", "mini", "mini-hi")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3, sizes


def test_shipped_models_use_the_wide_control() -> None:
    """make mini builds a 1.0x control at stage 1; a 0.2x one made the sampler lose detail (docs/mini.md)."""
    for name in EXPECTED:
        meta = json.loads((resolve_model_path(name) / "config.json").read_text())
        assert meta["config"]["control"]["ratio"] == 1.0, name
