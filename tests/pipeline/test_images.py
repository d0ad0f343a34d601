"""Image bytes -> RGB pixels, or the specific reason why not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.images import DEFAULT_MAX_PIXELS, DecodedImage, SampleFailure, decode_image, image_extension
from pipeline.types import REASONS
from tests.pipeline.conftest import encode_image, exif_rotated_jpeg, hostile_samples, png_header_only


@pytest.fixture(scope="module")
def photo(small_photo_paths) -> Image.Image:
    return Image.open(small_photo_paths[0]).convert("RGB")


def _fails(data: bytes, reason: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> SampleFailure:
    with pytest.raises(SampleFailure) as info:
        decode_image(data, max_pixels=max_pixels)
    assert info.value.reason == reason, info.value
    assert info.value.reason in REASONS
    return info.value


def test_real_photo_decodes_to_rgb_uint8(small_photo_paths) -> None:
    data = small_photo_paths[0].read_bytes()
    out = decode_image(data)
    expected = np.asarray(Image.open(small_photo_paths[0]).convert("RGB"))
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == expected.shape
    np.testing.assert_array_equal(out.pixels, expected)
    assert (out.mode, out.exif_orientation) == ("RGB", None)


def test_every_hostile_sample_gets_its_expected_outcome(photo: Image.Image) -> None:
    for key, (members, expect) in hostile_samples(photo).items():
        images = [data for ext, data in members.items() if image_extension(ext)]
        if not images:
            continue  # no image member at all: decided by the runner, not here
        data = images[0]
        if expect.status == "failed":
            _fails(data, expect.reason, max_pixels=16 * 2**20)
            continue
        out = decode_image(data, max_pixels=16 * 2**20)
        assert isinstance(out, DecodedImage), key
        assert out.mode == expect.mode, key
        assert (out.width, out.height) == expect.size, key
        assert out.exif_orientation == expect.exif_orientation, key
        assert out.pixels.dtype == np.uint8 and out.pixels.shape[2] == 3, key


def test_specific_reasons() -> None:
    _fails(b"", "empty_file")
    err = _fails(b"plain text, not pixels" * 3, "not_an_image")
    assert "plain text" in err.message  # says what it saw
    jpeg = encode_image(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    _fails(jpeg[: len(jpeg) // 2], "truncated_image")
    png = encode_image(Image.linear_gradient("L").resize((64, 64)), "PNG")
    broken = bytearray(png)
    broken[60:80] = b"\x00" * 20  # corrupt the compressed data inside IDAT
    _fails(bytes(broken), "corrupt_image")


def test_pixel_limit_is_checked_before_decoding() -> None:
    err = _fails(png_header_only(5000, 5000), "too_large", max_pixels=10_000_000)
    assert "25000000 pixels exceeds the limit of 10000000" in err.message
    # a bomb far beyond Pillow's own guard is refused by Pillow at open (same reason), never allocated
    err = _fails(png_header_only(100_000, 100_000), "too_large", max_pixels=10**12)
    assert "decompression-bomb guard" in err.message
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's process-wide guard is left alone
    img = Image.new("RGB", (300, 200))
    assert decode_image(encode_image(img, "PNG"), max_pixels=60_000).pixels.shape == (200, 300, 3)
    _fails(encode_image(img, "PNG"), "too_large", max_pixels=59_999)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # silenced in production (images.py)
def test_default_pixel_limit_is_a_bomb_guard_that_admits_100_megapixel_panoramas() -> None:
    assert DEFAULT_MAX_PIXELS == 128 * 1024 * 1024  # 134 MP
    assert DEFAULT_MAX_PIXELS < 2 * Image.MAX_IMAGE_PIXELS  # below Pillow's own refusal (~179 MP)
    # a 20000x5000 (100 MP) panorama passes the guard: this header-only PNG then fails as truncated
    _fails(png_header_only(20_000, 5_000), "truncated_image")
    err = _fails(png_header_only(12_000, 12_000), "too_large")  # 144 MP: refused from the header
    assert f"144000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS}" in err.message


def test_exif_orientation_is_applied_and_recorded() -> None:
    data, upright = exif_rotated_jpeg()
    out = decode_image(data)
    assert (out.width, out.height) == upright == (24, 48)
    assert out.exif_orientation == 6
    # the red square (top-left 24x24 when stored) ends up on top after rotating 90 degrees clockwise
    assert out.pixels[:24, :, 0].mean() > 150 and out.pixels[24:, :, 0].mean() < 60


def test_mode_conversions_follow_the_codec_rule() -> None:
    gray16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = decode_image(encode_image(Image.fromarray(gray16), "PNG"))
    assert out.mode == "I;16"
    np.testing.assert_array_equal(out.pixels[0, :, 0], [0, 100, 255])
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    out = decode_image(encode_image(rgba, "PNG"))
    assert out.mode == "RGBA" and out.pixels[0, 0].tolist() == [10, 20, 30]  # alpha dropped, not composited
    cmyk = decode_image(encode_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk.mode == "CMYK" and cmyk.pixels[0, 0, 0] > 200 and cmyk.pixels[0, 0, 1] < 60


def test_float_tiff_outside_0_255_is_unsupported_mode() -> None:
    img = Image.fromarray(np.full((4, 4), 1000.0, dtype=np.float32))
    _fails(encode_image(img, "TIFF"), "unsupported_mode")


@pytest.mark.parametrize(("ext", "expected"), [("jpg", "jpg"), ("b.PNG", "png"), ("json", None), ("", None),
                                               ("tiff", "tiff"), ("txt", None)])
def test_image_extension(ext: str, expected: str | None) -> None:
    assert image_extension(ext) == expected
