"""RDEICCodec round trips on the tiny config: sizes, modes, headers, bpp, identity and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rdeic_core import BitstreamError, ModelMismatchError, RDEICCodec
from rdeic_core.bitstream import Bitstream, bits_per_pixel, peek_header


@pytest.fixture(scope="module")
def codec() -> RDEICCodec:
    return RDEICCodec.from_config("tiny", seed=0)


def _rand(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if c == 0 else (h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


ODD_SIZES = [(1, 1), (63, 65), (200, 136), (136, 200), (64, 64), (65, 1)]


def test_round_trip_odd_sizes(codec):
    images = [_rand(h, w, seed=i) for i, (h, w) in enumerate(ODD_SIZES)]
    streams = codec.encode(images, steps=2)
    assert len(streams) == len(images) and all(isinstance(s, bytes) and s for s in streams)
    out = codec.decode(streams)
    for im, rec, s in zip(images, out, streams):
        assert rec.dtype == np.uint8 and rec.shape == im.shape
        hdr = peek_header(s)
        assert (hdr.height, hdr.width) == im.shape[:2]
        assert hdr.steps == 2 and hdr.detail_scale == 1.0
        assert hdr.fingerprint == codec.fingerprint[:4]
        assert hdr.z_shape == (-(-im.shape[0] // 64), -(-im.shape[1] // 64))
        assert bits_per_pixel(s, *im.shape[:2]) == pytest.approx(8 * len(s) / (im.shape[0] * im.shape[1]))


def test_real_photos_round_trip(codec, small_photo_paths):
    paths = small_photo_paths[:3]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    streams = codec.encode(images)
    out = codec.decode(streams)
    for im, rec in zip(images, out):
        assert rec.shape == im.shape
    # a random-weight model still codes: the stream is far below raw size
    assert all(len(s) < im.size for s, im in zip(streams, images))


@pytest.mark.parametrize("kind", ["gray2d", "gray3d", "rgba", "la", "palette", "pil_rgba", "uint16", "cmyk"])
def test_modes_are_converted(codec, kind):
    rgb = _rand(40, 50, seed=3)
    if kind == "gray2d":
        img, expect = rgb[:, :, 0], np.repeat(rgb[:, :, :1], 3, 2)
    elif kind == "gray3d":
        img, expect = rgb[:, :, :1], np.repeat(rgb[:, :, :1], 3, 2)
    elif kind == "rgba":
        img, expect = np.dstack([rgb, rgb[:, :, :1]]), rgb
    elif kind == "la":
        img, expect = np.dstack([rgb[:, :, 0], rgb[:, :, 1]]), np.repeat(rgb[:, :, :1], 3, 2)
    elif kind == "palette":
        pil = Image.fromarray(rgb).convert("P")
        img, expect = pil, np.asarray(pil.convert("RGB"))
    elif kind == "pil_rgba":
        img, expect = Image.fromarray(np.dstack([rgb, rgb[:, :, :1]]), "RGBA"), rgb
    elif kind == "uint16":
        img, expect = rgb.astype(np.uint16) * 257, rgb
    else:
        pil = Image.fromarray(rgb).convert("CMYK")
        img, expect = pil, np.asarray(pil.convert("RGB"))
    from rdeic_core.images import to_rgb_uint8

    np.testing.assert_array_equal(to_rgb_uint8(img), expect)
    (s,) = codec.encode([img])
    (rec,) = codec.decode([s], steps=0)
    assert rec.shape == (40, 50, 3)


@pytest.mark.parametrize("bad", [np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4, 5), np.uint8), "not an image"])
def test_bad_images_are_rejected(codec, bad):
    with pytest.raises(ValueError):
        codec.encode([bad])


def test_decode_is_deterministic_and_batch_consistent(codec):
    images = [_rand(64, 64, seed=i) for i in range(3)]
    streams = codec.encode(images, steps=2)
    a = codec.decode(streams)
    b = codec.decode(streams)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_header_defaults_and_overrides(codec):
    (s,) = codec.encode([_rand(64, 96)], steps=5, detail_scale=1.3, seed=1234)
    hdr = peek_header(s)
    assert hdr.steps == 5 and hdr.seed == 1234
    assert hdr.detail_scale == pytest.approx(1.3, abs=1e-7)
    default = codec.decode([s])[0]
    again = codec.decode([s], steps=5, detail_scale=1.3)[0]
    np.testing.assert_array_equal(default, again)
    other = codec.decode([s], steps=2, detail_scale=1.0)[0]
    assert other.shape == default.shape


def test_seed_changes_noise_not_payload(codec):
    img = _rand(64, 64)
    s1, s2 = codec.encode([img, img], seed=1)[0], codec.encode([img], seed=2)[0]
    b1, b2 = Bitstream.from_bytes(s1), Bitstream.from_bytes(s2)
    assert b1.y_payload == b2.y_payload and b1.z_payload == b2.z_payload
    assert b1.header.seed != b2.header.seed


def test_foreign_model_is_refused(codec):
    other = RDEICCodec.from_config("tiny", seed=1)
    assert other.fingerprint != codec.fingerprint
    (s,) = other.encode([_rand(64, 64)])
    with pytest.raises(ModelMismatchError) as e:
        codec.decode([s])
    assert codec.fingerprint[:4].hex() in str(e.value) and other.fingerprint[:4].hex() in str(e.value)


def test_corrupted_stream_is_an_error(codec):
    (s,) = codec.encode([_rand(64, 64)])
    bad = bytearray(s)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(BitstreamError, match="CRC"):
        codec.decode([bytes(bad)])
    with pytest.raises(BitstreamError):
        codec.decode([s[:-3]])


def test_save_and_load(codec, tmp_path):
    codec.save_pretrained(tmp_path / "m")
    loaded = RDEICCodec.from_pretrained(tmp_path / "m")
    assert loaded.fingerprint == codec.fingerprint
    (s,) = codec.encode([_rand(64, 128)])
    np.testing.assert_array_equal(loaded.decode([s])[0], codec.decode([s])[0])
    assert loaded.encode([_rand(64, 128)]) == codec.encode([_rand(64, 128)])


def test_from_config_is_reproducible():
    a = RDEICCodec.from_config("tiny", seed=5)
    b = RDEICCodec.from_config("tiny", seed=5)
    assert a.fingerprint == b.fingerprint


def test_dtype_cast_keeps_identity(codec):
    fp = codec.fingerprint
    c2 = RDEICCodec.from_config("tiny", seed=0).to("cpu", torch.float64)
    assert c2.fingerprint == fp
    assert c2.compression.out.weight.dtype == torch.float32  # the entropy side never changes dtype


def test_steps_zero_decodes_compressed_latent(codec):
    (s,) = codec.encode([_rand(64, 64)])
    lat = codec.decode_latents([s])
    direct = codec.latent_to_images(lat.c_latent)[0]
    np.testing.assert_array_equal(codec.decode([s], steps=0)[0], direct)


def test_sd21_builds_and_round_trips_256():
    """The paper's sizes with random weights (slow: ~1.3 B parameters on CPU)."""
    codec = RDEICCodec.from_config("sd21", seed=0)
    n_comp = sum(p.numel() for p in codec.compression.parameters())
    assert 50e6 < n_comp < 54e6  # ≈52.1 M (spec section 2)
    img = _rand(256, 256)
    (s,) = codec.encode([img], steps=2)
    hdr = peek_header(s)
    assert (hdr.height, hdr.width, hdr.z_shape) == (256, 256, (4, 4))
    (rec,) = codec.decode([s])
    assert rec.shape == (256, 256, 3) and rec.dtype == np.uint8


test_sd21_builds_and_round_trips_256 = pytest.mark.slow(test_sd21_builds_and_round_trips_256)


def test_one_pixel_image_with_one_channel_groups():
    """A 0.2x control of a 16-wide UNet has 3-6 channels; with one channel per group a 1x1 image's
    1x1 bottleneck gives single-value groups, which must normalise (to the bias), not crash."""
    import dataclasses

    from rdeic_core.config import ControlConfig, tiny

    cfg = tiny()
    cfg.unet.update(block_out_channels=[16, 32, 32, 32], attention_head_dim=[2, 4, 4, 4], norm_num_groups=8)
    cfg = dataclasses.replace(cfg, control=ControlConfig(ratio=0.2, num_head_channels=4, norm_groups=32))
    codec = RDEICCodec.from_config(cfg, seed=0)
    (s,) = codec.encode([_rand(1, 1)])
    (rec,) = codec.decode([s], steps=2)
    assert rec.shape == (1, 1, 3)
