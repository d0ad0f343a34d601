"""What bounds a model's quality: its autoencoder's own round trip, beside the whole codec and JPEG/WebP.

    python -m bench.ceiling                                   # mini on the validation photos
    python -m bench.ceiling --model mini-lo --model mini --model mini-hi --images data/photos/val768
    python -m bench.ceiling --model fold=runs/holdout/train/mini/stage2/model --images runs/holdout/test768
    python -m bench.ceiling ... --json outputs/ceiling/val.json --markdown outputs/ceiling/val.md

Per photo and on average, for each model:

* **VAE**: the autoencoder alone (encode -> posterior mean -> decode, no compression): the ceiling
  every later stage sits under.
* **S=0** and **S=<default>**: the whole codec (one bitstream per photo) decoded without diffusion
  and with the model's default number of relay steps.
* **colour error**: max over R, G, B of |mean(original) - mean(decoded)| in 8-bit levels: a colour
  cast shows here long before it moves the PSNR.
* **WebP <=** : Pillow's WebP at the highest quality whose file is no larger than the bitstream (the
  codec's competitor at equal or fewer bytes; empty when even quality 0 is larger).
* **JPEG >=** : Pillow's JPEG at the lowest quality whose file is no smaller than the bitstream (JPEG
  at equal or more bytes; at these rates usually quality 1, well above the bitstream's size).

PSNR over uint8 RGB (``pipeline.metrics.psnr``, as ``rdeic audit`` and ``rdeic evaluate``); bpp counts
the whole file (the bitstream's header included). Images run whole, as the codec runs anything up to
``TileConfig.whole_max_pixels`` (the validation photos are 768x512).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO / "data" / "photos" / "val768"


@dataclass
class Row:
    """One photo through one model, and the two baselines at the bitstream's size."""

    model: str
    image: str
    width: int
    height: int
    vae_psnr: float
    vae_colour: float
    n_bytes: int
    bpp: float
    s0_psnr: float
    s0_colour: float
    steps: int
    sd_psnr: float
    sd_colour: float
    webp_bpp: float | None
    webp_psnr: float | None
    jpeg_bpp: float
    jpeg_psnr: float
    jpeg_quality: int
    encode_s: float
    decode_s: float


def colour_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-channel difference of the mean colour, in 8-bit levels."""
    ma = a.reshape(-1, 3).astype(np.float64).mean(axis=0)
    mb = b.reshape(-1, 3).astype(np.float64).mean(axis=0)
    return float(np.abs(ma - mb).max())


@torch.no_grad()
def vae_round_trip(codec, image: np.ndarray) -> np.ndarray:
    """encode -> posterior mean -> decode, padded as the codec pads, cropped back."""
    from rdeic_core.images import pad_batch

    h, w = image.shape[:2]
    x = codec._to_input(pad_batch([image], codec.config.pad_multiple))
    z = codec.vae.vae.encode(x).latent_dist.mode() * codec.vae.scaling_factor
    return codec.latent_to_images(z)[0][:h, :w]


def at_budget(image: np.ndarray, fmt: str, qualities: range, n_bytes: int, larger: bool):
    """(bytes, decoded, quality) of the best quality that stays <= n_bytes (``larger`` False), or the
    lowest quality that reaches >= n_bytes (``larger`` True; the last quality if none does)."""
    from jobs.rd_eval import pillow_roundtrip

    best = None
    for q in qualities:
        data, dec, _, _ = pillow_roundtrip(image, fmt, q)
        if larger:
            if len(data) >= n_bytes or q == qualities[-1]:
                return data, dec, q
        elif len(data) <= n_bytes:
            best = (data, dec, q)
        else:
            break  # file sizes grow with quality
    return best


def measure(name: str, codec, image_name: str, image: np.ndarray, steps: int | None) -> Row:
    from pipeline.metrics import psnr

    vae = vae_round_trip(codec, image)
    t0 = time.perf_counter()
    data = codec.encode([image])[0]
    t1 = time.perf_counter()
    s0 = codec.decode([data], steps=0)[0]
    s = codec.config.schedule.default_steps if steps is None else steps
    t2 = time.perf_counter()
    sd = codec.decode([data], steps=s)[0]
    t3 = time.perf_counter()
    h, w = image.shape[:2]
    webp = at_budget(image, "WEBP", range(0, 101), len(data), larger=False)
    jpeg = at_budget(image, "JPEG", range(1, 96), len(data), larger=True)
    assert jpeg is not None
    return Row(
        model=name, image=image_name, width=w, height=h,
        vae_psnr=psnr(image, vae), vae_colour=colour_error(image, vae),
        n_bytes=len(data), bpp=8 * len(data) / (h * w),
        s0_psnr=psnr(image, s0), s0_colour=colour_error(image, s0),
        steps=s, sd_psnr=psnr(image, sd), sd_colour=colour_error(image, sd),
        webp_bpp=None if webp is None else 8 * len(webp[0]) / (h * w),
        webp_psnr=None if webp is None else psnr(image, webp[1]),
        jpeg_bpp=8 * len(jpeg[0]) / (h * w), jpeg_psnr=psnr(image, jpeg[1]), jpeg_quality=jpeg[2],
        encode_s=t1 - t0, decode_s=t3 - t2,
    )


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def summary(rows: list[Row]) -> dict[str, float | int | None]:
    """Means over photos, and how often the codec (default S) is above JPEG and within 2.5 dB of WebP."""
    mean = statistics.fmean
    webp = [r for r in rows if r.webp_psnr is not None]
    return {
        "photos": len(rows),
        "vae_psnr": mean(r.vae_psnr for r in rows), "vae_colour": mean(r.vae_colour for r in rows),
        "vae_colour_max": max(r.vae_colour for r in rows),
        "bpp": mean(r.bpp for r in rows),
        "s0_psnr": mean(r.s0_psnr for r in rows), "s0_colour": mean(r.s0_colour for r in rows),
        "sd_psnr": mean(r.sd_psnr for r in rows), "sd_colour": mean(r.sd_colour for r in rows),
        "codec_colour_max": max(max(r.s0_colour, r.sd_colour) for r in rows),
        "webp_photos": len(webp),
        "webp_psnr": mean(r.webp_psnr for r in webp) if webp else None,  # type: ignore[misc]
        "vs_webp": mean(r.sd_psnr - r.webp_psnr for r in webp) if webp else None,  # type: ignore[operator]
        "jpeg_bpp": mean(r.jpeg_bpp for r in rows), "jpeg_psnr": mean(r.jpeg_psnr for r in rows),
        "vs_jpeg": mean(r.sd_psnr - r.jpeg_psnr for r in rows),
        "above_jpeg": sum(r.sd_psnr > r.jpeg_psnr for r in rows),
    }


HEADER = ("| model | photo | VAE PSNR | VAE colour | bpp | S=0 PSNR | S=0 colour | S | PSNR | colour "
          "| WebP ≤ bytes: bpp / PSNR | JPEG ≥ bytes: bpp / PSNR (q) |")


def markdown(rows: list[Row]) -> str:
    lines = [HEADER, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r.model} | {Path(r.image).stem} | {r.vae_psnr:.2f} | {r.vae_colour:.1f} | {r.bpp:.4f} "
                     f"| {r.s0_psnr:.2f} | {r.s0_colour:.1f} | {r.steps} | {r.sd_psnr:.2f} | {r.sd_colour:.1f} "
                     f"| {_f(r.webp_bpp, '.4f')} / {_f(r.webp_psnr)} "
                     f"| {r.jpeg_bpp:.4f} / {r.jpeg_psnr:.2f} (q={r.jpeg_quality}) |")
    for model in dict.fromkeys(r.model for r in rows):
        s = summary([r for r in rows if r.model == model])
        lines.append(f"| **{model}** | **mean of {s['photos']}** | **{s['vae_psnr']:.2f}** | {s['vae_colour']:.1f} "
                     f"(max {s['vae_colour_max']:.1f}) | {s['bpp']:.4f} | {s['s0_psnr']:.2f} | {s['s0_colour']:.1f} "
                     f"| | **{s['sd_psnr']:.2f}** | {s['sd_colour']:.1f} (max {s['codec_colour_max']:.1f}) "
                     f"| {_f(s['webp_psnr'])} ({_f(s['vs_webp'], '+.2f')} dB, {s['webp_photos']} photos) "
                     f"| {s['jpeg_bpp']:.4f} / {s['jpeg_psnr']:.2f} ({s['vs_jpeg']:+.2f} dB, above on "
                     f"{s['above_jpeg']} of {s['photos']}) |")
    return "\n".join(lines) + "\n"


def _model_arg(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    return (label, path) if sep else (text, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", type=_model_arg, metavar="[LABEL=]NAME|DIR",
                    help="a shipped model name or a model directory (repeat; default: mini)")
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of photos (default: data/photos/val768)")
    ap.add_argument("--steps", type=int, default=None, help="relay steps of the second decode (default: the model's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", default=None, help="also write the rows and means here")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from jobs.rd_eval import load_images
    from rdeic_core import RDEICCodec

    images = load_images(a.images)
    rows: list[Row] = []
    for label, path in a.model or [("mini", "mini")]:
        codec = RDEICCodec.from_pretrained(path)
        for name, img in images:
            row = measure(label, codec, name, img, a.steps)
            rows.append(row)
            print(f"{label} {name}: VAE {row.vae_psnr:.2f} dB (colour {row.vae_colour:.1f}), {row.bpp:.4f} bpp, "
                  f"S=0 {row.s0_psnr:.2f}, S={row.steps} {row.sd_psnr:.2f} (colour {row.sd_colour:.1f}), "
                  f"WebP<= {_f(row.webp_psnr)}, JPEG>= {row.jpeg_psnr:.2f}", file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    if a.markdown:
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(a.markdown).write_text(table)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        models = list(dict.fromkeys(r.model for r in rows))
        Path(a.json).write_text(json.dumps({
            "images": str(a.images), "rows": [asdict(r) for r in rows],
            "means": {m: summary([r for r in rows if r.model == m]) for m in models},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
