"""RDEICCodec: images in, self-describing bytes out, and back.

    bitstreams = codec.encode(images)            # list[bytes], one per image, any size >= 1x1
    images = codec.decode(bitstreams)            # list of uint8 H x W x 3, original sizes
    codec.to("cuda", torch.bfloat16)             # device/dtype are the caller's choice

Encode: pad to a multiple of 64 (zeros, bottom/right, as the reference) ->
x*2-1 -> VAE encoder pre-conv_out feature x 0.18215 -> compression module
(y by rANS, hyper-latent indices bit-packed) -> bitstream v1 (header with the
original size, model fingerprint, default steps / detail scale, noise seed).

Decode: header checks (CRC, model fingerprint) -> compression decompress ->
c_latent, guide_hint -> x_N = q_sample(c_latent, 299) -> S relay steps of
the controlled SD UNet -> VAE decode -> crop to the original size.

The compression module always stays float32 (its entropy-parameter path runs
in float64, see compression.py): only the VAE and the noise estimator follow
``.to(dtype)``, so a bf16 GPU encoder writes streams a float32 CPU decoder
reads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from .bitstream import Bitstream, BitstreamError, Header, check_fingerprint
from .compression import CompressionModule
from .config import CodecConfig, get_config
from .images import pad_batch, padded_size, to_rgb_uint8
from .noise_estimator import NoiseEstimator
from .numerics import install_singleton_safe_group_norms, reproducible
from .sampler import guided_eps, relay_start, relay_step, sample
from .schedule import relay_schedule
from .tiling import Tile, TileConfig, crop, layout, normalised_by_image, proxy_size, run_tiled
from .vae import SDVAE

FORMAT_NAME = "rdeic-codec"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_T = TypeVar("_T")


def _filled(slots: list[_T | None]) -> list[_T]:
    """``slots`` once every one holds its result (each batch of a call writes its own images')."""
    out = [s for s in slots if s is not None]
    if len(out) != len(slots):
        raise RuntimeError(f"internal error: {len(slots) - len(out)} of {len(slots)} images got no result")
    return out


@dataclass
class DecodedLatents:
    """What the compression module gives back for a batch (for parity checks and audits)."""

    c_latent: torch.Tensor
    guide_hint: torch.Tensor
    headers: list[Header]


def _zoo_dir() -> Path:
    return Path(__file__).resolve().parent / "zoo"


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A model directory, or the name of a model shipped in ``rdeic_core/zoo``."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    z = _zoo_dir() / str(name_or_path)
    if z.is_dir():
        return z
    shipped = sorted(d.name for d in _zoo_dir().iterdir() if d.is_dir()) if _zoo_dir().is_dir() else []
    raise FileNotFoundError(
        f"no model directory {str(name_or_path)!r} (and no shipped model of that name; shipped: {shipped})"
    )


class RDEICCodec(nn.Module):
    context: torch.Tensor  # buffer [1, context_len, context_dim]: the empty-prompt text embedding

    def __init__(self, config: CodecConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.vae = SDVAE(config.vae, config.scaling_factor)
        self.compression = CompressionModule(config.compression)
        self.noise_estimator = NoiseEstimator(config)
        self.register_buffer("context", torch.zeros(1, config.context_len, config.context_dim))
        install_singleton_safe_group_norms(self)  # 64-px images reach 1x1 maps with 1-channel groups
        self.compute_dtype = torch.float32
        self.max_batch = 8
        # Tile grid of large images (fixed per model: it shapes the decoded pixels) and the memory
        # bound ``tiling.batch`` (tiles per network pass); see tiling.py.
        self.tiling = TileConfig()
        # Bit-identical bytes whatever the caller's thread count (see numerics.py).
        self.reproducible = True
        self._fingerprint: bytes | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: str | CodecConfig, seed: int = 0) -> RDEICCodec:
        """A codec with random weights (reproducible from ``seed``)."""
        cfg = get_config(config) if isinstance(config, str) else config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            codec = cls(cfg)
            # stand-in for the empty-prompt embedding; real models store the CLIP one
            codec.context.normal_()
        codec.compression.update(force=True)
        return codec.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> RDEICCodec:
        """Load a model directory written by :meth:`save_pretrained` (or a shipped model name)."""
        from safetensors.torch import load_file

        path = resolve_model_path(name_or_path)
        meta_path = path / CONFIG_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_FILE}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{meta_path} is not an {FORMAT_NAME} config (format={meta.get('format')!r})")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format_version {meta['format_version']}; "
                             f"this library reads <= {FORMAT_VERSION}")
        cfg = CodecConfig.from_dict(meta["config"])
        with torch.random.fork_rng(devices=[]):
            codec = cls(cfg)
        state = load_file(str(path / WEIGHTS_FILE))
        codec.load_codec_state(state)
        stored = meta.get("fingerprint")
        if stored and codec.fingerprint.hex() != stored:
            raise ValueError(
                f"{path}: weights do not match the fingerprint in {CONFIG_FILE} "
                f"(stored {stored[:16]}…, computed {codec.fingerprint.hex()[:16]}…); the files are damaged or mixed"
            )
        return codec.eval()

    def load_codec_state(self, state: dict[str, torch.Tensor]) -> None:
        """Strict load; compressai CDF buffers are resized to the stored tables (never recomputed)."""
        own = dict(self.named_buffers())
        for k, v in state.items():
            if k.startswith("compression.gaussian_conditional.") and k in own and own[k].shape != v.shape:
                own[k].resize_(v.shape)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(f"model state does not fit the config: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        self._fingerprint = None

    def save_pretrained(self, path: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (float32, never pickle)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint.hex(),
            "entropy_table_digest": self.compression.entropy_table_digest(),
        }
        if extra_meta:
            meta.update(extra_meta)
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    # ------------------------------------------------------------------ identity
    def _compute_fingerprint(self) -> bytes:
        h = hashlib.sha256()
        h.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(torch.float32)
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.digest()

    @property
    def fingerprint(self) -> bytes:
        """sha256 of config + all float32 weights + entropy tables; 4 bytes go into each bitstream."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def refresh_fingerprint(self) -> bytes:
        """Call after changing weights (training); streams of the old weights will be refused."""
        self._fingerprint = None
        return self.fingerprint

    def to(self, *args: Any, **kwargs: Any) -> RDEICCodec:
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        _ = self.fingerprint  # pin the identity to the float32 weights before any cast
        if device is not None:
            super().to(device=device, non_blocking=non_blocking)
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"compute dtype must be floating point, got {dtype}")
            self.vae.to(dtype=dtype)
            self.noise_estimator.to(dtype=dtype)
            self.context.data = self.context.data.to(dtype)
            self.compute_dtype = dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.context.device

    def _backend(self):
        """Thread-count-invariant numerics unless ``codec.reproducible`` is False (see numerics.py)."""
        return reproducible(self.reproducible)

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, images: Sequence[Any], steps: int | None = None, detail_scale: float | None = None,
               seed: int | None = None) -> list[bytes]:
        """Encode a batch of images (uint8 H x W x 3 arrays or PIL images, any size >= 1x1).

        ``steps``/``detail_scale`` are stored as the decoder's defaults;
        ``seed`` fixes the decoder noise (default: derived from the payload).
        """
        sched = self.config.schedule
        steps = sched.default_steps if steps is None else int(steps)
        detail_scale = sched.default_detail_scale if detail_scale is None else float(detail_scale)
        arrays = [to_rgb_uint8(im) for im in images]
        fp4 = self.fingerprint[:4]
        with self._backend():
            return self._encode_arrays(arrays, steps, detail_scale, seed, fp4)

    def _encode_arrays(self, arrays: list[np.ndarray], steps: int, detail_scale: float, seed: int | None,
                       fp4: bytes) -> list[bytes]:
        out: list[bytes | None] = [None] * len(arrays)

        def emit(i: int, comp: Any) -> None:
            h, w = arrays[i].shape[:2]
            s = seed if seed is not None else zlib.crc32(comp.y_string)
            header = Header(version=1, fingerprint=fp4, height=h, width=w, steps=steps,
                            detail_scale=detail_scale, seed=s & 0xFFFFFFFF,
                            z_shape=tuple(comp.z_indices.shape), y_hat_crc32=comp.y_hat_crc32)
            out[i] = Bitstream(header=header, z_payload=comp.z_bytes, y_payload=comp.y_string).to_bytes()

        m, tc = self.config.pad_multiple, self.tiling
        small = [i for i, a in enumerate(arrays)
                 if tc.runs_whole(*padded_size(a.shape[0], a.shape[1], m), [tc.encode_tile])]
        large = sorted(set(range(len(arrays))) - set(small))
        for idx in self._batches_by_size([(arrays[i].shape[0], arrays[i].shape[1]) for i in small]):
            idx = [small[j] for j in idx]
            feat = self.vae.encode_features(self._to_input(pad_batch([arrays[i] for i in idx], m))).float()
            for i, comp in zip(idx, self.compression.compress(feat)):
                emit(i, comp)
        if large:
            feats = self._encode_features_tiled([arrays[i] for i in large])
            for i, feat in zip(large, feats):
                emit(i, self.compression.compress(feat[None].to(self.device))[0])
        return _filled(out)

    def _encode_features_tiled(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """VAE encoder features of large images, on overlapping tiles blended in feature space.

        Tiles are aligned to 64 pixels (8 feature positions) so each tile's down-sampling phase is
        the whole image's; all tiles of all images share batches of one shape.
        """
        tc = self.tiling
        padded = [pad_batch([a], self.config.pad_multiple)[0] for a in arrays]
        sizes = [(p.shape[0] // 8, p.shape[1] // 8) for p in padded]
        tiles, blends = layout(sizes, tc.encode_tile // 8, tc.encode_overlap // 8)
        forward = self.vae.encode_features
        run = lambda images, x: forward(x)  # noqa: E731
        if tc.share_norm_stats:
            limit = tc.norm_proxy_tiles * tc.encode_tile
            proxies = (torch.nn.functional.interpolate(x, size=proxy_size(x.shape[-2], x.shape[-1], limit, 64),
                                                       mode="area")
                       for x in (self._to_input(p[None]) for p in padded))
            run = normalised_by_image(self.vae.vae.encoder, forward, proxies)

        def fn(chunk: list[Tile]) -> torch.Tensor:
            # H x W x 3 pixels of each tile
            px = np.stack([padded[t.image][t.y * 8:(t.y + t.h) * 8, t.x * 8:(t.x + t.w) * 8] for t in chunk])
            return run([t.image for t in chunk], self._to_input(px))

        return run_tiled(sizes, tiles, blends, fn, self.config.compression.in_nc, tc.batch)

    def _to_input(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 B x H x W x 3 -> the VAE's input: B x 3 x H x W in [-1, 1], compute dtype, on device."""
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2)
        return (x.to(self.compute_dtype) / 255.0) * 2.0 - 1.0

    def _images_per_pass(self, pixels: int, tile_pixels: int) -> int:
        """Whole (untiled) images per network pass: at most max_batch, and no more pixels than
        ``tiling.batch`` tiles."""
        return max(1, min(self.max_batch, self.tiling.batch * tile_pixels // pixels))

    def _batches_by_size(self, sizes: Iterable[tuple[int, int]]) -> list[list[int]]:
        """Indices grouped by padded size (one tensor per group), chunked to max_batch.

        A chunk also holds at most as many pixels as ``tiling.batch`` encoder tiles, so a batch of
        whole images stays within the memory bound that tiled images keep.
        """
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (h, w) in enumerate(sizes):
            groups[padded_size(h, w, self.config.pad_multiple)].append(i)
        out = []
        for (hp, wp), idx in groups.items():
            n = self._images_per_pass(hp * wp, self.tiling.encode_tile ** 2)
            for k in range(0, len(idx), n):
                out.append(idx[k:k + n])
        return out

    # ------------------------------------------------------------------ decode
    def parse(self, data: bytes) -> Bitstream:
        """Validate a bitstream (structure, CRC, model fingerprint); raises BitstreamError."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BitstreamError(f"expected bytes, got {type(data).__name__}")
        bs = Bitstream.from_bytes(bytes(data))
        check_fingerprint(bs.header, self.fingerprint[:4])
        return bs

    @torch.no_grad()
    def decode_latents(self, bitstreams: Sequence[bytes]) -> DecodedLatents:
        """c_latent and guide_hint of same-padded-size bitstreams (no diffusion)."""
        parsed = [self.parse(b) for b in bitstreams]
        shapes = {p.header.z_shape for p in parsed}
        if len(shapes) != 1:
            raise ValueError(f"decode_latents needs one padded size per call, got z grids {sorted(shapes)}")
        c, g = self.compression.decompress([p.y_payload for p in parsed], [p.z_payload for p in parsed],
                                           parsed[0].header.z_shape, [p.header.y_hat_crc32 for p in parsed])
        return DecodedLatents(c_latent=c, guide_hint=g, headers=[p.header for p in parsed])

    def noise_for(self, seed: int, latent_shape: tuple[int, ...],
                  steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decoder noise of one image: CPU generator seeded from the header, so it is device independent."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        start = torch.randn((1, *latent_shape), generator=g, dtype=torch.float32)
        steps_noise = [torch.randn((1, *latent_shape), generator=g, dtype=torch.float32) for _ in range(steps)]
        return start, steps_noise

    def reconstruct_latent(self, c_latent: torch.Tensor, guide_hint: torch.Tensor, steps: int,
                           detail_scale: float, start_noise: torch.Tensor | None = None,
                           step_noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The relay sampler from the noisy compressed latent; returns x̂_0 (float32)."""
        if steps == 0:
            return c_latent.float()
        dt = self.compute_dtype
        b = c_latent.shape[0]
        ctx = self.context.to(dt).expand(b, -1, -1)
        hint = guide_hint.to(dt)
        ne = self.noise_estimator

        def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
            return ne(x.to(dt), t, ctx, hint).float()

        def uncond_fn(x: torch.Tensor, t: int) -> torch.Tensor:
            return ne.forward_unconditional(x.to(dt), t, ctx).float()

        if start_noise is None:
            start_noise = torch.randn_like(c_latent, dtype=torch.float32)
        x_n = relay_start(c_latent.float(), start_noise.to(c_latent.device), self.config.schedule)
        return sample(eps_fn, x_n, steps, self.config.schedule, step_noise, uncond_fn, detail_scale)

    @torch.no_grad()
    def latent_to_images(self, z: torch.Tensor) -> np.ndarray:
        """VAE decode -> uint8 B x H x W x 3 (the reference truncates after clamping, so do we)."""
        x = self.vae.decode(z.to(self.compute_dtype)).float()
        x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        return (x.permute(0, 2, 3, 1) * 255.0).cpu().numpy().astype(np.uint8)

    def fits_untiled(self, z_shape: tuple[int, ...]) -> bool:
        """A stream's latent canvas (z grid x 8) is decoded whole: it fits one sampler and one VAE-decoder
        tile, or it is within ``tiling.whole_max_pixels`` (counted in pixels, latent x 8)."""
        h, w = int(z_shape[0]) * 8, int(z_shape[1]) * 8
        return self.tiling.runs_whole(h * 8, w * 8, [self.tiling.latent_tile * 8, self.tiling.decode_tile * 8])

    @torch.no_grad()
    def decode(self, bitstreams: Sequence[bytes], steps: int | None = None,
               detail_scale: float | None = None) -> list[np.ndarray]:
        """Decode a batch; ``steps``/``detail_scale`` override each header's defaults.

        Streams whose latent fits one tile are decoded whole, batched by size (the reference path);
        larger ones go through the tiled sampler and VAE decoder (tiling.py), sharing tile batches.
        """
        parsed = [self.parse(b) for b in bitstreams]
        out: list[np.ndarray | None] = [None] * len(parsed)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(parsed):
            s = p.header.steps if steps is None else int(steps)
            ds = p.header.detail_scale if detail_scale is None else float(detail_scale)
            tiled = not self.fits_untiled(p.header.z_shape)
            groups[(tiled, None if tiled else p.header.z_shape, s, ds)].append(i)
        with self._backend():
            for (tiled, zshape, s, ds), idx in groups.items():
                if tiled:
                    self._decode_tiled([parsed[i] for i in idx], s, ds, idx, out)
                    continue
                n = self._images_per_pass(zshape[0] * zshape[1] * 64 * 64, (self.tiling.latent_tile * 8) ** 2)
                for k in range(0, len(idx), n):
                    chunk = idx[k:k + n]
                    self._decode_chunk([parsed[i] for i in chunk], s, ds, chunk, out)
        return _filled(out)

    def _decode_chunk(self, items: list[Bitstream], steps: int, detail_scale: float,
                      positions: list[int], out: list) -> None:
        c, g = self.compression.decompress([p.y_payload for p in items], [p.z_payload for p in items],
                                           items[0].header.z_shape, [p.header.y_hat_crc32 for p in items])
        c, g = c.to(self.device), g.to(self.device)
        noises = [self.noise_for(p.header.seed, tuple(c.shape[1:]), steps) for p in items]
        start = torch.cat([n[0] for n in noises]).to(self.device)
        step_noise = [torch.cat([n[1][j] for n in noises]).to(self.device) for j in range(steps)]
        z = self.reconstruct_latent(c, g, steps, detail_scale, start, step_noise)
        imgs = self.latent_to_images(z)
        for p, pos, im in zip(items, positions, imgs):
            out[pos] = np.ascontiguousarray(im[: p.header.height, : p.header.width])

    # ------------------------------------------------------------------ tiled decode
    def _decode_tiled(self, items: list[Bitstream], steps: int, detail_scale: float,
                      positions: list[int], out: list) -> None:
        """Entropy-decode each stream whole, then the tiled relay sampler and tiled VAE decode."""
        lat, hints = [], []
        for p in items:
            c, g = self.compression.decompress([p.y_payload], [p.z_payload], p.header.z_shape, [p.header.y_hat_crc32])
            lat.append(c[0].float().cpu())
            hints.append(g[0].cpu())
        z = self.reconstruct_latents_tiled(lat, hints, steps, detail_scale, [p.header.seed for p in items])
        for p, pos, im in zip(items, positions, self.latents_to_images_tiled(z)):
            out[pos] = np.ascontiguousarray(im[: p.header.height, : p.header.width])

    def reconstruct_latents_tiled(self, c_latents: Sequence[torch.Tensor], guide_hints: Sequence[torch.Tensor],
                                  steps: int, detail_scale: float, seeds: Sequence[int]) -> list[torch.Tensor]:
        """The relay sampler over overlapping latent tiles of several canvases ([C, h, w] each, CPU).

        Noise is drawn per canvas exactly as the untiled path draws it (:meth:`noise_for`); at each
        step the tiles' noise predictions are blended into one epsilon per canvas and the step is
        taken on the whole canvas.
        """
        if steps == 0:
            return [c.float() for c in c_latents]
        tc, dt, ne = self.tiling, self.compute_dtype, self.noise_estimator
        sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in c_latents]
        tiles, blends = layout(sizes, tc.latent_tile, tc.latent_overlap)
        noises = [self.noise_for(s, tuple(c.shape), steps) for s, c in zip(seeds, c_latents)]
        xs = [relay_start(c.float(), n[0][0], self.config.schedule) for c, n in zip(c_latents, noises)]
        sched = relay_schedule(self.config.schedule, steps)
        ctx = self.context.to(dt).expand(tc.batch, -1, -1)

        def crops(canvases: Sequence[torch.Tensor], chunk: list[Tile]) -> torch.Tensor:
            return torch.stack([crop(canvases[t.image], t) for t in chunk]).to(self.device)

        def eps_tiles(t: int, canvases: Sequence[torch.Tensor], chunk: list[Tile]) -> torch.Tensor:
            hint = crops(guide_hints, chunk).to(dt)
            return guided_eps(lambda x, tt: ne(x.to(dt), tt, ctx, hint).float(),
                              lambda x, tt: ne.forward_unconditional(x.to(dt), tt, ctx).float(),
                              crops(canvases, chunk), t, detail_scale)

        for i, k in enumerate(reversed(range(len(sched.timesteps)))):
            fn = functools.partial(eps_tiles, sched.timesteps[k], xs)
            eps = run_tiled(sizes, tiles, blends, fn, self.config.latent_channels, tc.batch)
            xs = [relay_step(x, e, k, sched, n[1][i][0]) for x, e, n in zip(xs, eps, noises)]
        return xs

    @torch.no_grad()
    def latents_to_images_tiled(self, latents: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """VAE decode of [C, h, w] latents on overlapping tiles blended in pixel space -> uint8 H x W x 3."""
        tc = self.tiling
        sizes = [(int(z.shape[-2]), int(z.shape[-1])) for z in latents]
        tiles, blends = layout(sizes, tc.decode_tile, tc.decode_overlap, scale=8)
        forward = lambda z: self.vae.decode(z.to(self.device, self.compute_dtype))  # noqa: E731
        run = lambda images, z: forward(z)  # noqa: E731
        if tc.share_norm_stats:
            limit = tc.norm_proxy_tiles * tc.decode_tile
            proxies = (torch.nn.functional.interpolate(z[None].float(),
                                                       size=proxy_size(z.shape[-2], z.shape[-1], limit, 8), mode="area")
                       for z in latents)
            run = normalised_by_image(self.vae.vae.decoder, forward, proxies)

        def fn(chunk: list[Tile]) -> torch.Tensor:
            return run([t.image for t in chunk], torch.stack([crop(latents[t.image], t) for t in chunk]))

        images = run_tiled(sizes, tiles, blends, fn, 3, tc.batch, scale=8)
        out = []
        for x in images:
            x = ((x + 1.0) / 2.0).clamp_(0.0, 1.0)
            out.append((x.permute(1, 2, 0) * 255.0).numpy().astype(np.uint8))
        return out
