"""Compression module: reference layout, training forward, and the deterministic real bitstream."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rdeic_core import compression as compression_mod
from rdeic_core.compression import CompressionModule, EntropyCodingError
from rdeic_core.config import sd21, tiny
from rdeic_core.entropy import (
    ckbd_anchor,
    ckbd_nonanchor,
    get_scale_table,
    index_bits,
    merge_squeezed,
    pack_indices,
    scale_indexes,
    snap_means,
    squeeze_anchor,
    squeeze_nonanchor,
    unpack_indices,
    unsqueeze_anchor,
    unsqueeze_nonanchor,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _make_model(seed: int = 0, wide_scales: bool = True) -> CompressionModule:
    """Tiny module, tables built, eval mode.

    Random entropy-parameter nets predict scales near 0 (every symbol in table
    0, most escaped); ``wide_scales`` sets their scale outputs to ~4 so the
    coder does real work on inputs with a std of a few units.
    """
    torch.manual_seed(seed)
    m = CompressionModule(tiny().compression)
    if wide_scales:
        with torch.no_grad():
            for ep in list(m.entropy_parameters_anchor) + list(m.entropy_parameters_nonanchor):
                last = ep.fusion[4]
                c = last.out_channels // 2
                last.weight.mul_(0.01)
                last.bias[:c] = 4.0
    m.update(force=True)
    return m.eval()


def _feat(b: int, h: int, w: int, seed: int = 1, scale: float = 10.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, tiny().compression.in_nc, h, w, generator=g) * scale


@pytest.fixture(scope="module")
def model() -> CompressionModule:
    torch.set_num_threads(1)
    return _make_model()


# ---------------------------------------------------------------------------- layout
SD21_EXPECTED_SHAPES = {
    "encoder.g_a.0.conv1.weight": (256, 512, 3, 3),
    "encoder.g_a.0.conv2.weight": (256, 256, 3, 3),
    "encoder.g_a.0.adaptor.weight": (256, 512, 1, 1),
    "encoder.g_a.3.conv2.bias": (256,),
    "encoder.g_a.4.conv1.weight": (256, 256, 3, 3),
    "encoder.g_a.4.downsample.weight": (256, 256, 1, 1),
    "encoder.g_a.7.conv1.weight": (256, 256, 3, 3),
    "encoder.g_a.8.weight": (256, 256, 3, 3),
    "hyper_enc.hyper_enc.0.conv1.weight": (256, 256, 3, 3),
    "hyper_enc.hyper_enc.2.downsample.weight": (256, 256, 1, 1),
    "hyper_enc.hyper_enc.3.conv2.bias": (256,),
    "hyper_dec.hyper_dec.0.subpel_conv.0.weight": (1024, 256, 1, 1),
    "hyper_dec.hyper_dec.0.conv.weight": (256, 256, 3, 3),
    "hyper_dec.hyper_dec.0.upsample.0.weight": (1024, 256, 1, 1),
    "hyper_dec.hyper_dec.1.upsample.0.bias": (1024,),
    "hyper_dec.hyper_dec.2.conv1.weight": (384, 256, 3, 3),
    "hyper_dec.hyper_dec.2.adaptor.weight": (384, 256, 1, 1),
    "hyper_dec.hyper_dec.3.conv2.weight": (512, 512, 3, 3),
    "hyper_dec.hyper_dec.3.adaptor.weight": (512, 384, 1, 1),
    "decoder.g_s.0.weight": (256, 256, 3, 3),
    "decoder.g_s.4.subpel_conv.0.weight": (1024, 256, 1, 1),
    "decoder.g_s.4.conv.weight": (256, 256, 3, 3),
    "decoder.g_s.8.conv2.weight": (256, 256, 3, 3),
    "out.weight": (4, 256, 3, 3),
    "local_context.0.weight": (16, 8, 5, 5),
    "local_context.9.weight": (128, 64, 5, 5),
    "channel_context.1.fushion.0.weight": (224, 8, 5, 5),
    "channel_context.1.fushion.2.weight": (128, 224, 5, 5),
    "channel_context.1.fushion.4.weight": (16, 128, 5, 5),
    "channel_context.9.fushion.0.weight": (224, 192, 5, 5),
    "channel_context.9.fushion.4.bias": (128,),
    "entropy_parameters_anchor.0.fusion.0.weight": (26, 512, 1, 1),
    "entropy_parameters_anchor.0.fusion.2.weight": (21, 26, 1, 1),
    "entropy_parameters_anchor.0.fusion.4.weight": (16, 21, 1, 1),
    "entropy_parameters_anchor.1.fusion.0.weight": (26, 528, 1, 1),
    "entropy_parameters_anchor.9.fusion.0.weight": (213, 640, 1, 1),
    "entropy_parameters_nonanchor.0.fusion.0.weight": (26, 528, 1, 1),
    "entropy_parameters_nonanchor.1.fusion.0.weight": (26, 544, 1, 1),
    "entropy_parameters_nonanchor.9.fusion.0.weight": (213, 768, 1, 1),
    "entropy_parameters_nonanchor.9.fusion.2.weight": (170, 213, 1, 1),
    "quantize.embedding.weight": (16384, 256),
    "quantize.embed_prob": (16384,),
    "gaussian_conditional._quantized_cdf": (0,),
    "gaussian_conditional._offset": (0,),
    "gaussian_conditional._cdf_length": (0,),
    "gaussian_conditional.scale_table": (0,),
    "gaussian_conditional.scale_bound": (1,),
    "gaussian_conditional.likelihood_lower_bound.bound": (1,),
    "gaussian_conditional.lower_bound_scale.bound": (1,),
}
SD21_ABSENT = [
    "channel_context.0.fushion.0.weight",  # slice 0 has no channel context (None in the ModuleList)
    "encoder.g_a.1.adaptor.weight",  # RB(M, M) has no adaptor
    "quantize.usage",  # the reference's code-usage counter: no such buffer here
    "hyper_dec.hyper_dec.0.subpel_conv.1.weight",  # PixelShuffle has no parameters
]


def test_sd21_state_dict_names_shapes_and_size() -> None:
    with torch.device("meta"):
        m = CompressionModule(sd21().compression)
    sd = m.state_dict()
    got = {k: tuple(sd[k].shape) for k in SD21_EXPECTED_SHAPES if k in sd}
    assert got == SD21_EXPECTED_SHAPES
    for k in SD21_ABSENT:
        assert k not in sd
    assert all(not k.startswith("channel_context.0.") for k in sd)
    n_params = sum(p.numel() for p in m.parameters())
    assert 52.0e6 < n_params < 52.2e6, n_params  # spec: ~52.1 M
    assert m.quantize.embedding.weight.numel() == 16384 * 256
    assert m.index_bits == 14


def test_tiny_channel_context_uses_configured_hidden_widths() -> None:
    cfg = tiny().compression
    m = CompressionModule(cfg)
    assert m.channel_context[0] is None
    assert m.channel_context[3].fushion[0].weight.shape == (cfg.cc_hidden[0], sum(cfg.slice_ch[:3]), 5, 5)
    assert m.channel_context[3].fushion[2].weight.shape == (cfg.cc_hidden[1], cfg.cc_hidden[0], 5, 5)


# ---------------------------------------------------------------------------- helpers
def test_checkerboard_order_matches_definition() -> None:
    y = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    anchor_expected = torch.stack(
        [torch.stack([y[:, :, r, c] for c in range(6) if (r + c) % 2 == 1], dim=-1) for r in range(4)], dim=-2
    )
    nonanchor_expected = torch.stack(
        [torch.stack([y[:, :, r, c] for c in range(6) if (r + c) % 2 == 0], dim=-1) for r in range(4)], dim=-2
    )
    assert torch.equal(squeeze_anchor(y), anchor_expected)
    assert torch.equal(squeeze_nonanchor(y), nonanchor_expected)
    assert torch.equal(merge_squeezed(squeeze_anchor(y), squeeze_nonanchor(y)), y)
    assert torch.equal(unsqueeze_anchor(squeeze_anchor(y)), ckbd_anchor(y))
    assert torch.equal(unsqueeze_nonanchor(squeeze_nonanchor(y)), ckbd_nonanchor(y))
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    odd = ((rows + cols) % 2 == 1).expand_as(y)
    assert torch.equal(ckbd_anchor(y)[odd], y[odd]) and not ckbd_anchor(y)[~odd].any()
    with pytest.raises(ValueError):
        squeeze_anchor(torch.zeros(1, 1, 3, 4))


@pytest.mark.parametrize("bits", [1, 7, 10, 14, 16, 32])
def test_pack_unpack_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for count in (0, 1, 5, 37):
        idx = rng.integers(0, 1 << bits, size=count, dtype=np.int64)
        data = pack_indices(idx, bits)
        assert len(data) == math.ceil(count * bits / 8)
        assert np.array_equal(unpack_indices(data, count, bits), idx)


def test_pack_unpack_errors() -> None:
    data = pack_indices(np.array([3, 1023, 0]), 10)  # 30 bits -> 4 bytes, 2 padding bits
    assert len(data) == 4
    assert data[0] == 0b00000000 and data[1] == 0b11111111  # MSB first: 0000000011 1111111111 ...
    with pytest.raises(ValueError, match="expected 4 bytes"):
        unpack_indices(data[:-1], 3, 10)
    with pytest.raises(ValueError, match="expected 4 bytes"):
        unpack_indices(data + b"\x00", 3, 10)
    with pytest.raises(ValueError, match="padding"):
        unpack_indices(data[:-1] + bytes([data[-1] | 1]), 3, 10)
    with pytest.raises(ValueError, match="out of range"):
        unpack_indices(data, 3, 10, num_symbols=1000)
    assert np.array_equal(unpack_indices(data, 3, 10, num_symbols=1024), [3, 1023, 0])
    with pytest.raises(ValueError):
        pack_indices(np.array([1024]), 10)
    with pytest.raises(ValueError):
        pack_indices(np.array([-1]), 10)
    with pytest.raises(ValueError):
        pack_indices(np.array([1.0]), 10)


def test_index_bits_and_scale_table() -> None:
    assert [index_bits(k) for k in (2, 3, 1024, 1025, 16384)] == [1, 2, 10, 11, 14]
    t = get_scale_table()
    assert t.dtype == torch.float32 and t.numel() == 64
    assert t[0].item() == pytest.approx(0.11, rel=1e-6) and t[-1].item() == pytest.approx(256.0, rel=1e-6)


def test_scale_indexes_match_compressai_rule(model: CompressionModule) -> None:
    gc = model.gaussian_conditional
    scales32 = torch.cat([torch.rand(2000) * 300, gc.scale_table, gc.scale_table * (1 + 1e-7),
                          torch.tensor([0.0, -1.0])])
    ours = scale_indexes(scales32.double(), gc.scale_table, float(gc.lower_bound_scale.bound))
    assert torch.equal(ours, gc.build_indexes(scales32).long())
    mu = torch.tensor([0.1, -2.5, 1e-9, 3 / 65536 / 2], dtype=torch.float64)
    assert snap_means(mu).tolist() == [round(0.1 * 65536), -163840, 0, 2]  # half to even
    with pytest.raises(EntropyCodingError):
        snap_means(torch.tensor([float("nan")], dtype=torch.float64))


# ---------------------------------------------------------------------------- training forward
def test_training_forward_losses_and_gradients() -> None:
    torch.manual_seed(0)
    m = CompressionModule(tiny().compression).train()
    feat = _feat(2, 16, 16, scale=3.0)
    prob_before = m.quantize.embed_prob.clone()
    out = m(feat)
    assert not torch.equal(prob_before, m.quantize.embed_prob)  # running usage was updated
    assert out.c_latent.shape == (2, 4, 16, 16) and out.guide_hint.shape == (2, 64, 16, 16)
    assert out.y.shape == out.y_hat.shape == out.y_likelihoods.shape == out.q_likelihoods.shape == (2, 64, 8, 8)
    assert out.z_indices.shape == (2, 2, 2)
    bpp = -torch.log2(out.y_likelihoods).sum() / (2 * 128 * 128)
    loss = out.c_latent.square().mean() + bpp + out.vq_loss
    assert torch.isfinite(loss) and torch.isfinite(out.q_likelihoods).all() and out.vq_loss > 0
    loss.backward()
    for name in ("encoder.g_a.0.conv1.weight", "hyper_enc.hyper_enc.0.conv1.weight", "quantize.embedding.weight",
                 "entropy_parameters_nonanchor.3.fusion.0.weight", "channel_context.5.fushion.0.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


# ---------------------------------------------------------------------------- real bitstream
@pytest.mark.parametrize("hw", [(8, 16), (16, 8)])
def test_compress_decompress_exact(model: CompressionModule, hw: tuple[int, int]) -> None:
    feat = _feat(3, *hw)
    comps, y_hat_enc = model.compress_with_y_hat(feat)
    assert len(comps) == 3
    z_shape = (hw[0] // 8, hw[1] // 8)
    for c in comps:
        assert c.z_shape == z_shape and c.z_indices.dtype == np.int64
        n = z_shape[0] * z_shape[1]
        assert len(c.z_bytes) == math.ceil(n * model.index_bits / 8)
        assert np.array_equal(unpack_indices(c.z_bytes, n, model.index_bits), c.z_indices.ravel())
        assert len(c.y_string) > 100
    assert len({c.y_string for c in comps}) == 3

    ys, zs, crcs = [c.y_string for c in comps], [c.z_bytes for c in comps], [c.y_hat_crc32 for c in comps]
    y_hat_dec = model.decompress_y_hat(ys, zs, z_shape, crcs)
    assert torch.equal(y_hat_dec, y_hat_enc)
    # y_hat sits on the 2**-16 grid and really differs from y by rounding only
    y = model.encoder(feat)
    assert torch.equal(torch.round(y_hat_dec * 65536), y_hat_dec * 65536)
    assert (y_hat_dec - y).abs().max() <= 0.5 + 1e-4

    c_lat, hint = model.decompress(ys, zs, z_shape, crcs)
    c_ref, hint_ref = model.synthesize(y_hat_enc)
    assert c_lat.shape == (3, 4, *hw) and hint.shape == (3, 64, *hw)
    assert torch.equal(c_lat, c_ref) and torch.equal(hint, hint_ref)

    # another batch composition decodes to the same y_hat
    alone = model.decompress_y_hat([ys[2]], [zs[2]], z_shape, [crcs[2]])
    assert torch.equal(alone[0], y_hat_enc[2])


def test_wrong_checksum_or_payload_is_reported(model: CompressionModule) -> None:
    comps = model.compress(_feat(1, 8, 16, seed=5))
    c = comps[0]
    with pytest.raises(EntropyCodingError, match="checksum"):
        model.decompress_y_hat([c.y_string], [c.z_bytes], c.z_shape, [c.y_hat_crc32 ^ 1])
    damaged = bytearray(c.y_string)
    damaged[len(damaged) // 2] ^= 0x10
    with pytest.raises(EntropyCodingError):
        model.decompress([bytes(damaged)], [c.z_bytes], c.z_shape, [c.y_hat_crc32])
    with pytest.raises(ValueError, match="z payload 0"):
        model.decompress([c.y_string], [c.z_bytes + b"\x00"], c.z_shape)
    with pytest.raises(EntropyCodingError, match="multiple of 4"):
        model.decompress([c.y_string[:-1]], [c.z_bytes], c.z_shape)


def test_bit_cost_close_to_likelihood_estimate(model: CompressionModule) -> None:
    feat = _feat(3, 8, 16, seed=7)
    with torch.no_grad():
        out = model(feat)  # eval mode: rounding likelihoods
    estimate = (-torch.log2(out.q_likelihoods)).flatten(1).sum(1)
    real = torch.tensor([8.0 * len(c.y_string) for c in model.compress(feat)])
    assert (estimate > 2000).all()  # the coding is not trivial
    assert ((real - estimate).abs() <= 0.10 * estimate + 64).all(), (real.tolist(), estimate.tolist())


def test_verification_refuses_undecodable_stream(model: CompressionModule, monkeypatch: pytest.MonkeyPatch) -> None:
    real_decoder = compression_mod.RansDecoder

    class FlakyDecoder:
        """Decodes correctly except for one symbol of slice 4's non-anchors (the 10th part)."""

        def __init__(self) -> None:
            self._dec = real_decoder()
            self._calls = 0

        def set_stream(self, data: bytes) -> None:
            self._dec.set_stream(data)

        def decode_stream(self, *args):
            out = self._dec.decode_stream(*args)
            self._calls += 1
            if self._calls == 10:
                out[0] += 1
            return out

    monkeypatch.setattr(compression_mod, "RansDecoder", FlakyDecoder)
    with pytest.raises(EntropyCodingError, match="slice 4 \\(non-anchor\\): 1 of"):
        model.compress(_feat(2, 8, 16))


def test_update_tables_and_digest() -> None:
    torch.manual_seed(0)
    m = CompressionModule(tiny().compression).eval()
    with pytest.raises(RuntimeError, match="update"):
        m.compress(_feat(1, 8, 8))
    with pytest.raises(RuntimeError, match="update"):
        m.entropy_table_digest()
    assert m.update(force=True) is True
    digest = m.entropy_table_digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert m.update() is False and m.update(force=True) is False
    assert m.entropy_table_digest() == digest
    assert m.gaussian_conditional._quantized_cdf.shape[0] == 64
    assert m.update(scale_table=get_scale_table(0.2, 128, 32), force=True) is True
    assert m.entropy_table_digest() != digest and m.gaussian_conditional._offset.numel() == 32
    other = CompressionModule(tiny().compression)
    other.update(force=True)
    assert other.entropy_table_digest() == digest  # tables depend on the scale table only


def test_float64_copies_follow_weight_changes() -> None:
    m = _make_model(seed=3)
    feat = _feat(1, 8, 8, seed=2)
    old = m.compress(feat)[0]
    nets = m._entropy_nets()
    assert m._entropy_nets() is nets  # cached
    with torch.no_grad():
        m.entropy_parameters_anchor[0].fusion[4].bias[0] += 3.0  # in-place, as an optimizer step
    assert m._entropy_nets() is not nets
    new = m.compress(feat)[0]
    assert new.y_string != old.y_string
    dec = m.decompress_y_hat([new.y_string], [new.z_bytes], new.z_shape, [new.y_hat_crc32])
    assert dec.shape == (1, 64, 4, 4)
    m.float()  # a dtype/device move drops the copies
    assert m._nets64 is None


# ---------------------------------------------------------------------------- determinism
_SUBPROCESS_ENCODER = """
import pickle, sys, torch
torch.set_num_threads(1)
from rdeic_core.compression import CompressionModule
from rdeic_core.config import tiny
state, feat = torch.load(sys.argv[1])
m = CompressionModule(tiny().compression)
m.load_state_dict(state)
m.eval()
comps = m.compress(feat)
with open(sys.argv[2], "wb") as f:
    pickle.dump([(c.y_string, c.z_bytes, c.y_hat_crc32) for c in comps], f)
"""


def test_bytes_identical_across_processes_and_thread_counts(model: CompressionModule, tmp_path: Path) -> None:
    feat = _feat(3, 8, 16, seed=11)
    torch.save((model.state_dict(), feat), tmp_path / "in.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_ENCODER, str(tmp_path / "in.pt"), str(tmp_path / "out.pkl")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out.pkl", "rb") as f:
        theirs = pickle.load(f)

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours = [(c.y_string, c.z_bytes, c.y_hat_crc32) for c in model.compress(feat)]
    finally:
        torch.set_num_threads(prev)
    assert ours == theirs
