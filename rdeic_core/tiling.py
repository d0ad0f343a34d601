"""Overlapping tiles: how the codec runs images of any size in bounded memory and linear time.

Why: the VAE mid-blocks and the UNet/control transformer blocks attend globally at 1/8 resolution,
so an untiled pass costs O(pixels^2) time and O(pixels) activations of full-resolution width (a
13 MP photo took 208 s and 7.9 GB to encode with ``mini`` and did not decode in 15 minutes). Every
network that sees pixels or latents is therefore run on overlapping tiles of one shape, and the
tile outputs are blended back with smooth weights:

* **encode**: the VAE encoder feature, tiles of ``encode_tile`` pixels (aligned to 64 so a tile's
  feature grid and its down-sampling phase are the whole image's), blended in feature space. The
  compression module is convolutional and runs on the whole stitched feature.
* **decode**: at every relay step the noise prediction of each latent tile (with its guide_hint
  crop) is blended into one canvas-wide epsilon; the noise itself is drawn on the whole canvas from
  the header seed, so tiling never changes a random number. The VAE decoder runs on latent tiles
  whose pixels are blended and written out in raster order.

The grid is a pure function of the canvas size and the :class:`TileConfig` (which stays fixed for
a model, so a stream decodes to the same bytes everywhere). Tiles of one shape from one image and
from several images share batches of ``batch`` tiles; the last batch is padded with repeats to the
same static shape, so a tile's result never depends on how many tiles happened to be left over.
A canvas that fits in one tile, or has at most ``whole_max_pixels`` pixels, never comes here: the
codec takes its untiled path, bit for bit. Up to about 1.5 MP a whole pass is both exact and
cheaper than overlapping tiles (measured with ``mini`` on a 1024² crop: decode 11.8 s whole against
25.5 s tiled, the overlap and the GroupNorm proxy pass cost more than attention saves); at 2.4 MP
the tiles win (31.6 s against 43.4 s) and the whole pass's memory passes 3 GB.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the three tiled passes, and the memory bound.

    Sizes are in the unit of the tensor that is tiled: ``encode_*`` in image pixels, ``latent_*``
    and ``decode_*`` in latent positions (x 8 pixels). ``batch`` is the memory bound: tiles per
    network pass (it does not change which pixels are computed, only how many at once).
    """

    encode_tile: int = 512
    encode_overlap: int = 64
    latent_tile: int = 64
    latent_overlap: int = 16
    decode_tile: int = 64
    decode_overlap: int = 8
    batch: int = 4
    share_norm_stats: bool = True  # VAE GroupNorms use whole-image statistics (SharedGroupNorms)
    norm_proxy_tiles: int = 2  # the statistics' proxy fits this many tiles per side (exact up to that size)
    # canvases (padded image, = latent x 8) of at most this many pixels run every pass whole: exact, and
    # cheaper than tiles up to about this size on a CPU; 0 tiles everything larger than one tile
    whole_max_pixels: int = 1536 * 1024

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TileConfig:
        checks = (
            ("encode", self.encode_tile, self.encode_overlap, 64),
            ("latent", self.latent_tile, self.latent_overlap, 8),
            ("decode", self.decode_tile, self.decode_overlap, 8),
        )
        for name, tile, overlap, align in checks:
            if tile < align or tile % align:
                raise ValueError(f"{name}_tile must be a positive multiple of {align}, got {tile}")
            if overlap < 0 or overlap % align or overlap >= tile:
                raise ValueError(f"{name}_overlap must be a multiple of {align} in [0, {name}_tile), got {overlap}")
        if self.batch < 1:
            raise ValueError(f"tile batch must be >= 1, got {self.batch}")
        if self.norm_proxy_tiles < 1:
            raise ValueError(f"norm_proxy_tiles must be >= 1, got {self.norm_proxy_tiles}")
        if self.whole_max_pixels < 0:
            raise ValueError(f"whole_max_pixels must be >= 0, got {self.whole_max_pixels}")
        return self

    def runs_whole(self, height: int, width: int, tiles: Iterable[int]) -> bool:
        """Whether a ``height`` x ``width``-pixel canvas takes the untiled path.

        It does when it fits one tile of every pass in ``tiles`` (pixel sizes), or when it has at
        most ``whole_max_pixels`` pixels.
        """
        return height * width <= self.whole_max_pixels or all(fits_one_tile(height, width, t) for t in tiles)

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)


# ---------------------------------------------------------------------------- the grid
def tile_starts(length: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of tiles of size ``min(tile, length)`` covering ``[0, length)``.

    The fewest tiles whose neighbours overlap by at least ``overlap``, spread evenly, starts
    rounded down to ``align``; the last tile ends exactly at ``length``. ``length``, ``tile`` and
    ``overlap`` must be multiples of ``align`` (the codec's canvases and configs are).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = 1 + math.ceil((length - tile) / stride)
    last = length - tile
    starts = [(k * last // (n - 1)) // align * align for k in range(n)]
    starts[-1] = last
    return starts


@dataclass(frozen=True)
class Tile:
    """One tile of one image: ``image`` index, top-left ``(y, x)``, size ``(h, w)``."""

    image: int
    y: int
    x: int
    h: int
    w: int


def grid(height: int, width: int, tile: int, overlap: int, align: int, image: int = 0) -> list[Tile]:
    """Row-major tiles of one canvas (every tile has the same shape)."""
    ys = tile_starts(height, tile, overlap, align)
    xs = tile_starts(width, tile, overlap, align)
    th, tw = min(tile, height), min(tile, width)
    return [Tile(image, y, x, th, tw) for y in ys for x in xs]


def fits_one_tile(height: int, width: int, tile: int) -> bool:
    return height <= tile and width <= tile


# ---------------------------------------------------------------------------- blending weights
def _ramp_1d(starts: list[int], size: int, length: int) -> list[np.ndarray]:
    """Per-tile 1-D weights: raised-cosine ramps across each overlap with a neighbour, 1 elsewhere.

    A tile edge at the canvas border keeps full weight (nothing to blend with); an inner edge
    fades over the whole overlap with the neighbour, where the tile sees least context.
    """
    out = []
    for k, s in enumerate(starts):
        w = np.ones(size, dtype=np.float64)
        if k > 0:
            ov = starts[k - 1] + size - s
            if ov > 0:
                r = (np.arange(ov) + 0.5) / ov
                w[:ov] = np.minimum(w[:ov], np.sin(r * np.pi / 2) ** 2)
        if k + 1 < len(starts):
            ov = s + size - starts[k + 1]
            if ov > 0:
                r = (np.arange(ov) + 0.5) / ov
                w[size - ov:] = np.minimum(w[size - ov:], np.cos(r * np.pi / 2) ** 2)
        out.append(w)
    total = np.zeros(length, dtype=np.float64)
    for s, w in zip(starts, out):
        total[s:s + size] += w
    return [w / total[s:s + size] for s, w in zip(starts, out)]


class Blend:
    """Normalised blending weights of one canvas's grid (partition of unity, separable).

    The grid is a product of a row and a column grid, so the sum of the tiles' weights is a product
    of two 1-D sums and each tile's normalised weight is ``wy[i] (outer) wx[j]``: no canvas-sized
    weight map is stored.
    """

    def __init__(self, height: int, width: int, tile: int, overlap: int, align: int, scale: int = 1) -> None:
        ys = tile_starts(height, tile, overlap, align)
        xs = tile_starts(width, tile, overlap, align)
        th, tw = min(tile, height), min(tile, width)
        wy = _ramp_1d([s * scale for s in ys], th * scale, height * scale)
        wx = _ramp_1d([s * scale for s in xs], tw * scale, width * scale)
        self._wy = {s: torch.from_numpy(w.astype(np.float32)) for s, w in zip(ys, wy)}
        self._wx = {s: torch.from_numpy(w.astype(np.float32)) for s, w in zip(xs, wx)}

    def weight(self, tile: Tile) -> torch.Tensor:
        """[h*scale, w*scale] float32 weight of ``tile`` (output units)."""
        return self._wy[tile.y][:, None] * self._wx[tile.x][None, :]


def layout(sizes: Sequence[tuple[int, int]], tile: int, overlap: int, scale: int = 1,
           align: int = 8) -> tuple[list[Tile], list[Blend]]:
    """The tiles of several canvases (``image`` = index in ``sizes``) and each canvas's blend weights."""
    tiles = [t for i, (h, w) in enumerate(sizes) for t in grid(h, w, tile, overlap, align, image=i)]
    return tiles, [Blend(h, w, tile, overlap, align, scale=scale) for h, w in sizes]


# ---------------------------------------------------------------------------- batching
def batches(tiles: Sequence[Tile], size: int) -> Iterator[tuple[list[Tile], int]]:
    """Tiles grouped by shape, in order, ``size`` per batch; the last of a shape padded with repeats.

    Yields ``(tiles, n_real)``: the batch always has ``size`` entries (one static shape, so every
    pass runs the same kernels and a tile's result does not depend on the batch's fill), of which
    the first ``n_real`` are new. Padding repeats the batch's last tile (never a zero tile, whose
    statistics would be degenerate).
    """
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        by_shape.setdefault((t.h, t.w), []).append(t)
    for group in by_shape.values():
        for k in range(0, len(group), size):
            chunk = group[k:k + size]
            n = len(chunk)
            yield chunk + [chunk[-1]] * (size - n), n


def crop(t: torch.Tensor, tile: Tile, scale: int = 1) -> torch.Tensor:
    """``t[..., tile]`` of a [C, H, W] canvas (tile coordinates times ``scale``)."""
    return t[..., tile.y * scale:(tile.y + tile.h) * scale, tile.x * scale:(tile.x + tile.w) * scale]


def run_tiled(
    sizes: Sequence[tuple[int, int]],
    tiles: Sequence[Tile],
    blends: Sequence[Blend],
    fn: Callable[[list[Tile]], torch.Tensor],
    out_channels: int,
    batch: int,
    scale: int = 1,
) -> list[torch.Tensor]:
    """Run ``fn`` over tile batches and blend its outputs into one float32 canvas per image.

    ``fn(tiles)`` returns [len(tiles), out_channels, h*scale, w*scale]; ``sizes`` are the canvases'
    (H, W) in tile units (the output is H*scale x W*scale).
    """
    outs = [torch.zeros(out_channels, h * scale, w * scale, dtype=torch.float32) for h, w in sizes]
    for chunk, n in batches(tiles, batch):
        pred = fn(chunk).float().cpu()
        for tile, p in zip(chunk[:n], pred[:n]):
            region = crop(outs[tile.image], tile, scale)
            region += p * blends[tile.image].weight(tile)
    return outs


# ---------------------------------------------------------------------------- shared GroupNorm statistics
class SharedGroupNorms:
    """Make the GroupNorms of a network normalise every tile with its whole image's statistics.

    Per-tile statistics are what gives tiled VAEs their tile-to-tile tone changes. Exact whole-image
    statistics would need the whole image's activations (the memory tiling exists to avoid), so,
    as the "fast" mode of the common Tiled-VAE implementation does, they are estimated from a
    proxy: the whole canvas resampled to fit ``norm_proxy_tiles`` x ``norm_proxy_tiles`` tiles
    (the canvas itself when it fits, so the statistics are exact up to that size), passed once in
    ``record`` mode (one pass per image). Tiles are then passed in ``apply`` mode, each GroupNorm
    using the recorded mean and variance of the tile's image. Outside these modes the network is
    untouched.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self._stats: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._mode: str | None = None
        self._rows: list[int] = []

    def _forward(self, m: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, g = x.shape[0], m.num_groups
        if self._mode == "record":
            var, mean = torch.var_mean(x.reshape(b, g, -1).float(), dim=-1, unbiased=False)
            self._stats.setdefault(id(m), []).extend(zip(mean, var))
            return type(m).forward(m, x)
        recorded = self._stats[id(m)]
        mean = torch.stack([recorded[r][0] for r in self._rows])
        var = torch.stack([recorded[r][1] for r in self._rows])
        # y = x * a + c per (sample, channel): one elementwise pass that keeps the activation's
        # memory format (a reshape would copy oneDNN's channels-last outputs twice per norm)
        per_ch = x.shape[1] // g
        a = torch.rsqrt(var + m.eps).repeat_interleave(per_ch, dim=1)
        c = -mean.repeat_interleave(per_ch, dim=1) * a
        if m.affine:
            a, c = a * m.weight.float(), c * m.weight.float() + m.bias.float()
        shape = (b, -1) + (1,) * (x.dim() - 2)
        out = torch.empty_like(x)  # same strides as x (channels-last stays channels-last)
        return torch.addcmul(c.to(x.dtype).view(shape), x, a.to(x.dtype).view(shape), out=out)

    def _install(self) -> None:
        for m in self.norms:
            # an instance attribute shadows the class's forward until _remove pops it (deliberate)
            m.forward = functools.partial(self._forward, m)  # type: ignore[method-assign]

    def _remove(self) -> None:
        for m in self.norms:
            m.__dict__.pop("forward", None)

    def record(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (one forward of a batch of proxies, one per image, in image order)."""
        self._mode = "record"
        self._install()
        try:
            fn()
        finally:
            self._remove()
            self._mode = None

    def apply(self, images: Sequence[int], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``fn`` (a forward of tiles of ``images``) with the recorded statistics."""
        self._mode, self._rows = "apply", list(images)
        self._install()
        try:
            return fn()
        finally:
            self._remove()
            self._mode = None


def normalised_by_image(module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                        proxies: Iterable[torch.Tensor]) -> Callable[[Sequence[int], torch.Tensor], torch.Tensor]:
    """``forward`` whose GroupNorms in ``module`` use each image's statistics, recorded on its proxy.

    ``proxies`` (one per image, in image order; a generator keeps one in memory at a time) are
    passed once each in record mode; the returned ``run(images, x)`` passes a batch of tiles of
    ``images`` in apply mode.
    """
    norms = SharedGroupNorms(module)
    for proxy in proxies:
        norms.record(functools.partial(forward, proxy))
    return lambda images, x: norms.apply(images, lambda: forward(x))


def proxy_size(height: int, width: int, limit: int, multiple: int) -> tuple[int, int]:
    """The largest size of the canvas's aspect that fits ``limit`` x ``limit``, in ``multiple`` steps."""
    s = min(1.0, limit / max(height, width))
    return (max(multiple, int(round(height * s / multiple)) * multiple),
            max(multiple, int(round(width * s / multiple)) * multiple))
