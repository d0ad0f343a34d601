"""The `make demo` report: RDEIC next to Pillow's JPEG and WebP at the nearest rate, as one HTML page.

``demo.run`` runs the jobs (archive, restore, audit); this module turns their outputs into
``report.html`` with its images beside it (``img/*.png``, ``rate_quality.png``), so the page can
be opened from disk, copied, or served by ``python -m http.server`` without anything inlined.

Why "nearest rate" and not "equal rate": at RDEIC's rates (a few hundredths of a bit per pixel)
JPEG usually cannot get that small even at quality 1, and WebP only sometimes. The baselines are
coded at the Pillow quality whose *file size* is nearest the RDEIC bitstream's, and every caption
shows each method's own bytes and bpp, so a baseline that is 2x larger says so instead of being
presented as a like-for-like comparison.

Every metric comes from ``jobs.rd_eval`` (``psnr``, ``ms_ssim``, ``bpp_of``), the functions
``rdeic evaluate`` and ``rdeic audit`` use, so the numbers of this page, of the audit report
and of docs/mini.md are measured the same way.
"""

from __future__ import annotations

import html
import io
import math
import shutil
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.rd_eval import Point, bpp_of, curves, ms_ssim, pillow_roundtrip, psnr
from pipeline.audit import worst_window

JPEG_QUALITIES = tuple(range(1, 96))  # Pillow's useful JPEG range (above 95 it disables its own quantisation)
WEBP_QUALITIES = tuple(range(101))
# The baselines' rate-quality curves on the plot: a sparse grid is enough for a curve and keeps
# the report step to seconds per photo (the nearest-rate point of each photo is searched exactly).
JPEG_CURVE = (1, 2, 3, 5, 8, 12, 20, 30, 50, 75, 90)
WEBP_CURVE = (0, 2, 5, 10, 20, 35, 50, 75, 90)
SPLIT_LABELS = {"validation": "validation: never trained on", "train": "training photo"}
CROP = 256
PREVIEW_LONG_SIDE = 480
PNG_LEVEL = 3  # full-resolution PNGs: lossless either way; level 3 is several times faster than 6


# ------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Coded:
    """One photo as one method coded it: what its caption says and the files that show it.

    ``png``/``preview``/``crop`` are file names under ``img/``; ``file`` is the coded file itself
    (JPEG/WebP) where there is one, so a reader can check the byte count the bpp comes from.
    """

    method: str  # "original", "RDEIC", "JPEG", "WebP"
    setting: str  # "S=2", "q=1", "" for the original
    n_bytes: int
    bpp: float
    psnr: float | None
    ms_ssim: float | None
    png: str
    preview: str
    crop: str
    file: str | None = None
    note: str = ""


@dataclass
class PhotoResult:
    """Everything the report shows for one archived photo (``failure`` set when it has no restoration)."""

    name: str
    key: str
    split: str  # "validation" | "train" | "" (not in split.json)
    width: int
    height: int
    methods: list[Coded] = field(default_factory=list)
    window: tuple[int, int, int, int] = (0, 0, 0, 0)  # x, y, w, h of the 1:1 crops
    failure: str | None = None
    notes: list[str] = field(default_factory=list)

    def method(self, name: str) -> Coded | None:
        return next((m for m in self.methods if m.method == name), None)


@dataclass(frozen=True)
class JobStats:
    """One job of the demo as its summary reports it: the archive statistics table is made of these."""

    name: str
    seconds: float
    images: int
    ok: int
    failed: int
    per_s: float
    failures: tuple[str, ...] = ()
    output: str = ""


@dataclass
class DemoReport:
    """The whole page: model, jobs, photos, notes. Strings in it are data (escaped on rendering)."""

    title: str
    model: dict[str, str]  # label -> value (name, fingerprint, steps, ...)
    jobs: list[JobStats]
    archive: dict[str, str]  # label -> value (images, bitstream bytes, mean bpp, ...)
    photos: list[PhotoResult]
    plot: str | None = None  # file name beside report.html
    notes: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  # label -> relative URL (the copied outputs)


# ------------------------------------------------------------------------------------ baselines
def encoded_size(image: np.ndarray, fmt: str, quality: int) -> int:
    """Bytes of the file Pillow writes for ``image`` at ``quality`` (same call as ``pillow_roundtrip``)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, quality=int(quality))
    return buf.tell()


def nearest_quality(image: np.ndarray, fmt: str, target_bytes: int, qualities: Sequence[int]) -> int:
    """The quality in ``qualities`` whose file size is nearest ``target_bytes`` (ties: the lower quality).

    File size grows with quality almost monotonically, so a bisection finds where it crosses the
    target and the few qualities around the crossing are compared exactly: about 10 encodes instead
    of 100 (WebP at 1 MP costs ~0.1 s an encode). Below the lowest quality's size this returns the
    lowest quality: the caller reports its real (higher) rate.
    """
    qs = sorted(int(q) for q in qualities)
    if not qs:
        raise ValueError("no qualities to choose from")
    sizes: dict[int, int] = {}

    def size(q: int) -> int:
        if q not in sizes:
            sizes[q] = encoded_size(image, fmt, q)
        return sizes[q]

    lo, hi = 0, len(qs) - 1
    while lo < hi:  # first index whose size >= target (or the last one)
        mid = (lo + hi) // 2
        if size(qs[mid]) >= target_bytes:
            hi = mid
        else:
            lo = mid + 1
    around = qs[max(0, lo - 3):lo + 4]
    return min(around, key=lambda q: (abs(size(q) - target_bytes), q))


def rate_curve(name: str, image: np.ndarray, fmt: str, qualities: Sequence[int]) -> list[Point]:
    """PSNR-vs-bpp points of one photo at each quality (MS-SSIM left NaN: ~2 s each at 1 MP on CPU)."""
    points = []
    for q in qualities:
        data, decoded, enc_s, dec_s = pillow_roundtrip(image, fmt, q)
        points.append(Point(fmt.lower(), f"q={q}", name, len(data), bpp_of(len(data), image),
                            psnr(image, decoded), float("nan"), enc_s, dec_s))
    return points


# ------------------------------------------------------------------------------------ images
def save_png(image: np.ndarray, path: Path, level: int = PNG_LEVEL) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=level)


def preview(image: np.ndarray, long_side: int = PREVIEW_LONG_SIDE) -> np.ndarray:
    """Downscaled (area filter) for the side-by-side row; the full-resolution PNG is one click away."""
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def slug(name: str) -> str:
    """A file-name-safe, unique-enough stem for a photo's images (the name itself stays in the text)."""
    stem = Path(name).stem
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "photo"


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def build_photo(name: str, key: str, split: str, original: np.ndarray, restored: np.ndarray | None,
                rdeic: dict[str, float | int | None] | None, img_dir: Path, *, setting: str,
                restored_png: Path | None = None, failure: str | None = None,
                crop: int = CROP) -> tuple[PhotoResult, list[Point]]:
    """Measure one photo's baselines at RDEIC's rate and write all its images under ``img_dir``.

    ``rdeic``: the audit job's numbers for the key (``bitstream_bytes``, ``bpp``, ``psnr``,
    ``ms_ssim``); the restored pixels are the restore job's PNG (``restored_png`` is copied as it
    is). Returns the photo and its JPEG/WebP curve points for the plot. The 1:1 crop window is the
    ``crop``-px square where RDEIC's squared error is largest: where a reader should look.
    """
    h, w = original.shape[:2]
    result = PhotoResult(name, key, split, w, h, failure=failure)
    base = slug(name)
    files: dict[str, np.ndarray] = {"original": original}
    if restored is not None:
        if restored.shape != original.shape:
            result.failure = f"restored image is {restored.shape}, the original {original.shape}"
            restored = None
        else:
            files["RDEIC"] = restored
    if restored is None:
        result.window = (0, 0, min(crop, w), min(crop, h))
    else:
        result.window = worst_window(original, restored, crop)

    original_png = img_dir / f"{base}-original.png"
    save_png(original, original_png)
    entries: list[tuple[str, str, int, float, float | None, float | None, str | None, str]] = [
        ("original", "", original_png.stat().st_size, bpp_of(original_png.stat().st_size, original), None, None,
         None, "demo copy, lossless PNG"),
    ]
    points: list[Point] = []
    if restored is not None and rdeic is not None:
        n_bytes = int(rdeic["bitstream_bytes"] or 0)
        measured = psnr(original, restored)
        audit_psnr = _finite(rdeic.get("psnr"))
        if audit_psnr is None:  # the audit has no measurement of this key: measure the restored image
            rd_psnr, rd_ssim = measured, _finite(ms_ssim(original, restored))
            note = "restored by the restore job; measured by the demo (no audit row)"
        else:
            rd_psnr, rd_ssim = audit_psnr, _finite(rdeic.get("ms_ssim"))
            note = "restored by the restore job; PSNR/MS-SSIM by the audit job"
            if abs(audit_psnr - measured) > 0.05:
                result.notes.append(f"the restore job's image measures {measured:.2f} dB PSNR, the audit job's "
                                    f"decode {audit_psnr:.2f} dB")
        entries.append(("RDEIC", setting, n_bytes, bpp_of(n_bytes, original), rd_psnr, rd_ssim, None, note))
        for fmt, label, qualities, grid in (("JPEG", "JPEG", JPEG_QUALITIES, JPEG_CURVE),
                                            ("WEBP", "WebP", WEBP_QUALITIES, WEBP_CURVE)):
            q = nearest_quality(original, fmt, n_bytes, qualities)
            data, decoded, _, _ = pillow_roundtrip(original, fmt, q)
            ext = "jpg" if fmt == "JPEG" else "webp"
            coded = img_dir / f"{base}-{label.lower()}.{ext}"
            coded.write_bytes(data)
            files[label] = decoded
            ratio = len(data) / max(n_bytes, 1)
            if q == min(qualities) and ratio > 1.1:
                note = f"its lowest quality: {ratio:.1f}x the RDEIC bytes, it cannot go lower"
            else:
                note = f"nearest size to RDEIC's ({ratio:.2f}x its bytes)"
            entries.append((label, f"q={q}", len(data), bpp_of(len(data), original), psnr(original, decoded),
                            _finite(ms_ssim(original, decoded)), coded.name, note))
            points += rate_curve(name, original, fmt, grid)

    x, y, cw, ch = result.window
    for method, setting_, n_bytes, bpp, p, m, coded_file, note in entries:
        tag = method.lower()
        image = files[method]
        png = img_dir / f"{base}-{tag}.png"
        if method == "RDEIC" and restored_png is not None:
            shutil.copyfile(restored_png, png)  # the restore job's own file, byte for byte
        elif method != "original":
            save_png(image, png)
        save_png(preview(image), img_dir / f"{base}-{tag}-preview.png", 6)
        save_png(np.ascontiguousarray(image[y:y + ch, x:x + cw]), img_dir / f"{base}-{tag}-crop.png", 6)
        result.methods.append(Coded(method, setting_, n_bytes, bpp, p, m, png.name, f"{base}-{tag}-preview.png",
                                    f"{base}-{tag}-crop.png", coded_file, note))
    return result, points


# ------------------------------------------------------------------------------------ the plot
def plot_rate_quality(path: Path, photos: Sequence[PhotoResult], curve_points: Sequence[Point], title: str) -> None:
    """PSNR and MS-SSIM vs bpp (log x): RDEIC per photo, JPEG/WebP at the nearest rate per photo, and
    the baselines' mean curves over the photos (PSNR only: their MS-SSIM is measured at the chosen
    points, not along the curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"RDEIC": "#c0392b", "JPEG": "#2471a3", "WebP": "#1e8449"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for curve in (curves([p for p in curve_points if p.method == m]) for m in ("jpeg", "webp")):
        if not curve:
            continue
        label = {"jpeg": "JPEG", "webp": "WebP"}[curve[0].method]
        pts = sorted(curve, key=lambda c: c.bpp)
        axes[0].plot([c.bpp for c in pts], [c.psnr for c in pts], "-", color=colours[label], lw=1.3, alpha=0.6,
                     label=f"{label} mean curve (Pillow q grid)")
    for ax, metric in ((axes[0], "psnr"), (axes[1], "ms_ssim")):
        for method, marker in (("RDEIC", "o"), ("JPEG", "s"), ("WebP", "^")):
            for split, filled in (("validation", True), ("train", False)):
                xs, ys = [], []
                for photo in photos:
                    coded = photo.method(method)
                    value = None if coded is None else getattr(coded, metric)
                    if coded is not None and value is not None and (photo.split == "validation") == (
                            split == "validation"):
                        xs.append(coded.bpp)
                        ys.append(value)
                if xs:
                    ax.plot(xs, ys, marker, ms=7 if method == "RDEIC" else 5, color=colours[method],
                            mfc=colours[method] if filled else "white", ls="none",
                            label=f"{method} ({'validation' if filled else 'training'} photos)")
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel (log)")
        ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "MS-SSIM")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].set_title("each photo at the nearest rate (filled: validation)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------ HTML
def esc(value: object) -> str:
    """HTML-escape any data value (names, reasons, paths all come from files and jobs)."""
    return html.escape(str(value), quote=True)


def url(path: str) -> str:
    """A relative URL of a file beside the report, percent-encoded then attribute-escaped."""
    return esc(urllib.parse.quote(path))


def _num(value: float | None, digits: int, unit: str = "") -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}{unit}"


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1500px}
h1{margin-bottom:.2em} h2{margin:1.6em 0 .3em} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em}
th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
.split{font-size:.75em;padding:.15em .5em;border-radius:.7em;margin-left:.6em;vertical-align:middle}
.split.validation{background:#d4efdf;color:#145a32}.split.train{background:#fdebd0;color:#7e5109}
.row{display:grid;grid-template-columns:repeat(4,1fr);gap:.6em}
.row img{width:100%;height:auto;display:block;border:1px solid #bbb}
.crops{display:flex;flex-wrap:wrap;gap:.6em}
.crops img{image-rendering:pixelated;display:block;border:1px solid #bbb}
figure{margin:0} figcaption{font-size:.8em;line-height:1.35;margin-top:.2em}
figcaption b{font-size:1.05em} .note{color:#666} .fail{color:#a93226;font-weight:bold}
article{border-top:2px solid #ddd;margin-top:1.5em}
"""


def _caption(c: Coded) -> str:
    head = f"<b>{esc(c.method)}</b>" + (f" {esc(c.setting)}" if c.setting else "")
    parts = [f"{c.n_bytes:,} bytes", f"{c.bpp:.4f} bpp"]
    if c.method != "original":
        parts += [f"PSNR {_num(c.psnr, 2, ' dB')}", f"MS-SSIM {_num(c.ms_ssim, 4)}"]
    text = head + "<br>" + esc(" · ".join(parts))
    if c.note:
        text += f"<br><span class=note>{esc(c.note)}</span>"
    if c.file:
        text += f" <a href=\"img/{url(c.file)}\">file</a>"
    return text


def _photo_html(p: PhotoResult, crop_zoom: int) -> str:
    label = SPLIT_LABELS.get(p.split, "not in split.json")
    out = [(f"<article id=\"photo-{esc(slug(p.name))}\"><h2>{esc(p.name)}"
            f"<span class=\"split {esc(p.split)}\">{esc(label)}</span></h2>"),
           (f"<p>{p.width}×{p.height} px ({p.width * p.height / 1e6:.2f} MP), "
            f"archive key <code>{esc(p.key)}</code></p>")]
    if p.failure:
        out.append(f"<p class=fail>no RDEIC restoration: {esc(p.failure)}</p>")
    out += [f"<p class=note>{esc(n)}</p>" for n in p.notes]
    out.append("<div class=row>")
    for c in p.methods:
        out.append(f"<figure><a href=\"img/{url(c.png)}\"><img src=\"img/{url(c.preview)}\" "
                   f"alt=\"{esc(c.method)} {esc(p.name)}\"></a><figcaption>{_caption(c)}</figcaption></figure>")
    out.append("</div>")
    x, y, w, h = p.window
    why = "the window of largest RDEIC error" if p.method("RDEIC") else "top-left corner"
    out.append(f"<h3>1:1 crops at x={x}, y={y} ({w}×{h} px, shown at {crop_zoom}×; {esc(why)})</h3><div class=crops>")
    for c in p.methods:
        out.append(f"<figure><a href=\"img/{url(c.crop)}\"><img src=\"img/{url(c.crop)}\" width=\"{w * crop_zoom}\" "
                   f"height=\"{h * crop_zoom}\" alt=\"{esc(c.method)} crop {esc(p.name)}\"></a>"
                   f"<figcaption><b>{esc(c.method)}</b> {esc(c.setting)} · {c.bpp:.4f} bpp</figcaption></figure>")
    out.append("</div></article>")
    return "\n".join(out)


def _table(rows: Sequence[Sequence[str]], head: Sequence[str] = ()) -> str:
    """Rows of already-escaped cells (numbers right-aligned by the caller's ``<td class=n>``); no
    header row when ``head`` is empty (the label/value tables)."""
    top = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" if head else ""
    return "<table>" + top + "".join("<tr>" + "".join(r) + "</tr>" for r in rows) + "</table>"


def render_html(report: DemoReport, crop_zoom: int = 2) -> str:
    """The page as a string: plain HTML + CSS, no JavaScript, every data string escaped."""
    def td(v: object, numeric: bool = False) -> str:
        return f"<td class=n>{esc(v)}</td>" if numeric else f"<td>{esc(v)}</td>"

    job_rows = [[td(j.name), td(f"{j.seconds:.1f}", True), td(j.images, True), td(j.ok, True), td(j.failed, True),
                 td(f"{j.per_s:.3f}", True), td("; ".join(j.failures) or "none")] for j in report.jobs]
    photo_rows = []
    for p in report.photos:
        cells = [f"<td><a href=\"#photo-{esc(slug(p.name))}\">{esc(p.name)}</a></td>",
                 td(SPLIT_LABELS.get(p.split, "not in split.json"))]
        for method in ("RDEIC", "JPEG", "WebP"):
            c = p.method(method)
            cells += ([td(c.setting), td(f"{c.bpp:.4f}", True), td(_num(c.psnr, 2), True), td(_num(c.ms_ssim, 4), True)]
                      if c else [td("—")] * 4)
        photo_rows.append(cells)
    head = ["photo", "split"] + [f"{m} {k}" for m in ("RDEIC", "JPEG", "WebP") for k in ("setting", "bpp", "PSNR",
                                                                                          "MS-SSIM")]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{esc(report.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(report.title)}</h1>",
        ("<p>Each photo was archived by the archive job (WebDataset shards on an embedded S3 → Parquet "
         "bitstreams, Ray workers), decoded back by the restore job and measured against its source by the "
         "audit job. JPEG and WebP (Pillow) are shown at the quality whose file is nearest in size to the "
         "RDEIC bitstream; every caption gives each method's own bytes and bpp — they are not equal rates.</p>"),
        "<h2>Model and codec settings</h2>",
        _table([[f"<th>{esc(k)}</th>", td(v)] for k, v in report.model.items()]),
        "<h2>Archive statistics</h2>",
        _table([[f"<th>{esc(k)}</th>", td(v)] for k, v in report.archive.items()]),
        _table(job_rows, ["job", "seconds", "images", "ok", "failed", "images/s", "failures (reason: keys)"]),
    ]
    if report.links:
        parts.append("<p>Outputs copied for inspection: " + ", ".join(
            f"<a href=\"{url(href)}\">{esc(label)}</a>" for label, href in report.links.items()) + "</p>")
    if report.notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Rate and quality</h2>")
    if report.plot:
        parts.append(f"<p><a href=\"{url(report.plot)}\"><img src=\"{url(report.plot)}\" "
                     f"alt=\"rate-quality plot\" style=\"max-width:100%\"></a></p>")
    parts.append(_table(photo_rows, head))
    parts += [_photo_html(p, crop_zoom) for p in report.photos]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: Path, report: DemoReport, curve_points: Sequence[Point]) -> Path:
    """``rate_quality.png`` and ``report.html`` in ``out_dir`` (whose ``img/`` ``build_photo`` filled)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(p.methods for p in report.photos):
        report.plot = "rate_quality.png"
        plot_rate_quality(out_dir / report.plot, report.photos, curve_points, report.title)
    path = out_dir / "report.html"
    path.write_text(render_html(report), encoding="utf-8")
    return path
