"""Tiled encode/decode (rdeic_core/tiling.py): grid coverage, one-tile bit identity, the memory
bound, batch neutrality and cross-process determinism, on the tiny config with small tiles."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdeic_core import RDEICCodec
from rdeic_core.images import padded_size
from rdeic_core.tiling import Blend, SharedGroupNorms, Tile, TileConfig, batches, grid, proxy_size, tile_starts

# Small tiles, and no whole-size allowance, so that a few-hundred-pixel image is already tiled in every pass.
SMALL = TileConfig(encode_tile=128, encode_overlap=64, latent_tile=16, latent_overlap=8,
                   decode_tile=16, decode_overlap=8, batch=3, whole_max_pixels=0)
# Tiles larger than any test image: every image takes the untiled path.
HUGE = TileConfig(encode_tile=1 << 16, latent_tile=1 << 13, decode_tile=1 << 13)


@pytest.fixture(scope="module")
def codec() -> RDEICCodec:
    return RDEICCodec.from_config("tiny", seed=0)


def _photo_crop(paths: list[Path], h: int, w: int, i: int = 0) -> np.ndarray:
    im = np.asarray(Image.open(paths[i % len(paths)]).convert("RGB"))
    reps = (-(-h // im.shape[0]), -(-w // im.shape[1]), 1)
    return np.ascontiguousarray(np.tile(im, reps)[:h, :w])


# ---------------------------------------------------------------------------- grid
@pytest.mark.parametrize("size", [(1, 1), (63, 65), (65, 4097), (64, 20000), (20000, 64), (513, 700)])
@pytest.mark.parametrize("cfg", [TileConfig(), SMALL])
def test_grids_cover_every_pixel_with_unit_weights(size, cfg):
    """Each pass's grid covers the whole padded canvas, and the blend weights sum to exactly one."""
    hp, wp = padded_size(*size, 64)
    for canvas, tile, overlap, scale in (
        ((hp // 8, wp // 8), cfg.encode_tile // 8, cfg.encode_overlap // 8, 1),   # feature units
        ((hp // 8, wp // 8), cfg.latent_tile, cfg.latent_overlap, 1),             # latent units
        ((hp // 8, wp // 8), cfg.decode_tile, cfg.decode_overlap, 8),             # latent -> pixels
    ):
        h, w = canvas
        tiles = grid(h, w, tile, overlap, 8)
        assert len({(t.h, t.w) for t in tiles}) == 1  # one static tile shape per canvas
        cover = np.zeros((h, w), dtype=np.int32)
        for t in tiles:
            assert t.y % 8 == 0 and t.x % 8 == 0 and t.h % 8 == 0 and t.w % 8 == 0
            assert 0 <= t.y and t.y + t.h <= h and 0 <= t.x and t.x + t.w <= w
            cover[t.y:t.y + t.h, t.x:t.x + t.w] += 1
        assert cover.min() >= 1
        if h * w * scale * scale <= 4_000_000:
            blend = Blend(h, w, tile, overlap, 8, scale=scale)
            total = torch.zeros(h * scale, w * scale, dtype=torch.float64)
            for t in tiles:
                total[t.y * scale:(t.y + t.h) * scale, t.x * scale:(t.x + t.w) * scale] += blend.weight(t).double()
            assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_tile_starts_overlap_at_least_the_minimum():
    for length in range(8, 2000, 8):
        starts = tile_starts(length, 64, 16, 8)
        size = min(64, length)
        assert starts[0] == 0 and starts[-1] + size == length
        for a, b in zip(starts, starts[1:]):
            assert a + size - b >= 16, (length, starts)


def test_tile_config_is_validated():
    with pytest.raises(ValueError, match="latent_tile"):
        TileConfig(latent_tile=60).validate()
    with pytest.raises(ValueError, match="decode_overlap"):
        TileConfig(decode_tile=64, decode_overlap=64).validate()
    with pytest.raises(ValueError, match="batch"):
        TileConfig(batch=0).validate()


def test_batches_are_full_and_of_one_shape():
    tiles = [Tile(0, 0, 8 * i, 16, 16) for i in range(7)] + [Tile(1, 0, 0, 8, 16)] * 2
    got = list(batches(tiles, 3))
    assert [n for _, n in got] == [3, 3, 1, 2]
    for chunk, _ in got:
        assert len(chunk) == 3 and len({(t.h, t.w) for t in chunk}) == 1


def test_shared_group_norms_reproduce_whole_input_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU())
    net[1].weight.data.normal_()
    net[1].bias.data.normal_()
    x = torch.randn(2, 3, 32, 32)
    norms = SharedGroupNorms(net)
    with torch.no_grad():
        norms.record(lambda: net(x[:1]))
        norms.record(lambda: net(x[1:]))
        whole = net(x)
        # the right half of image 1, normalised with image 1's whole-image statistics
        half = norms.apply([1], lambda: net(x[1:, :, :, 16:]))
        assert torch.allclose(half[0, :, :, 1:-1], whole[1, :, :, 17:-1], atol=1e-5)
        # outside record/apply the network is untouched
        assert torch.equal(net(x), whole)
        # channels-last activations stay channels-last
        xl = x[:1].contiguous(memory_format=torch.channels_last)
        y = norms.apply([0], lambda: net[1](net[0](xl)))
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_proxy_size_fits_the_tile_and_keeps_the_aspect():
    assert proxy_size(4096, 2048, 512, 64) == (512, 256)
    assert proxy_size(64, 20032, 512, 64) == (64, 512)
    assert proxy_size(256, 256, 512, 64) == (256, 256)


# ---------------------------------------------------------------------------- the codec's tiled path
def test_one_tile_images_are_bit_identical_to_the_untiled_path(codec, small_photo_paths):
    imgs = [_photo_crop(small_photo_paths, h, w, i) for i, (h, w) in enumerate([(64, 64), (100, 120), (128, 128)])]
    codec.tiling = replace(SMALL)  # 128-px images are exactly one encoder/latent/decoder tile
    try:
        tiled_streams = codec.encode(imgs)
        tiled_out = codec.decode(tiled_streams)
        codec.tiling = HUGE
        streams = codec.encode(imgs)
        out = codec.decode(streams)
    finally:
        codec.tiling = TileConfig()
    assert tiled_streams == streams
    for a, b in zip(tiled_out, out):
        assert np.array_equal(a, b)


def test_images_within_whole_max_pixels_take_the_untiled_path(codec, small_photo_paths):
    """Larger than a tile but within ``whole_max_pixels``: every pass whole, bit-identical to untiled;
    one pixel row more than the allowance and the same image is tiled."""
    img = _photo_crop(small_photo_paths, 200, 330)  # padded 256 x 384 = 98304 px: 2 x 3 encoder tiles of SMALL
    calls: list[tuple[int, ...]] = []
    orig = codec.noise_estimator.forward
    codec.noise_estimator.forward = lambda x, *a, **k: (calls.append(tuple(x.shape)), orig(x, *a, **k))[1]
    try:
        codec.tiling = HUGE
        ref_stream = codec.encode([img])[0]
        ref = codec.decode([ref_stream])[0]
        calls.clear()
        codec.tiling = replace(SMALL, whole_max_pixels=256 * 384)
        assert codec.fits_untiled(codec.parse(ref_stream).header.z_shape)
        stream = codec.encode([img])[0]
        out = codec.decode([stream])[0]
        assert {c[-2:] for c in calls} == {(32, 48)}  # the whole latent canvas, never a 16 x 16 tile
        codec.tiling = replace(SMALL, whole_max_pixels=256 * 384 - 1)
        assert not codec.fits_untiled(codec.parse(ref_stream).header.z_shape)
        calls.clear()
        tiled = codec.decode([codec.encode([img])[0]])[0]
        assert {c[-2:] for c in calls} == {(16, 16)}
    finally:
        codec.noise_estimator.forward = orig
        codec.tiling = TileConfig()
    assert stream == ref_stream and np.array_equal(out, ref)
    assert tiled.shape == img.shape and not np.array_equal(tiled, ref)


def test_whole_max_pixels_is_validated():
    with pytest.raises(ValueError, match="whole_max_pixels"):
        TileConfig(whole_max_pixels=-1)
    assert TileConfig().runs_whole(1024, 1536, [512])  # the default admits 1.5 Mi px whole
    assert not TileConfig().runs_whole(1088, 1536, [512])
    assert TileConfig(whole_max_pixels=0).runs_whole(512, 512, [512, 512])  # one tile is always whole


def test_large_images_round_trip_tiled(codec, small_photo_paths):
    imgs = [_photo_crop(small_photo_paths, 200, 330), _photo_crop(small_photo_paths, 64, 700, 1)]
    codec.tiling = SMALL
    try:
        streams = codec.encode(imgs)
        out = codec.decode(streams)
        out5 = codec.decode(streams[:1], steps=5, detail_scale=1.5)
        # several images in one call share tile batches; a tile's result does not depend on them
        assert streams == codec.encode(imgs[:1]) + codec.encode(imgs[1:])
        alone = codec.decode(streams[1:])
    finally:
        codec.tiling = TileConfig()
    for im, o in zip(imgs, out):
        assert o.shape == im.shape and o.dtype == np.uint8
    assert out5[0].shape == imgs[0].shape and not np.array_equal(out5[0], out[0])
    assert np.array_equal(alone[0], out[1])


def test_memory_bound_counts_tiles_per_pass(codec, small_photo_paths):
    """No network pass sees more than ``tiling.batch`` tiles, and every pass of a tiled image is full."""
    img = _photo_crop(small_photo_paths, 320, 448)
    seen: dict[str, list[int]] = {"enc": [], "unet": [], "dec": []}
    vae, ne = codec.vae, codec.noise_estimator
    orig = (vae.encode_features, ne.forward, vae.decode)

    def spy(name, fn):
        def wrapped(x, *a, **k):
            seen[name].append(int(x.shape[0]))
            return fn(x, *a, **k)
        return wrapped

    for batch in (1, 2, 5):
        for v in seen.values():
            v.clear()
        codec.tiling = replace(SMALL, batch=batch)
        vae.encode_features, ne.forward, vae.decode = spy("enc", orig[0]), spy("unet", orig[1]), spy("dec", orig[2])
        try:
            stream = codec.encode([img])[0]
            codec.decode([stream], steps=2)
        finally:
            vae.encode_features, ne.forward, vae.decode = orig
            codec.tiling = TileConfig()
        # one proxy pass (batch 1) per image and tiled network, then full batches of `batch` tiles
        n_enc = len(grid(320 // 8, 448 // 8, SMALL.encode_tile // 8, SMALL.encode_overlap // 8, 8))
        n_lat = len(grid(320 // 8, 448 // 8, SMALL.latent_tile, SMALL.latent_overlap, 8))
        n_dec = len(grid(320 // 8, 448 // 8, SMALL.decode_tile, SMALL.decode_overlap, 8))
        assert seen["enc"] == [1] + [batch] * -(-n_enc // batch)
        assert seen["unet"] == [batch] * (2 * -(-n_lat // batch))
        assert seen["dec"] == [1] + [batch] * -(-n_dec // batch)


def test_one_tile_images_are_batched_within_the_bound(codec, small_photo_paths):
    imgs = [_photo_crop(small_photo_paths, 128, 128, i) for i in range(7)]
    sizes: list[int] = []
    orig = codec.vae.encode_features
    codec.vae.encode_features = lambda x: (sizes.append(int(x.shape[0])), orig(x))[1]
    codec.tiling = replace(SMALL, batch=3)  # 3 tiles of 128^2 per pass = 3 one-tile images
    try:
        codec.encode(imgs)
    finally:
        codec.vae.encode_features = orig
        codec.tiling = TileConfig()
    assert sizes == [3, 3, 1]


CHILD = textwrap.dedent(
    """
    import sys, json
    from pathlib import Path
    import numpy as np, torch
    torch.set_num_threads(1)
    from rdeic_core import RDEICCodec
    from rdeic_core.tiling import TileConfig
    work = Path(sys.argv[1])
    codec = RDEICCodec.from_pretrained(work / "model")
    codec.tiling = TileConfig(**json.loads((work / "tiling.json").read_text()))
    out = codec.decode([(work / "s.rde").read_bytes()])[0]
    np.save(work / "child.npy", out)
    print(json.dumps({"threads": torch.get_num_threads()}))
    """
)


def test_tiled_decode_is_identical_in_a_one_thread_process(codec, small_photo_paths, tmp_path):
    img = _photo_crop(small_photo_paths, 260, 390, 2)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    codec.tiling = SMALL
    try:
        stream = codec.encode([img])[0]
        out = codec.decode([stream])[0]
    finally:
        torch.set_num_threads(prev)
        codec.tiling = TileConfig()
    codec.save_pretrained(tmp_path / "model")
    (tmp_path / "s.rde").write_bytes(stream)
    (tmp_path / "tiling.json").write_text(json.dumps(SMALL.to_dict()))
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["threads"] == 1
    assert np.array_equal(np.load(tmp_path / "child.npy"), out)


def test_tiled_mini_is_close_to_untiled(val_photo_paths):
    """The shipped model on a real 512 x 768 photo with small tiles stays close to its untiled decode."""
    mini = RDEICCodec.from_pretrained("mini")
    img = np.asarray(Image.open(val_photo_paths[0]).convert("RGB"))
    mini.tiling = HUGE
    ref_stream = mini.encode([img])[0]
    ref = mini.decode([ref_stream])[0].astype(np.float64)
    mini.tiling = TileConfig(encode_tile=256, encode_overlap=64, latent_tile=32, latent_overlap=16,
                             decode_tile=32, decode_overlap=8, whole_max_pixels=0)
    out = mini.decode([mini.encode([img])[0]])[0].astype(np.float64)
    psnr_vs_untiled = 10 * np.log10(255.0 ** 2 / np.mean((out - ref) ** 2))
    psnr_ref = 10 * np.log10(255.0 ** 2 / np.mean((ref - img) ** 2))
    psnr_out = 10 * np.log10(255.0 ** 2 / np.mean((out - img) ** 2))
    print(f"tiled vs untiled {psnr_vs_untiled:.2f} dB; vs source: untiled {psnr_ref:.2f}, tiled {psnr_out:.2f}")
    assert psnr_vs_untiled > 27.0, psnr_vs_untiled
    assert psnr_out > psnr_ref - 0.5, (psnr_out, psnr_ref)


@pytest.mark.parametrize("size", [(1, 1), (63, 65), (65, 4097), (64, 20000), (20000, 64)])
def test_odd_sizes_round_trip_with_default_tiles(codec, size):
    """Strips and odd sizes through the real tiled path (default tiles; a 64-px strip has 64 x 512 tiles)."""
    rng = np.random.default_rng(sum(size))
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    stream = codec.encode([img])[0]
    out = codec.decode([stream], steps=1)[0]
    assert out.shape == img.shape and out.dtype == np.uint8
