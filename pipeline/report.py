"""The audit report: ``report.html`` (self-contained: inline CSS, images as data: URIs, no script) and
the PNG plots beside it in ``plots/``.

Sections: aggregate metrics, FID/KID, metrics that could not run (with the exact missing files),
failures by reason and key, per-shard table, bpp / quality histograms, a bpp-vs-PSNR scatter, and
side-by-side crops (original | decoded) of the worst-K images by PSNR, each crop the window with
the largest error. Every string from the data is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import storage
from .manifest import OutputLocation

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
HIST_METRICS = (("bpp", "bits per pixel"), ("psnr", "PSNR (dB)"), ("ms_ssim", "MS-SSIM"), ("lpips", "LPIPS"),
                ("dists", "DISTS"))

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.meta{color:#556;font-size:13px}table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d6d9e0;padding:3px 8px;text-align:right}th{background:#f1f3f7}
td.l,th.l{text-align:left}.warn{background:#fff4e5;border:1px solid #f0c36d;padding:8px 12px;font-size:13px}
.plots img{max-width:460px;margin:4px 8px 4px 0;border:1px solid #e3e5ea}
.pair{display:inline-block;margin:0 16px 16px 0;vertical-align:top;font-size:12px}
.pair img{image-rendering:pixelated;border:1px solid #ccd;min-height:96px;max-height:256px;margin-right:2px}
code{font-size:12px}
"""


def _fmt(value: Any, digits: int = 4, style: str = "f") -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}{style}}"
    return html.escape(str(value))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def make_plots(columns: Mapping[str, Sequence[float | None]]) -> dict[str, bytes]:
    """PNG bytes of the histograms of every metric with values, and the bpp-vs-PSNR scatter."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    def finite(name: str) -> np.ndarray:
        return np.asarray([v for v in columns.get(name, []) if v is not None and math.isfinite(v)], dtype=float)

    plots: dict[str, bytes] = {}
    for name, label in HIST_METRICS:
        values = finite(name)
        if values.size == 0:
            continue
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        ax.hist(values, bins=min(30, max(5, values.size // 2)), color="#4c72b0", edgecolor="white")
        ax.set_xlabel(label)
        ax.set_ylabel("images")
        ax.set_title(f"{label} (n={values.size}, mean {values.mean():.4g})", fontsize=10)
        plots[f"hist_{name}.png"] = _figure_png(fig)
    pairs = [(b, p) for b, p in zip(columns.get("bpp", []), columns.get("psnr", []))
             if b is not None and p is not None and math.isfinite(b) and math.isfinite(p)]
    if pairs:
        fig, ax = plt.subplots(figsize=(4.6, 3.4))
        bpp, ps = zip(*pairs)
        ax.scatter(bpp, ps, s=14, alpha=0.7, color="#dd8452", edgecolors="none")
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"bpp vs PSNR (n={len(pairs)})", fontsize=10)
        ax.grid(alpha=0.3)
        plots["scatter_bpp_psnr.png"] = _figure_png(fig)
    return plots


def _aggregate_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, stats in summary["metrics"].items():
        if not isinstance(stats, dict):
            continue
        rows.append(f"<tr><td class=l>{html.escape(name)}</td><td>{stats['n']}</td><td>{_fmt(stats['mean'])}</td>"
                    f"<td>{_fmt(stats['median'])}</td><td>{_fmt(stats['std'])}</td><td>{_fmt(stats['min'])}</td>"
                    f"<td>{_fmt(stats['max'])}</td><td>{stats.get('non_finite', 0)}</td></tr>")
    fid = summary.get("fid") or {}
    extra = (f"<p>PSNR of the mean MSE: {_fmt(summary.get('psnr_of_mean_mse'))} dB. "
             f"FID: {_fmt(fid.get('fid'), 4, 'g')}, KID: {_fmt(fid.get('kid_mean'), 4, 'g')} &plusmn; "
             f"{_fmt(fid.get('kid_std'), 3, 'g')} "
             f"over {fid.get('patches', 0)} patch pairs of {fid.get('patch_size')} px"
             + (f" &mdash; {html.escape(fid['note'])}" if fid.get("note") else "") + ".</p>")
    return ("<table><tr><th class=l>metric</th><th>n</th><th>mean</th><th>median</th><th>std</th><th>min</th>"
            "<th>max</th><th>non-finite</th></tr>" + "".join(rows) + "</table>" + extra)


def _unavailable(summary: dict[str, Any]) -> str:
    from perceptual import PERCEPTUAL_METRICS

    missing = summary.get("metrics_unavailable") or {}
    requested = summary.get("perceptual_requested", list(PERCEPTUAL_METRICS))
    skipped = [m for m in PERCEPTUAL_METRICS if m not in requested]
    parts = []
    if skipped:
        parts.append(f"<p>Not requested (<code>--perceptual</code>): {html.escape(', '.join(skipped))}.</p>")
    if missing:
        items = "".join(f"<li><b>{html.escape(m)}</b>: missing "
                        + "; ".join(f"<code>{html.escape(f)}</code>" for f in files) + "</li>"
                        for m, files in sorted(missing.items()))
        parts.append(f"<div class=warn>These metrics were not computed (columns are null) because their weight "
                     f"files are not on disk; nothing is downloaded:<ul>{items}</ul></div>")
    if not parts:
        return "<p>All metrics ran (LPIPS, DISTS, FID/KID weights found).</p>"
    return "".join(parts)


def _failures(summary: dict[str, Any]) -> str:
    images = summary["images"]
    if not images["failed"]:
        return "<p>No audited key failed.</p>"
    reasons = "".join(f"<tr><td class=l>{html.escape(r)}</td><td>{n}</td></tr>"
                      for r, n in images["failed_by_reason"].items())
    keys = ", ".join(f"<code>{html.escape(k)}</code>" for k in summary["failed_keys"][:200])
    more = " (list truncated)" if summary.get("failed_keys_truncated") or len(summary["failed_keys"]) > 200 else ""
    return (f"<table><tr><th class=l>reason</th><th>keys</th></tr>{reasons}</table>"
            f"<p>Failed keys{more}: {keys}</p>")


def _shards_table(summary: dict[str, Any]) -> str:
    head = ("<tr><th class=l>shard</th><th>audited</th><th>ok</th><th>failed</th><th>bpp</th><th>PSNR</th>"
            "<th>MS-SSIM</th><th>LPIPS</th><th>DISTS</th><th class=l>notes</th></tr>")
    rows = []
    for s in summary["shards"]:
        note = html.escape(f"source damaged: {s['damage']['message']}") if s.get("damage") else ""
        rows.append(f"<tr><td class=l>{html.escape(s['shard_id'])}</td><td>{s['audited']}</td><td>{s['ok']}</td>"
                    f"<td>{s['failed']}</td><td>{_fmt(s['bpp'])}</td><td>{_fmt(s['psnr'], 3)}</td>"
                    f"<td>{_fmt(s['ms_ssim'])}</td><td>{_fmt(s['lpips'])}</td><td>{_fmt(s['dists'])}</td>"
                    f"<td class=l>{note}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _worst(crops: Sequence[dict[str, Any]]) -> str:
    if not crops:
        return "<p>No decoded image to show.</p>"
    out = []
    for c in crops:
        caption = (f"{html.escape(c['key'])}<br>PSNR {_fmt(c['psnr'], 2)} dB, {_fmt(c['bpp'])} bpp; crop "
                   f"{c['width']}x{c['height']} at ({c['x']}, {c['y']}) of {c['image_width']}x{c['image_height']}")
        out.append(f"<div class=pair><img alt='original {html.escape(c['key'])}' src='{_data_uri(c['original_png'])}'>"
                   f"<img alt='decoded {html.escape(c['key'])}' src='{_data_uri(c['decoded_png'])}'>"
                   f"<br>original | decoded<br>{caption}</div>")
    return "".join(out)


def render_html(summary: dict[str, Any], plots: dict[str, bytes], crops: Sequence[dict[str, Any]]) -> str:
    im = summary["images"]
    title = f"RDEIC audit of {summary['archive']}"
    plot_imgs = "".join(f"<img alt='{html.escape(n)}' src='{_data_uri(d)}'>" for n, d in plots.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class=meta>sources {html.escape(', '.join(summary.get('sources_patterns', [])))} &middot; codec
<code>{html.escape(str(summary['codec']['fingerprint'])[:16])}</code> ({html.escape(str(summary['codec'].get('name')))})
&middot; fraction {summary['fraction']} (seed {summary['seed']})
&middot; generated {html.escape(summary['generated_at'])}</p>
<p>{im['audited']} keys audited ({im['ok']} measured, {im['failed']} failed) of {im['archived']} archived in
{len(summary['shards'])} shard(s); {im['not_archived']} input samples were never archived.</p>
<h2>Aggregate</h2>{_aggregate_table(summary)}
<h2>Metrics not computed</h2>{_unavailable(summary)}
<h2>Failures</h2>{_failures(summary)}
<h2>Per shard</h2>{_shards_table(summary)}
<h2>Distributions</h2><div class=plots>{plot_imgs}</div>
<h2>Worst {len(crops)} images by PSNR</h2>{_worst(crops)}
</body></html>
"""


def write_report(out: OutputLocation, summary: dict[str, Any], columns: Mapping[str, Sequence[float | None]],
                 crops: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Write ``plots/*.png`` and ``report.html`` under ``out``; returns name -> URL."""
    plots = make_plots(columns)
    written = {}
    for name, data in plots.items():
        path = out.path(PLOTS_DIR, name)
        storage.write_bytes_atomic(out.fs, path, data)
        written[f"{PLOTS_DIR}/{name}"] = out.to_url(path)
    path = out.path(REPORT_FILE)
    storage.write_bytes_atomic(out.fs, path, render_html(summary, plots, crops).encode("utf-8"))
    written[REPORT_FILE] = out.to_url(path)
    return written
