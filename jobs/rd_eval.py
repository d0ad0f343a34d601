"""Rate-distortion evaluation of RDEIC models against JPEG and WebP (the logic of ``rdeic evaluate``).

Kept out of ``rdeic_core`` on purpose: the baselines are Pillow's codecs and the outputs are
tables and plots, none of which the codec library needs.

Definitions (every number of the report follows them):

* **bpp**: ``8 * len(file bytes) / (width * height)`` of the original image. For RDEIC the bytes
  are the whole bitstream (header included); for JPEG/WebP the whole file Pillow writes.
* **PSNR** and **MS-SSIM**: ``pipeline.metrics``, the same functions ``rdeic audit`` uses, so an
  evaluation and an audit of the same images agree. PSNR is ``10 log10(255^2 / MSE)`` over all uint8
  RGB values (float64), capped here at :data:`PSNR_CAP` dB for a lossless result so that means stay
  finite. MS-SSIM is ``pytorch_msssim.ms_ssim`` on float32 RGB in [0, 255] (data_range 255, sigma 1.5,
  the standard 5 scale weights, 11 px window); images with a short side of 160 px or less keep the 5
  scales with a smaller window (``pipeline.metrics.ms_ssim_window``), and below 33 px it is NaN.
* **curves**: each method/setting's bpp, PSNR and MS-SSIM are the *means over the images*.
* **matched by bpp**: a baseline's PSNR (MS-SSIM) at a model point's mean bpp is interpolated
  linearly in log(bpp) on the baseline's mean curve (sorted by bpp), and only inside that curve's
  bpp range; outside it the match is empty (``None``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import metrics

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm")
PSNR_CAP = 100.0
DEFAULT_JPEG_QUALITIES = tuple(range(1, 96))
DEFAULT_WEBP_QUALITIES = tuple(range(0, 101))
DEFAULT_STEPS = (0, 2, 5)


# ---------------------------------------------------------------------------------------- images
def load_images(folder: str | Path) -> list[tuple[str, np.ndarray]]:
    """All images of ``folder`` (not recursive), sorted by name, as RGB uint8 H x W x 3."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {str(folder)!r} is not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    out = []
    for p in files:
        with Image.open(p) as im:
            out.append((p.name, np.asarray(im.convert("RGB"), dtype=np.uint8).copy()))
    return out


# --------------------------------------------------------------------------------------- metrics
def bpp_of(n_bytes: int, image: np.ndarray) -> float:
    return 8.0 * n_bytes / float(image.shape[0] * image.shape[1])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (``pipeline.metrics.psnr``), capped at PSNR_CAP so means stay finite."""
    return min(PSNR_CAP, metrics.psnr(a, b))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM of two uint8 RGB images exactly as ``rdeic audit`` measures it (NaN where it has no value)."""
    value, _ = metrics.ms_ssim(a, b)
    return float("nan") if value is None else value


# -------------------------------------------------------------------------------------- records
@dataclass
class Point:
    """One image coded by one method at one setting."""

    method: str  # "jpeg", "webp" or the model's name
    setting: str  # "q=37" or "S=2"
    image: str
    n_bytes: int
    bpp: float
    psnr: float
    ms_ssim: float
    encode_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class CurvePoint:
    """Mean over the images of one method/setting."""

    method: str
    setting: str
    bpp: float
    psnr: float
    ms_ssim: float
    n_images: int
    encode_s: float = 0.0
    decode_s: float = 0.0
    matched: dict[str, dict[str, float | None]] = field(default_factory=dict)  # baseline -> psnr/ms_ssim at bpp


def measure(method: str, setting: str, name: str, image: np.ndarray, data: bytes, decoded: np.ndarray,
            encode_s: float = 0.0, decode_s: float = 0.0) -> Point:
    if decoded.shape != image.shape:
        raise ValueError(f"{method} {setting} decoded {name} to {decoded.shape}, expected {image.shape}")
    return Point(method, setting, name, len(data), bpp_of(len(data), image), psnr(image, decoded),
                 ms_ssim(image, decoded), encode_s, decode_s)


# ------------------------------------------------------------------------------------ baselines
def pillow_roundtrip(image: np.ndarray, fmt: str, quality: int) -> tuple[bytes, np.ndarray, float, float]:
    """Encode with Pillow's JPEG/WebP encoder at ``quality`` (its defaults otherwise) and decode back."""
    im = Image.fromarray(image)
    buf = io.BytesIO()
    t0 = time.perf_counter()
    im.save(buf, format=fmt, quality=int(quality))
    t1 = time.perf_counter()
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as dec:
        out = np.asarray(dec.convert("RGB"), dtype=np.uint8).copy()
    return data, out, t1 - t0, time.perf_counter() - t1


def baseline_points(images: Sequence[tuple[str, np.ndarray]], fmt: str, qualities: Iterable[int]) -> list[Point]:
    method = fmt.lower()
    pts = []
    for q in qualities:
        for name, img in images:
            data, dec, te, td = pillow_roundtrip(img, fmt, q)
            pts.append(measure(method, f"q={q}", name, img, data, dec, te, td))
    return pts


# ---------------------------------------------------------------------------------------- model
def model_points(codec: Any, model_name: str, images: Sequence[tuple[str, np.ndarray]],
                 steps: Sequence[int]) -> list[Point]:
    """Encode each image once and decode it at every S (S = 0 decodes c_latent without diffusion)."""
    pts = []
    for name, img in images:
        t0 = time.perf_counter()
        data = codec.encode([img])[0]
        enc_s = time.perf_counter() - t0
        for s in steps:
            t1 = time.perf_counter()
            dec = codec.decode([data], steps=int(s))[0]
            pts.append(measure(model_name, f"S={int(s)}", name, img, data, dec, enc_s, time.perf_counter() - t1))
    return pts


# ------------------------------------------------------------------------------- curves, match
def curves(points: Sequence[Point]) -> list[CurvePoint]:
    """Means over images per (method, setting), in first-seen order."""
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.method, p.setting), []).append(p)
    out = []
    for (method, setting), ps in groups.items():
        out.append(CurvePoint(method, setting,
                              float(np.mean([p.bpp for p in ps])), float(np.mean([p.psnr for p in ps])),
                              float(np.nanmean([p.ms_ssim for p in ps])) if any(not math.isnan(p.ms_ssim) for p in ps)
                              else float("nan"),
                              len(ps), float(np.mean([p.encode_s for p in ps])),
                              float(np.mean([p.decode_s for p in ps]))))
    return out


def interpolate_log_bpp(curve_bpp: Sequence[float], curve_val: Sequence[float], bpp: float) -> float | None:
    """Value of a curve at ``bpp``, linear in log(bpp), or None outside the curve's bpp range.

    Points are sorted by bpp; equal-bpp points are averaged so the abscissa is strictly increasing.
    """
    if bpp <= 0 or not curve_bpp:
        return None
    merged: dict[float, list[float]] = {}
    for b, v in zip(curve_bpp, curve_val):
        if b > 0 and not math.isnan(v):
            merged.setdefault(float(b), []).append(float(v))
    if not merged:
        return None
    xs = sorted(merged)
    ys = [float(np.mean(merged[x])) for x in xs]
    if bpp < xs[0] or bpp > xs[-1]:
        return None
    return float(np.interp(math.log(bpp), [math.log(x) for x in xs], ys))


def match(model_curve: Sequence[CurvePoint], baselines: Mapping[str, Sequence[CurvePoint]]) -> None:
    """Fill each model point's ``matched[baseline]`` with the baseline's PSNR/MS-SSIM at its bpp."""
    for mp in model_curve:
        for bname, bc in baselines.items():
            bb = [c.bpp for c in bc]
            mp.matched[bname] = {
                "psnr": interpolate_log_bpp(bb, [c.psnr for c in bc], mp.bpp),
                "ms_ssim": interpolate_log_bpp(bb, [c.ms_ssim for c in bc], mp.bpp),
            }


# -------------------------------------------------------------------------------------- outputs
def _fmt(v: float | None, nd: int) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def markdown_table(model_curve: Sequence[CurvePoint], baselines: Mapping[str, Sequence[CurvePoint]]) -> str:
    """The matched table (one row per model point) and the baselines' reachable bpp ranges."""
    names = list(baselines)
    head = ["model", "S", "bpp", "PSNR", "MS-SSIM"]
    for b in names:
        head += [f"{b} PSNR@bpp", f"{b} MS-SSIM@bpp", f"ΔPSNR vs {b}"]
    head += ["decode s/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mp in model_curve:
        row = [mp.method, mp.setting.split("=")[1], _fmt(mp.bpp, 4), _fmt(mp.psnr, 2), _fmt(mp.ms_ssim, 4)]
        for b in names:
            m = mp.matched.get(b, {})
            at_bpp = m.get("psnr")
            dp = None if at_bpp is None else mp.psnr - at_bpp
            row += [_fmt(at_bpp, 2), _fmt(m.get("ms_ssim"), 4), _fmt(dp, 2)]
        row += [_fmt(mp.decode_s, 2)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| baseline | lowest setting | its bpp | its PSNR | its MS-SSIM | highest bpp |",
              "|---|---|---|---|---|---|"]
    for b in names:
        bc = sorted(baselines[b], key=lambda c: c.bpp)
        if bc:
            lo = bc[0]
            lines.append(f"| {b} | {lo.setting} | {lo.bpp:.4f} | {lo.psnr:.2f} | {_fmt(lo.ms_ssim, 4)} "
                         f"| {bc[-1].bpp:.3f} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Any]) -> None:
    dicts = [{k: v for k, v in asdict(r).items() if k != "matched"} for r in rows]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dicts[0]))
        w.writeheader()
        w.writerows(dicts)


def plot(path: Path, model_curves: Mapping[str, Sequence[CurvePoint]], baselines: Mapping[str, Sequence[CurvePoint]],
         max_bpp: float, title: str) -> None:
    """PSNR-vs-bpp and MS-SSIM-vs-bpp (log bpp axis) of the baselines' curves and the model points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    all_bpp = [c.bpp for cs in model_curves.values() for c in cs]
    lo = min(all_bpp + [min(c.bpp for cs in baselines.values() for c in cs)]) / 1.3
    for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ms_ssim", "MS-SSIM")):
        for b, bc in baselines.items():
            bc = sorted((c for c in bc if c.bpp <= max_bpp), key=lambda c: c.bpp)
            ax.plot([c.bpp for c in bc], [getattr(c, key) for c in bc], "-", lw=1.5, label=f"{b} (Pillow)")
        # One line per sampler setting through every model's point (the rate points of a family make
        # its RD curve), each point labelled with its model.
        points = [c for mc in model_curves.values() for c in mc]
        for s in sorted({c.setting for c in points}, key=lambda x: (len(x), x)):
            pts = sorted((c for c in points if c.setting == s), key=lambda c: c.bpp)
            ax.plot([c.bpp for c in pts], [getattr(c, key) for c in pts], "o--", ms=6, label=f"model {s}")
        for m, mc in model_curves.items():
            top = max(mc, key=lambda c: getattr(c, key))
            ax.annotate(m, (top.bpp, getattr(top, key)), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(lo, max_bpp)
        ax.set_xlabel("bpp")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------- top level
@dataclass
class Report:
    points: list[Point]
    model_curves: dict[str, list[CurvePoint]]
    baseline_curves: dict[str, list[CurvePoint]]
    markdown: str


def evaluate(images: Sequence[tuple[str, np.ndarray]], models: dict[str, Any], steps: Sequence[int] = DEFAULT_STEPS,
             jpeg_qualities: Sequence[int] = DEFAULT_JPEG_QUALITIES,
             webp_qualities: Sequence[int] = DEFAULT_WEBP_QUALITIES,
             progress: Callable[[str], None] | None = None) -> Report:
    """Measure every model (name -> codec) and both baselines on ``images``; match them by bpp."""
    say = progress or (lambda _m: None)
    points: list[Point] = []
    model_curves: dict[str, list[CurvePoint]] = {}
    for name, codec in models.items():
        say(f"{name}: {len(images)} images at S = {list(steps)}")
        mp = model_points(codec, name, images, steps)
        points += mp
        model_curves[name] = curves(mp)
    baselines: dict[str, list[CurvePoint]] = {}
    for fmt, qs in (("JPEG", jpeg_qualities), ("WEBP", webp_qualities)):
        if not qs:
            continue
        say(f"{fmt.lower()}: {len(images)} images x {len(qs)} qualities")
        bp = baseline_points(images, fmt, qs)
        points += bp
        baselines[fmt.lower()] = curves(bp)
    for mc in model_curves.values():
        match(mc, baselines)
    md = markdown_table([c for mc in model_curves.values() for c in mc], baselines)
    return Report(points, model_curves, baselines, md)


def save_report(report: Report, out_dir: Path, max_bpp: float, title: str) -> dict[str, Path]:
    """rd.md, rd.csv (curves), rd_per_image.csv, rd.json and rd.png under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f for k, f in (("md", "rd.md"), ("csv", "rd.csv"), ("per_image", "rd_per_image.csv"),
                                          ("json", "rd.json"), ("png", "rd.png"))}
    paths["md"].write_text(report.markdown)
    all_curves = [c for mc in report.model_curves.values() for c in mc] + \
                 [c for bc in report.baseline_curves.values() for c in bc]
    write_csv(paths["csv"], all_curves)
    write_csv(paths["per_image"], report.points)
    paths["json"].write_text(json.dumps({
        "models": {m: [asdict(c) for c in mc] for m, mc in report.model_curves.items()},
        "baselines": {b: [asdict(c) for c in bc] for b, bc in report.baseline_curves.items()},
        "per_image": [asdict(p) for p in report.points],
    }, indent=1, allow_nan=True))
    plot(paths["png"], report.model_curves, report.baseline_curves, max_bpp, title)
    return paths
