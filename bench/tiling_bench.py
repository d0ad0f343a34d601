"""Any-size codec benchmarks: cost per megapixel and peak memory from 0.25 to 16 MP, tiled vs
untiled quality and seams, and sd21 (random weights) at 2048 x 1536.

    python -m bench.tiling_bench scale   [--model mini] [--workers 1]     # crops + all of data/photos/full
    python -m bench.tiling_bench quality [--model mini]                   # tiled vs untiled, S = 0, 2, 5
    python -m bench.tiling_bench sd21                                      # 2048 x 1536, random weights
    python -m bench.tiling_bench report                                    # -> docs/benchmarks-tiling.md

Every image of ``scale`` runs in a fresh process (``one`` mode), so its peak RSS is its own; the
codec runs as the archive runs it (reproducible: one intra-op thread per process). Results go to
docs/benchmarks-tiling.json (one key per mode); ``report`` writes the markdown the README links.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.metrics import psnr

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "data" / "photos" / "full"
RESULTS = REPO / "docs" / "benchmarks-tiling.json"
REPORT = REPO / "docs" / "benchmarks-tiling.md"
PICTURE = REPO / "docs" / "tiling-corner.png"
CROP_SOURCE = "seeding_by_Clements_Engelhardt.jpg"  # 5312 x 2988, the largest photo
CROP_SIDES = [512, 704, 1024, 1472, 2048]  # 0.26, 0.50, 1.05, 2.17, 4.19 MP
QUALITY_PHOTOS = ["Garden.jpg", "Dragonfly_by_Bolly.jpg", "Bridge_by_Sander_Klootwijk.jpg"]
PICTURE_PHOTO = "Dragonfly_by_Bolly.jpg"  # textured where its 1536² crop has a tile corner
QUALITY_SIDES = [1024, 1280, 1536]  # 1.05 (whole: within whole_max_pixels), 1.64 and 2.36 MP (tiled)
# Tiles larger than any image here: every pass runs whole (the pre-tiling path).
UNTILED = dict(encode_tile=1 << 16, latent_tile=1 << 13, decode_tile=1 << 13)


def _load(name: str, side: int | None = None) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    im = np.asarray(Image.open(PHOTOS / name).convert("RGB"))
    if side:
        if min(im.shape[:2]) < side:
            raise ValueError(f"{name} is {im.shape[1]}x{im.shape[0]}, smaller than a {side} crop")
        y, x = (im.shape[0] - side) // 2, (im.shape[1] - side) // 2
        im = np.ascontiguousarray(im[y:y + side, x:x + side])
    return im


def _merge(key: str, value: object) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    data.setdefault("meta", {})[key] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "python": platform.python_version(),
    }
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------- one image (child process)
def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _round_trip(codec, im: np.ndarray, steps: int) -> tuple[bytes, np.ndarray, dict]:
    """Encode then decode one image: wall and CPU seconds of each, peak RSS before, after encode, at the end."""
    base = _peak_rss_gib()
    t, c = time.perf_counter(), time.process_time()
    stream = codec.encode([im])[0]
    enc, enc_cpu = time.perf_counter() - t, time.process_time() - c
    rss_enc = _peak_rss_gib()
    t, c = time.perf_counter(), time.process_time()
    out = codec.decode([stream], steps=steps)[0]
    dec, dec_cpu = time.perf_counter() - t, time.process_time() - c
    return stream, out, {"enc": enc, "enc_cpu": enc_cpu, "dec": dec, "dec_cpu": dec_cpu,
                         "base": base, "rss_enc": rss_enc, "rss": _peak_rss_gib()}


def one(model: str, name: str, side: int | None, steps: int) -> dict:
    from rdeic_core import RDEICCodec

    codec = RDEICCodec.from_pretrained(model)
    im = _load(name, side)
    stream, out, m = _round_trip(codec, im, steps)
    enc, enc_cpu, dec, dec_cpu, base, rss_enc, rss = (m[k] for k in ("enc", "enc_cpu", "dec", "dec_cpu",
                                                                       "base", "rss_enc", "rss"))
    mp = im.shape[0] * im.shape[1] / 1e6
    # CPU seconds too: the codec runs on one thread, so they are what a free core would take, and far
    # less sensitive than wall time to other processes sharing this 2-core machine
    return {"name": name, "crop": side, "width": im.shape[1], "height": im.shape[0], "mp": round(mp, 3),
            "steps": steps, "encode_s": round(enc, 2), "decode_s": round(dec, 2),
            "encode_cpu_s": round(enc_cpu, 2), "decode_cpu_s": round(dec_cpu, 2),
            "encode_cpu_s_per_mp": round(enc_cpu / mp, 3), "decode_cpu_s_per_mp": round(dec_cpu / mp, 3),
            "encode_s_per_mp": round(enc / mp, 3), "decode_s_per_mp": round(dec / mp, 3),
            "rss_gib_before": round(base, 3), "rss_gib_after_encode": round(rss_enc, 3), "rss_gib_peak": round(rss, 3),
            "bpp": round(8 * len(stream) / (mp * 1e6), 4), "psnr": round(psnr(im, out), 2),
            "path": _path(codec, stream), "date": _now()}


def _path(codec, stream: bytes) -> str:
    """'whole' or 'tiled': which decode path the codec's default tiling takes for this stream."""
    return "whole" if codec.fits_untiled(codec.parse(stream).header.z_shape) else "tiled"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _megapixels(name: str, side: int | None) -> float:
    from PIL import Image

    if side:
        return side * side / 1e6
    with Image.open(PHOTOS / name) as im:  # header only
        return im.width * im.height / 1e6


def scale(model: str, workers: int, steps: int, upto_mp: float | None = None) -> list[dict]:
    """Every case, or (``upto_mp``) only those of at most that many MP, merged into the stored rows."""
    cases = [(CROP_SOURCE, s) for s in CROP_SIDES] + [(p.name, None) for p in sorted(PHOTOS.glob("*.jpg"))]
    if upto_mp is not None:
        cases = [c for c in cases if _megapixels(*c) <= upto_mp]

    def run(case: tuple[str, int | None]) -> dict:
        name, side = case
        cmd = [sys.executable, "-m", "bench.tiling_bench", "one", "--model", model, "--name", name,
               "--steps", str(steps)] + (["--side", str(side)] if side else [])
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
        rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode or not rows:
            return {"name": name, "crop": side, "error": res.stderr[-500:]}
        print(json.dumps(rows[0]), flush=True)
        return rows[0]

    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(run, cases))
    if upto_mp is not None and RESULTS.exists():
        stored = json.loads(RESULTS.read_text())
        old = stored.get("scale", {}).get("rows", [])
        for r in old:  # rows kept from an earlier run keep that run's date
            r.setdefault("date", stored.get("meta", {}).get("scale", {}).get("date"))
        fresh = {(r["name"], r["crop"]) for r in rows}
        rows = [r for r in old if (r["name"], r["crop"]) not in fresh] + rows
    _merge("scale", {"model": model, "steps": steps, "workers": workers, "rows": rows, "upto_mp": upto_mp})
    return rows


# ---------------------------------------------------------------------------- tiled vs untiled
def _edge_mask(h: int, w: int, tiling) -> np.ndarray:
    """Pixels within 4 px of an inner tile edge of the sampler or VAE-decoder grid."""
    from rdeic_core.tiling import grid

    mask = np.zeros((h, w), dtype=bool)
    hl, wl = -(-h // 64) * 8, -(-w // 64) * 8
    for tile, ov in ((tiling.latent_tile, tiling.latent_overlap), (tiling.decode_tile, tiling.decode_overlap)):
        for t in grid(hl, wl, tile, ov, 8):
            for y in (t.y * 8, (t.y + t.h) * 8):
                if 0 < y < h:
                    mask[max(0, y - 4):y + 4, :] = True
            for x in (t.x * 8, (t.x + t.w) * 8):
                if 0 < x < w:
                    mask[:, max(0, x - 4):x + 4] = True
    return mask


def picture(model: str) -> Path:
    """Only the corner picture (S = 2, the 1536² crop of PICTURE_PHOTO)."""
    from dataclasses import replace

    from PIL import Image

    from rdeic_core import RDEICCodec

    codec = RDEICCodec.from_pretrained(model)
    tiled = codec.tiling
    im = _load(PICTURE_PHOTO, 1536)
    codec.tiling = replace(tiled, **UNTILED)
    ref = codec.decode([codec.encode([im])[0]], steps=2)[0]
    codec.tiling = tiled
    out = codec.decode([codec.encode([im])[0]], steps=2)[0]
    Image.fromarray(_corner_picture(im, ref, out, tiled)).save(PICTURE, optimize=True)
    return PICTURE


def quality(model: str) -> list[dict]:
    from dataclasses import replace

    from rdeic_core import RDEICCodec

    codec = RDEICCodec.from_pretrained(model)
    tiled_cfg = codec.tiling
    untiled_cfg = replace(tiled_cfg, **UNTILED)
    rows = []
    corner = None
    for name in QUALITY_PHOTOS:
        for side in QUALITY_SIDES:
            im = _load(name, side)
            codec.tiling = untiled_cfg
            s_un = codec.encode([im])[0]
            codec.tiling = tiled_cfg
            s_ti = codec.encode([im])[0]
            mask = _edge_mask(side, side, tiled_cfg)
            for steps in (0, 2, 5):
                codec.tiling = untiled_cfg
                t = time.perf_counter()
                ref = codec.decode([s_un], steps=steps)[0]
                t_un = time.perf_counter() - t
                codec.tiling = tiled_cfg
                t = time.perf_counter()
                out = codec.decode([s_ti], steps=steps)[0]
                t_ti = time.perf_counter() - t
                d = np.abs(out.astype(np.float64) - ref.astype(np.float64)).mean(axis=2)
                # seams in the tiled output itself: pixel steps across tile edges vs elsewhere,
                # relative to the same ratio of the untiled output
                def step_ratio(x: np.ndarray, mask: np.ndarray) -> float:
                    g = np.abs(np.diff(x.astype(np.float64), axis=1)).mean(axis=2)
                    m = mask[:, 1:] & mask[:, :-1]
                    return float(g[m].mean() / g[~m].mean())
                row = {"name": name, "side": side, "mp": round(side * side / 1e6, 2), "steps": steps,
                       "bpp_untiled": round(8 * len(s_un) / side**2, 4),
                       "bpp_tiled": round(8 * len(s_ti) / side**2, 4),
                       "psnr_untiled": round(psnr(im, ref), 3), "psnr_tiled": round(psnr(im, out), 3),
                       "psnr_tiled_vs_untiled": round(psnr(ref, out), 2),
                       "diff_at_edges": round(float(d[mask].mean()), 3),
                       "diff_elsewhere": round(float(d[~mask].mean()), 3),
                       "step_ratio_tiled": round(step_ratio(out, mask), 3),
                       "step_ratio_untiled": round(step_ratio(ref, mask), 3),
                       "decode_s_untiled": round(t_un, 1), "decode_s_tiled": round(t_ti, 1),
                       "path": _path(codec, s_ti)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if name == PICTURE_PHOTO and steps == 2 and side == 1536:
                    corner = _corner_picture(im, ref, out, tiled_cfg)
    if corner is not None:
        from PIL import Image

        Image.fromarray(corner).save(PICTURE, optimize=True)
    _merge("quality", {"model": model, "tiling": tiled_cfg.to_dict(), "rows": rows})
    return rows


def _corner_picture(im: np.ndarray, ref: np.ndarray, out: np.ndarray, tiling) -> np.ndarray:
    """A 256-px crop centred on an inner corner of the sampler grid: source | untiled | tiled | |diff| x 8."""
    from rdeic_core.tiling import tile_starts

    hl = -(-im.shape[0] // 64) * 8
    ys = tile_starts(hl, tiling.latent_tile, tiling.latent_overlap, 8)
    cy = cx = ys[1] * 8 if len(ys) > 1 else im.shape[0] // 2
    cy = min(max(cy, 128), im.shape[0] - 128)
    cx = min(max(cx, 128), im.shape[1] - 128)
    sl = (slice(cy - 128, cy + 128), slice(cx - 128, cx + 128))
    diff = np.clip(np.abs(out.astype(np.int16) - ref.astype(np.int16)) * 8, 0, 255).astype(np.uint8)
    gap = np.full((256, 4, 3), 255, dtype=np.uint8)
    panels = []
    for p in (im[sl], ref[sl], out[sl], diff[sl]):
        p = p.copy()
        # red ticks on the panel border mark the tile corner at the panel's centre
        p[:6, 127:129] = p[-6:, 127:129] = p[127:129, :6] = p[127:129, -6:] = (255, 0, 0)
        panels += [p, gap]
    return np.concatenate(panels[:-1], axis=1)


# ---------------------------------------------------------------------------- sd21
def sd21(steps: int, height: int, width: int, threads: int) -> dict:
    import torch

    from rdeic_core import RDEICCodec

    torch.set_num_threads(threads)
    codec = RDEICCodec.from_config("sd21", seed=0)
    codec.reproducible = False  # run on `threads` threads: a feasibility figure, not a bytes check
    rng = np.random.default_rng(0)
    src = _load("Dragonfly_by_Bolly.jpg")
    im = (np.ascontiguousarray(src[:height, :width]) if src.shape[0] >= height
          else rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    stream, out, m = _round_trip(codec, im, steps)
    row = {"config": "sd21 (random weights)", "width": width, "height": height, "steps": steps,
           "threads": torch.get_num_threads(), "encode_s": round(m["enc"], 1), "decode_s": round(m["dec"], 1),
           "rss_gib_before": round(m["base"], 2), "rss_gib_after_encode": round(m["rss_enc"], 2),
           "rss_gib_peak": round(m["rss"], 2),
           "bytes": len(stream), "out_shape": list(out.shape), "tiling": codec.tiling.to_dict()}
    print(json.dumps(row), flush=True)
    _merge("sd21", row)
    return row


# ---------------------------------------------------------------------------- report
def report() -> Path:
    data = json.loads(RESULTS.read_text())
    L = ["# Any-size codec benchmarks (tiling)", "",
         "Written by `python -m bench.tiling_bench report` from `docs/benchmarks-tiling.json`; the commands that made",
         "each table are above it. Shared 2-core CPU machine, one intra-op thread per codec process (the codec's",
         "reproducible mode, as the archive runs it); timings are wall-clock of one run each, so compare ratios.", ""]
    if "scale" in data:
        sc = data["scale"]
        rows = [r for r in sc["rows"] if "error" not in r]
        L += [f"## Cost per megapixel, 0.26–16 MP (`{sc['model']}`, S = {sc['steps']})", "",
              f"`python -m bench.tiling_bench scale --model {sc['model']} --workers {sc['workers']}` "
              + (f"(last run with `--upto-mp {sc['upto_mp']}`: the images up to {sc['upto_mp']} MP re-measured) "
                 if sc.get("upto_mp") else "")
              + f"({data['meta']['scale']['date']}; {sc['workers']} image(s) at a time, each in its own process).", "",
              "Wall seconds were taken while other benchmarks shared the machine; the CPU seconds (one thread per",
              "codec process) are what a free core takes and are the figures the ratios below use.", "",
              "'path': whole (within `whole_max_pixels`, every pass untiled) or tiled. Rows are dated: a partial",
              "re-run (`--upto-mp`) re-measures only the small images.", "",
              "| image | size | MP | path | encode s (wall / CPU) | encode CPU s/MP | decode s (wall / CPU) "
              "| decode CPU s/MP | peak RSS GiB | bpp | PSNR | measured |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rows, key=lambda r: (r["crop"] is None, r["mp"])):
            label = f"{r['name']} crop" if r["crop"] else r["name"]
            L.append(f"| {label} | {r['width']}x{r['height']} | {r['mp']:.2f} | {r.get('path', 'tiled')} "
                     f"| {r['encode_s']:.1f} / {r['encode_cpu_s']:.1f} "
                     f"| {r['encode_cpu_s_per_mp']:.2f} | {r['decode_s']:.1f} / {r['decode_cpu_s']:.1f} "
                     f"| {r['decode_cpu_s_per_mp']:.2f} "
                     f"| {r['rss_gib_peak']:.2f} | {r['bpp']:.4f} | {r['psnr']:.2f} "
                     f"| {r.get('date', data['meta']['scale']['date'])} |")
        for r in sc["rows"]:
            if "error" in r:
                L.append(f"| {r['name']} | failed: {r['error'][-120:]!r} |")
        one_mp = [r for r in rows if 0.9 <= r["mp"] <= 1.5]
        big = [r for r in rows if r["mp"] >= 12]
        if one_mp and big:
            e1 = statistics.median(r["encode_cpu_s_per_mp"] for r in one_mp)
            d1 = statistics.median(r["decode_cpu_s_per_mp"] for r in one_mp)
            m1 = statistics.median(r["rss_gib_peak"] for r in one_mp)
            eb = statistics.median(r["encode_cpu_s_per_mp"] for r in big)
            db = statistics.median(r["decode_cpu_s_per_mp"] for r in big)
            mb = max(r["rss_gib_peak"] for r in big)
            L += ["", f"Medians (CPU seconds): ~1 MP ({len(one_mp)} image(s)) encode {e1:.2f} s/MP, "
                  f"decode {d1:.2f} s/MP, peak {m1:.2f} GiB; "
                  f">= 12 MP ({len(big)} images) encode {eb:.2f} s/MP (x{eb / e1:.2f}), decode {db:.2f} s/MP "
                  f"(x{db / d1:.2f}), largest peak {mb:.2f} GiB (x{mb / m1:.2f} the 1 MP peak). "
                  "Acceptance: each ratio <= 1.5."]
        allr = [r for r in rows if r["crop"] is None]
        if allr:
            tot_mp = sum(r["mp"] for r in allr)
            enc_cpu = sum(r["encode_cpu_s"] for r in allr)
            dec_cpu = sum(r["decode_cpu_s"] for r in allr)
            peak = max(r["rss_gib_peak"] for r in allr)
            L += ["", f"All {len(allr)} photos of data/photos/full: {tot_mp:.1f} MP, encode {enc_cpu:.0f} CPU s, "
                  f"decode {dec_cpu:.0f} CPU s (S = {sc['steps']}), largest peak RSS {peak:.2f} GiB."]
        L.append("")
    if "quality" in data:
        q = data["quality"]
        L += [f"## Tiled vs untiled (`{q['model']}`, tiling {q['tiling']})", "",
              f"`python -m bench.tiling_bench quality --model {q['model']}` ({data['meta']['quality']['date']}). "
              "Centre crops; 'untiled' runs every pass whole (the pre-tiling codec). 'edge' pixels lie within 4 px "
              "of an inner tile edge of the sampler or VAE-decoder grid; 'step ratio' is the mean horizontal pixel "
              "step at edges over elsewhere (a seam would raise the tiled ratio above the untiled one).", "",
              "'path' is the one the default codec takes: crops within `whole_max_pixels` run whole, "
              "identical to untiled.", "",
              "| photo | crop | path | S | bpp untiled / tiled | PSNR untiled | PSNR tiled | diff "
              "| tiled vs untiled dB | mean abs diff edge / elsewhere | step ratio untiled / tiled "
              "| decode s untiled / tiled |",
              "|---|---|---|---:|---|---:|---:|---:|---:|---|---|---|"]
        for r in q["rows"]:
            L.append(f"| {r['name']} | {r['side']}² | {r.get('path', 'tiled')} | {r['steps']} "
                     f"| {r['bpp_untiled']:.4f} / {r['bpp_tiled']:.4f} | {r['psnr_untiled']:.2f} "
                     f"| {r['psnr_tiled']:.2f} | {r['psnr_tiled'] - r['psnr_untiled']:+.2f} "
                     f"| {r['psnr_tiled_vs_untiled']:.1f} "
                     f"| {r['diff_at_edges']:.2f} / {r['diff_elsewhere']:.2f} "
                     f"| {r['step_ratio_untiled']:.3f} / {r['step_ratio_tiled']:.3f} "
                     f"| {r['decode_s_untiled']:.0f} / {r['decode_s_tiled']:.0f} |")
        for s in (0, 2, 5):
            for what, rs in (("all crops", [r for r in q["rows"] if r["steps"] == s]),
                             ("tiled crops only",
                              [r for r in q["rows"] if r["steps"] == s and r.get("path", "tiled") == "tiled"])):
                if rs:
                    d = [r["psnr_tiled"] - r["psnr_untiled"] for r in rs]
                    edge = statistics.mean(r["diff_at_edges"] for r in rs)
                    elsewhere = statistics.mean(r["diff_elsewhere"] for r in rs)
                    L.append(f"\nS = {s}, {what}: mean PSNR difference tiled − untiled {statistics.mean(d):+.3f} dB "
                             f"over {len(rs)} crops (min {min(d):+.2f}, max {max(d):+.2f}); "
                             f"edge/elsewhere diff {edge:.2f} / {elsewhere:.2f}.")
        L += ["", "![source | untiled | tiled | |tiled − untiled| x 8 across a tile corner](tiling-corner.png)", ""]
    if "sd21" in data:
        r = data["sd21"]
        L += ["## sd21 (random weights) on the CPU", "",
              f"`python -m bench.tiling_bench sd21` ({data['meta']['sd21']['date']}): {r['width']}x{r['height']}, "
              f"S = {r['steps']}, {r['threads']} threads: encode {r['encode_s']:.0f} s, decode {r['decode_s']:.0f} s, "
              f"peak RSS {r['rss_gib_peak']:.2f} GiB "
              f"(after encode {r['rss_gib_after_encode']:.2f}, weights loaded {r['rss_gib_before']:.2f}).", ""]
    REPORT.write_text("\n".join(L) + "\n")
    return REPORT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["scale", "quality", "picture", "sd21", "report", "one"])
    ap.add_argument("--model", default="mini")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--name")
    ap.add_argument("--side", type=int)
    ap.add_argument("--size", default="1536x2048", help="sd21: HxW")
    ap.add_argument("--threads", type=int, default=2, help="sd21: torch intra-op threads")
    ap.add_argument("--upto-mp", type=float, help="scale: re-run only images of at most this many MP (others kept)")
    a = ap.parse_args(argv)
    if a.mode == "one":
        print(json.dumps(one(a.model, a.name, a.side, a.steps)))
    elif a.mode == "scale":
        scale(a.model, a.workers, a.steps, a.upto_mp)
    elif a.mode == "quality":
        quality(a.model)
    elif a.mode == "picture":
        print(picture(a.model))
    elif a.mode == "sd21":
        h, w = (int(v) for v in a.size.lower().split("x"))
        sd21(a.steps, h, w, a.threads)
    if a.mode != "one":
        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
