"""RDEIC compression module: VAE feature -> (y by rANS, VQ hyper-latent indices) -> c_latent, guide_hint.

Architecture and training forward are the reference's (spec section 2): an
ELIC-style entropy model with 10 channel slices, each coded in two
checkerboard passes, and a CVQ-quantised hyper-latent whose indices are
bit-packed at ceil(log2 K) bits (the reference codes them under a uniform CDF,
which costs the same).

Determinism by design (spec section 9). rANS decoding only works if the decoder
picks, for every symbol, the same CDF table and the same mean as the encoder.
Those come from networks (hyper decoder, channel/spatial context, entropy
parameters), and float32 convolutions differ by an ULP between thread counts,
batch sizes, CPUs and GPUs; one flipped table index desynchronises the stream
and the rest decodes to garbage (CompressAI #279/#309). So this "entropy-
parameter path" (1) runs in float64 on cached float64 copies of those
submodules, (2) is fed only exact values (codebook rows, and y_hat, which is
integer + 2**-16 grid), and (3) has its outputs snapped: means to the 2**-16
grid (int64 fixed point), scales to a table index (compressai's rule, in
float64). Two machines then disagree only if a float64 result lies within
~1e-16 relative of a grid or table boundary. Encoder and decoder share one
function (``_code_latents``); the encoder decodes its own stream before
returning it and raises :class:`EntropyCodingError` on any mismatch, and each
stream carries a CRC32 of y_hat that :meth:`decompress` can check, so a
mismatch is reported rather than decoded to garbage.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import GaussianConditional
from compressai.models import CompressionModel
from compressai.ops import quantize_ste
from torch import nn

from .config import CompressionConfig
from .entropy import (
    MEAN_SCALE,
    EntropyCodingError,
    check_symbols,
    ckbd_anchor,
    ckbd_nonanchor,
    fixed_to_float,
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
    y_hat_checksum,
)
from .layers import (
    ChannelContextEX,
    EntropyParametersEX,
    ResidualBlock,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    conv3x3,
)
from .vq import VectorQuantiser

__all__ = ["CompressionModule", "CompressionOutput", "Compressed", "EntropyCodingError"]

# Zero words appended to a y string before decoding: a corrupt stream makes the rANS decoder read
# past its end (it has no bounds checks); a valid one never does, so this changes no valid decode.
_DECODER_TAIL_PAD = bytes(64)


# ---------------------------------------------------------------------------- results
@dataclass
class CompressionOutput:
    """Training forward of the compression module (reference ``Compression.forward``)."""

    c_latent: torch.Tensor  # [B, out_nc, H/8, W/8] compressed SD latent
    guide_hint: torch.Tensor  # [B, M, H/8, W/8]
    y_likelihoods: torch.Tensor  # additive-noise likelihoods (rate loss) in training mode
    q_likelihoods: torch.Tensor  # rounding likelihoods (logged only)
    vq_loss: torch.Tensor  # CVQ loss (zero in eval mode)
    y: torch.Tensor  # [B, M, H/16, W/16] analysis output
    y_hat: torch.Tensor  # STE-quantised y
    z_indices: torch.Tensor  # [B, H/64, W/64] codebook indices


@dataclass(frozen=True, eq=False)
class Compressed:
    """One image's compressed representation."""

    y_string: bytes  # rANS stream of all y symbols (slice by slice, anchors then non-anchors)
    z_indices: np.ndarray  # int64 [H/64, W/64] codebook indices
    z_bytes: bytes  # z_indices bit-packed at ceil(log2 K) bits each, row-major, MSB first
    y_hat_crc32: int  # CRC32 of y_hat in int64 fixed point; lets a decoder detect a desync

    @property
    def z_shape(self) -> tuple[int, int]:
        return int(self.z_indices.shape[0]), int(self.z_indices.shape[1])


# ---------------------------------------------------------------------------- sub-networks
class _Encoder(nn.Module):
    def __init__(self, in_nc: int, M: int) -> None:
        super().__init__()
        self.g_a = nn.Sequential(
            ResidualBlock(in_nc, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
            ResidualBlockWithStride(M, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
            conv3x3(M, M),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_a(x)


class _Decoder(nn.Module):
    def __init__(self, M: int) -> None:
        super().__init__()
        self.g_s = nn.Sequential(
            conv3x3(M, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
            ResidualBlockUpsample(M, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
            ResidualBlock(M, M),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_s(x)


class _HyperEncoder(nn.Module):
    def __init__(self, N: int, M: int) -> None:
        super().__init__()
        self.hyper_enc = nn.Sequential(
            ResidualBlock(M, N),
            ResidualBlock(N, N),
            ResidualBlockWithStride(N, N),
            ResidualBlockWithStride(N, N),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hyper_enc(x)


class _HyperDecoder(nn.Module):
    def __init__(self, N: int, M: int) -> None:
        super().__init__()
        self.hyper_dec = nn.Sequential(
            ResidualBlockUpsample(N, M),
            ResidualBlockUpsample(M, M),
            ResidualBlock(M, M * 3 // 2),
            ResidualBlock(M * 3 // 2, M * 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hyper_dec(x)


# ---------------------------------------------------------------------------- entropy-coding plumbing
_ENTROPY_PATH = (
    "hyper_dec",
    "local_context",
    "channel_context",
    "entropy_parameters_anchor",
    "entropy_parameters_nonanchor",
)


@dataclass
class _Nets64:
    """float64 copies of the entropy-parameter path, plus what they were copied from."""

    device: torch.device
    modules: dict[str, nn.Module]
    # (source tensor, alias keeping its storage alive, version at copy time) per source tensor
    sources: list[tuple[torch.Tensor, torch.Tensor, int]]

    def module_list(self, name: str) -> nn.ModuleList:
        m = self.modules[name]
        if not isinstance(m, nn.ModuleList):
            raise TypeError(f"{name} is a {type(m).__name__}, not a ModuleList")
        return m

    def is_current(self, tensors: list[torch.Tensor], device: torch.device) -> bool:
        if device != self.device or len(tensors) != len(self.sources):
            return False
        return all(
            t is src and _version_of(t) == ver and t.data_ptr() == alias.data_ptr()
            for t, (src, alias, ver) in zip(tensors, self.sources)
        )


def _version_of(t: torch.Tensor) -> int:
    """Autograd version counter (bumped by every in-place op); -1 for inference tensors, which have none.

    Inference tensors (weights created under ``torch.inference_mode``) can only
    be modified inside inference mode, which training never is.
    """
    try:
        return int(t._version)
    except RuntimeError:
        return -1


@dataclass
class _CdfTables:
    """compressai GaussianConditional tables as the rANS coder wants them (Python lists)."""

    cdf: list[list[int]]
    cdf_lengths: list[int]
    offsets: list[int]
    scale_table: torch.Tensor
    scale_bound: float

    def args(self) -> tuple[list[list[int]], list[int], list[int]]:
        return self.cdf, self.cdf_lengths, self.offsets


class _SymbolCoder(Protocol):
    def code(self, slice_idx: int, anchor: bool, indexes: torch.Tensor, means_fixed: torch.Tensor) -> torch.Tensor:
        """Symbols [B, C, H, W/2] (int64) of one slice part, given its table indexes and snapped means."""
        ...


class _RansSymbolEncoder:
    """Quantises y against the snapped means and feeds one BufferedRansEncoder per image."""

    def __init__(self, y64: torch.Tensor, slice_bounds: list[tuple[int, int]], tables: _CdfTables) -> None:
        self._y = y64
        self._bounds = slice_bounds
        self._tables = tables
        self._encoders = [BufferedRansEncoder() for _ in range(y64.size(0))]
        self.symbols: list[torch.Tensor] = []

    def code(self, slice_idx: int, anchor: bool, indexes: torch.Tensor, means_fixed: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds[slice_idx]
        y_slice = self._y[:, lo:hi]
        target = squeeze_anchor(y_slice) if anchor else squeeze_nonanchor(y_slice)
        symbols = torch.round(target - fixed_to_float(means_fixed)).to(torch.int64)
        check_symbols(symbols)
        sym_np = symbols.cpu().numpy()
        idx_np = indexes.cpu().numpy()
        for b, enc in enumerate(self._encoders):
            enc.encode_with_indexes(sym_np[b].ravel().tolist(), idx_np[b].ravel().tolist(), *self._tables.args())
        self.symbols.append(symbols)
        return symbols

    def flush(self) -> list[bytes]:
        return [enc.flush() for enc in self._encoders]


class _RansSymbolDecoder:
    """Decodes the symbols of each slice part from one rANS stream per image."""

    def __init__(self, y_strings: Sequence[bytes], tables: _CdfTables) -> None:
        self._tables = tables
        self._decoders = []
        for b, s in enumerate(y_strings):
            if not isinstance(s, (bytes, bytearray, memoryview)):
                raise TypeError(f"y string {b} must be bytes, got {type(s).__name__}")
            if len(s) < 8 or len(s) % 4:
                raise EntropyCodingError(f"y string {b} has {len(s)} bytes; a rANS stream is >= 8 and a multiple of 4")
            dec = RansDecoder()
            dec.set_stream(bytes(s) + _DECODER_TAIL_PAD)
            self._decoders.append(dec)
        self.symbols: list[torch.Tensor] = []

    def code(self, slice_idx: int, anchor: bool, indexes: torch.Tensor, means_fixed: torch.Tensor) -> torch.Tensor:
        idx_np = indexes.cpu().numpy()
        out = np.empty(idx_np.shape, dtype=np.int64)
        for b, dec in enumerate(self._decoders):
            values = dec.decode_stream(idx_np[b].ravel().tolist(), *self._tables.args())
            out[b] = np.asarray(values, dtype=np.int64).reshape(idx_np.shape[1:])
        symbols = torch.from_numpy(out).to(indexes.device)
        self.symbols.append(symbols)
        return symbols


@contextlib.contextmanager
def _deterministic_backend(device: torch.device) -> Iterator[None]:
    """cuDNN: deterministic algorithms, no autotuning (the choice could differ between runs)."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    prev = (cudnn.deterministic, cudnn.benchmark)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = prev


# ---------------------------------------------------------------------------- the module
class CompressionModule(CompressionModel):
    """The reference ``Compression`` (state-dict compatible), with a deterministic real bitstream."""

    def __init__(self, cfg: CompressionConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.slice_ch = tuple(int(c) for c in cfg.slice_ch)
        self.slice_num = len(self.slice_ch)
        self.codebook_size = int(cfg.codebook_size)
        self.index_bits = index_bits(self.codebook_size)
        M, N, ch = cfg.M, cfg.N, self.slice_ch
        starts = np.cumsum((0,) + self.slice_ch)
        self._slice_bounds = [(int(starts[i]), int(starts[i + 1])) for i in range(self.slice_num)]
        self._nets64: _Nets64 | None = None

        self.encoder = _Encoder(cfg.in_nc, M)
        self.hyper_enc = _HyperEncoder(N, M)
        self.hyper_dec = _HyperDecoder(N, M)
        self.decoder = _Decoder(M)
        self.out = nn.Conv2d(M, cfg.out_nc, 3, 1, 1)
        self.local_context = nn.ModuleList(
            nn.Conv2d(c, 2 * c, kernel_size=5, stride=1, padding=2) for c in ch
        )
        # index 0 holds None, as in the reference (slice 0 has no channel context). torch accepts None
        # entries (ModuleList.extend -> add_module(name, None)), its annotation (Iterable[Module]) does not.
        self.channel_context = nn.ModuleList(
            ChannelContextEX(sum(ch[:i]), 2 * ch[i], cfg.cc_hidden) if i else None  # type: ignore[misc]
            for i in range(self.slice_num)
        )
        self.entropy_parameters_anchor = nn.ModuleList(
            EntropyParametersEX(2 * M + (2 * ch[i] if i else 0), 2 * ch[i]) for i in range(self.slice_num)
        )
        self.entropy_parameters_nonanchor = nn.ModuleList(
            EntropyParametersEX(2 * M + (4 * ch[i] if i else 2 * ch[i]), 2 * ch[i]) for i in range(self.slice_num)
        )
        self.quantize = VectorQuantiser(self.codebook_size, N, contras_loss=True)
        self.gaussian_conditional = GaussianConditional(None)

    # ------------------------------------------------------------------ training forward
    def _split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return [y[:, lo:hi] for lo, hi in self._slice_bounds]

    def forward(self, feat: torch.Tensor) -> CompressionOutput:
        """Training path, numerically the reference's: STE y_hat around the predicted means."""
        self._check_feat(feat)
        y = self.encoder(feat)
        z = self.hyper_enc(y)
        z_q, vq_loss, z_indices = self.quantize(z)
        hyper = self.hyper_dec(z_q)

        y_hat_slices: list[torch.Tensor] = []
        y_lik: list[torch.Tensor] = []
        q_lik: list[torch.Tensor] = []
        for i, y_slice in enumerate(self._split(y)):
            ctx = self.channel_context[i](torch.cat(y_hat_slices, dim=1)) if i else None
            anchor_in = hyper if ctx is None else torch.cat([ctx, hyper], dim=1)
            scales_a, means_a = self.entropy_parameters_anchor[i](anchor_in).chunk(2, 1)
            scales_a, means_a = ckbd_anchor(scales_a), ckbd_anchor(means_a)
            y_hat_a = quantize_ste(ckbd_anchor(y_slice) - means_a) + means_a

            local = self.local_context[i](y_hat_a)
            nonanchor_in = [local, hyper] if ctx is None else [local, ctx, hyper]
            scales_n, means_n = self.entropy_parameters_nonanchor[i](torch.cat(nonanchor_in, dim=1)).chunk(2, 1)
            scales_n, means_n = ckbd_nonanchor(scales_n), ckbd_nonanchor(means_n)

            scales, means = scales_a + scales_n, means_a + means_n
            _, lik = self.gaussian_conditional(y_slice, scales, means)
            _, qlik = self.gaussian_conditional(y_slice, scales, means, False)
            y_hat_n = quantize_ste(ckbd_nonanchor(y_slice) - means_n) + means_n
            y_hat_slices.append(y_hat_a + y_hat_n)
            y_lik.append(lik)
            q_lik.append(qlik)

        y_hat = torch.cat(y_hat_slices, dim=1)
        c_latent, guide_hint = self.synthesize(y_hat)
        return CompressionOutput(
            c_latent=c_latent,
            guide_hint=guide_hint,
            y_likelihoods=torch.cat(y_lik, dim=1),
            q_likelihoods=torch.cat(q_lik, dim=1),
            vq_loss=vq_loss,
            y=y,
            y_hat=y_hat,
            z_indices=z_indices,
        )

    def synthesize(self, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y_hat -> (c_latent, guide_hint): the synthesis transform g_s and the output conv."""
        guide_hint = self.decoder(y_hat)
        return self.out(guide_hint), guide_hint

    # ------------------------------------------------------------------ entropy tables
    def update(self, scale_table: torch.Tensor | None = None, force: bool = False) -> bool:
        """Build the Gaussian CDF tables; returns True if the tables changed.

        Without ``force`` existing tables are kept. The tables are always
        computed on the CPU (compressai's float32 pmf, then its integer CDF
        quantiser) so a GPU and a CPU model build the same ones.
        """
        gc = self.gaussian_conditional
        if gc._offset.numel() > 0 and not force:
            return False
        table = get_scale_table() if scale_table is None else torch.as_tensor(scale_table, dtype=torch.float32)
        before = self._table_digest() if gc._offset.numel() > 0 else None
        tmp = GaussianConditional(None, tail_mass=gc.tail_mass, entropy_coder_precision=gc.entropy_coder_precision)
        tmp.update_scale_table(table.detach().cpu(), force=True)
        device = gc._offset.device
        gc.scale_table = tmp.scale_table.to(device)
        gc._quantized_cdf = tmp._quantized_cdf.to(device)
        gc._offset = tmp._offset.to(device)
        gc._cdf_length = tmp._cdf_length.to(device)
        return before != self._table_digest()

    def _table_digest(self) -> str:
        gc = self.gaussian_conditional
        h = hashlib.sha256()
        for name, t, dtype in (
            ("scale_table", gc.scale_table, "<f4"),
            ("quantized_cdf", gc._quantized_cdf, "<i4"),
            ("cdf_length", gc._cdf_length, "<i4"),
            ("offset", gc._offset, "<i4"),
        ):
            arr = t.detach().cpu().contiguous().numpy().astype(dtype)
            h.update(name.encode())
            h.update(np.asarray(arr.shape, dtype="<i8").tobytes())
            h.update(arr.tobytes())
        return h.hexdigest()

    def entropy_table_digest(self) -> str:
        """sha256 (hex) of the scale table, quantized CDFs, CDF lengths and offsets: what a decoder must share."""
        self._check_tables()
        return self._table_digest()

    def _check_tables(self) -> None:
        gc = self.gaussian_conditional
        n = gc._quantized_cdf.size(0) if gc._quantized_cdf.dim() == 2 else 0
        if n == 0 or gc._offset.numel() != n or gc._cdf_length.numel() != n or gc.scale_table.numel() != n:
            raise RuntimeError(
                "entropy tables are missing or inconsistent "
                f"(cdf {tuple(gc._quantized_cdf.shape)}, offsets {gc._offset.numel()}, "
                f"lengths {gc._cdf_length.numel()}, scales {gc.scale_table.numel()}); call update(force=True)"
            )

    def _cdf_tables(self) -> _CdfTables:
        self._check_tables()
        gc = self.gaussian_conditional
        return _CdfTables(
            cdf=gc._quantized_cdf.cpu().tolist(),
            cdf_lengths=gc._cdf_length.reshape(-1).int().cpu().tolist(),
            offsets=gc._offset.reshape(-1).int().cpu().tolist(),
            scale_table=gc.scale_table.detach(),
            scale_bound=float(gc.lower_bound_scale.bound),
        )

    # ------------------------------------------------------------------ float64 entropy-parameter path
    def _apply(self, fn: Any, recurse: bool = True) -> CompressionModule:
        self._nets64 = None  # device/dtype moves invalidate the float64 copies
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> Any:
        self._nets64 = None
        return super().load_state_dict(state_dict, strict=strict)

    def __getstate__(self) -> dict[str, Any]:
        # the float64 copies are a cache: never pickle or deep-copy them
        state = super().__getstate__()
        state["_nets64"] = None
        return state

    def _entropy_device(self) -> torch.device:
        device = self.out.weight.device
        # MPS has no float64: run the entropy-parameter path on the CPU there.
        return torch.device("cpu") if device.type == "mps" else device

    def _entropy_sources(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for name in _ENTROPY_PATH:
            m = getattr(self, name)
            out.extend(m.parameters())
            out.extend(m.buffers())
        return out

    def _entropy_nets(self) -> _Nets64:
        """float64 copies of the entropy-parameter path, rebuilt whenever a source tensor changed.

        Staleness is detected per tensor (same object, same storage, same
        autograd version), which catches optimizer steps, ``load_state_dict``
        and ``.data`` swaps without hooks.
        """
        device = self._entropy_device()
        sources = self._entropy_sources()
        if self._nets64 is not None and self._nets64.is_current(sources, device):
            return self._nets64
        modules = {}
        for name in _ENTROPY_PATH:
            m = copy.deepcopy(getattr(self, name)).to(device=device, dtype=torch.float64)
            m.requires_grad_(False)
            modules[name] = m.eval()
        self._nets64 = _Nets64(
            device=device,
            modules=modules,
            sources=[(t, t.detach(), _version_of(t)) for t in sources],
        )
        return self._nets64

    def _hyper_params64(self, nets: _Nets64, z_indices: torch.Tensor) -> torch.Tensor:
        z_q = self.quantize.lookup(z_indices).to(device=nets.device, dtype=torch.float64)  # exact
        return nets.modules["hyper_dec"](z_q)

    def _snap(self, params: torch.Tensor, tables: _CdfTables) -> tuple[torch.Tensor, torch.Tensor]:
        scales, means = params.chunk(2, 1)
        return scale_indexes(scales, tables.scale_table, tables.scale_bound), snap_means(means)

    def _code_latents(self, nets: _Nets64, hyper: torch.Tensor, coder: _SymbolCoder,
                      tables: _CdfTables) -> torch.Tensor:
        """The one slice/checkerboard loop shared by encoder and decoder -> y_hat, int64 fixed point.

        Order (fixed by the bitstream): slice by slice; per slice all anchors,
        then all non-anchors, each in squeezed row-major order.
        """
        channel_context, local_context = nets.module_list("channel_context"), nets.module_list("local_context")
        params_a = nets.module_list("entropy_parameters_anchor")
        params_n = nets.module_list("entropy_parameters_nonanchor")
        prev: list[torch.Tensor] = []  # y_hat slices so far, exact float64
        fixed_slices: list[torch.Tensor] = []
        for i in range(self.slice_num):
            ctx = channel_context[i](torch.cat(prev, dim=1)) if i else None
            anchor_in = hyper if ctx is None else torch.cat([ctx, hyper], dim=1)
            # the entropy-parameter nets are 1x1 convs: run them on the squeezed half only
            idx_a, mu_a = self._snap(params_a[i](squeeze_anchor(anchor_in)), tables)
            y_a = coder.code(i, True, idx_a, mu_a) * MEAN_SCALE + mu_a

            local = local_context[i](unsqueeze_anchor(fixed_to_float(y_a)))
            nonanchor_in = torch.cat([local, hyper] if ctx is None else [local, ctx, hyper], dim=1)
            idx_n, mu_n = self._snap(params_n[i](squeeze_nonanchor(nonanchor_in)), tables)
            y_n = coder.code(i, False, idx_n, mu_n) * MEAN_SCALE + mu_n

            fixed = merge_squeezed(y_a, y_n)
            fixed_slices.append(fixed)
            prev.append(fixed_to_float(fixed))
        return torch.cat(fixed_slices, dim=1)

    def _decode_fixed(self, y_strings: Sequence[bytes],
                      z_indices: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder: z indices + y strings -> y_hat (int64 fixed point) and the decoded symbols."""
        tables = self._cdf_tables()
        nets = self._entropy_nets()
        coder = _RansSymbolDecoder(y_strings, tables)
        with _deterministic_backend(nets.device):
            hyper = self._hyper_params64(nets, z_indices)
            fixed = self._code_latents(nets, hyper, coder, tables)
        return fixed, coder.symbols

    # ------------------------------------------------------------------ compress / decompress
    @torch.no_grad()
    def compress_with_y_hat(self, feat: torch.Tensor, verify: bool = True) -> tuple[list[Compressed], torch.Tensor]:
        """Like :meth:`compress`, also returning the encoder's y_hat [B, M, H/16, W/16] (float32)."""
        self._check_feat(feat, for_coding=True)
        tables = self._cdf_tables()
        y = self.encoder(feat)
        _, z_indices = self.quantize.quant(self.hyper_enc(y))
        nets = self._entropy_nets()
        coder = _RansSymbolEncoder(y.to(device=nets.device, dtype=torch.float64), self._slice_bounds, tables)
        with _deterministic_backend(nets.device):
            hyper = self._hyper_params64(nets, z_indices)
            fixed = self._code_latents(nets, hyper, coder, tables)
        y_strings = coder.flush()

        if verify:
            self._verify(y_strings, z_indices, fixed, coder.symbols)

        z_np = z_indices.cpu().numpy().astype(np.int64)
        items = [
            Compressed(
                y_string=y_strings[b],
                z_indices=z_np[b],
                z_bytes=pack_indices(z_np[b], self.index_bits),
                y_hat_crc32=y_hat_checksum(fixed[b]),
            )
            for b in range(feat.size(0))
        ]
        return items, fixed_to_float(fixed).to(device=self.out.weight.device, dtype=self.out.weight.dtype)

    @torch.no_grad()
    def compress(self, feat: torch.Tensor, verify: bool = True) -> list[Compressed]:
        """Encode VAE features [B, in_nc, H/8, W/8] (H, W multiples of 64) -> one :class:`Compressed` per image.

        With ``verify`` (default) every stream is decoded again through the
        decoder's code path before it is returned; a mismatch raises
        :class:`EntropyCodingError` instead of emitting an undecodable stream.
        """
        return self.compress_with_y_hat(feat, verify=verify)[0]

    def _verify(self, y_strings: list[bytes], z_indices: torch.Tensor, fixed: torch.Tensor,
                enc_symbols: list[torch.Tensor]) -> None:
        dec_fixed, dec_symbols = self._decode_fixed(y_strings, z_indices)
        for b in range(fixed.size(0)):
            for part, (e, d) in enumerate(zip(enc_symbols, dec_symbols)):
                if not torch.equal(e[b], d[b]):
                    n_bad = int((e[b] != d[b]).sum())
                    raise EntropyCodingError(
                        f"image {b}: rANS round trip failed in slice {part // 2} "
                        f"({'anchor' if part % 2 == 0 else 'non-anchor'}): {n_bad} of {e[b].numel()} symbols differ; "
                        "the stream would not decode, so it is not emitted"
                    )
            if not torch.equal(fixed[b], dec_fixed[b]):
                raise EntropyCodingError(
                    f"image {b}: decoder-side y_hat differs from the encoder's although the symbols match "
                    "(non-deterministic entropy-parameter path)"
                )

    @torch.no_grad()
    def decompress_y_hat(self, y_strings: Sequence[bytes], z_bytes: Sequence[bytes], z_shape: tuple[int, int],
                         y_hat_crc32: Sequence[int] | None = None) -> torch.Tensor:
        """Decode y_hat [B, M, 4h, 4w] (float32, exact) of a batch sharing ``z_shape`` = (h, w).

        With ``y_hat_crc32`` (the encoder's :attr:`Compressed.y_hat_crc32`) a
        decode that does not reproduce the encoder's y_hat raises
        :class:`EntropyCodingError`.
        """
        z_indices = self._unpack_z(y_strings, z_bytes, z_shape)
        fixed, _ = self._decode_fixed(y_strings, z_indices)
        if y_hat_crc32 is not None:
            if len(y_hat_crc32) != fixed.size(0):
                raise ValueError(f"got {len(y_hat_crc32)} checksums for {fixed.size(0)} streams")
            for b, expected in enumerate(y_hat_crc32):
                got = y_hat_checksum(fixed[b])
                if got != int(expected):
                    raise EntropyCodingError(
                        f"image {b}: decoded y_hat checksum {got:#010x} != encoder's {int(expected):#010x}; "
                        "the stream is corrupt or was encoded with other weights/entropy tables"
                    )
        return fixed_to_float(fixed).to(device=self.out.weight.device, dtype=self.out.weight.dtype)

    @torch.no_grad()
    def decompress(self, y_strings: Sequence[bytes], z_bytes: Sequence[bytes], z_shape: tuple[int, int],
                   y_hat_crc32: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a batch (all sharing ``z_shape`` = (H/64, W/64)) -> (c_latent, guide_hint)."""
        return self.synthesize(self.decompress_y_hat(y_strings, z_bytes, z_shape, y_hat_crc32))

    def _unpack_z(self, y_strings: Sequence[bytes], z_bytes: Sequence[bytes], z_shape: tuple[int, int]) -> torch.Tensor:
        if len(y_strings) != len(z_bytes) or len(y_strings) == 0:
            raise ValueError(f"need as many y strings as z payloads (>= 1), got {len(y_strings)} and {len(z_bytes)}")
        if len(z_shape) != 2 or any(int(s) != s or int(s) < 1 for s in z_shape):
            raise ValueError(f"z_shape must be two positive ints, got {tuple(z_shape)}")
        h, w = int(z_shape[0]), int(z_shape[1])
        rows = []
        for b, data in enumerate(z_bytes):
            try:
                rows.append(unpack_indices(data, h * w, self.index_bits, num_symbols=self.codebook_size))
            except ValueError as e:
                raise ValueError(f"z payload {b} (z_shape {h}x{w}): {e}") from None
        return torch.from_numpy(np.stack(rows).reshape(len(rows), h, w))

    # ------------------------------------------------------------------ checks
    def _check_feat(self, feat: torch.Tensor, for_coding: bool = False) -> None:
        if feat.dim() != 4 or feat.size(1) != self.cfg.in_nc:
            raise ValueError(f"expected features [B, {self.cfg.in_nc}, H/8, W/8], got {tuple(feat.shape)}")
        # y (H/16) must split into a checkerboard and z (H/64) must upsample back to y: H/8 % 8 == 0
        if feat.size(2) % 8 or feat.size(3) % 8 or feat.size(0) < 1:
            raise ValueError(
                f"feature size {tuple(feat.shape[2:])} must be a multiple of 8 (image a multiple of 64 px), batch >= 1"
            )
        if for_coding and not bool(torch.isfinite(feat).all()):
            raise ValueError("features contain NaN or inf")
