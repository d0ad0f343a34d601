"""`make demo`: the archive pipeline end to end on real photos at a real size, and a report to look at.

1. loads the model (the shipped `mini`; the `tiny` architecture with random weights if it is missing),
2. derives ~1.1 MP copies of the real test photos (data/photos/full; cached in outputs/demo/photos/):
   the 4 validation photos the model never saw in training plus a few of its training photos,
3. builds WebDataset shards of them and uploads them to an embedded S3 endpoint (moto on 127.0.0.1),
4. archives the shards with the archive job on Ray (one worker actor per core) into Parquet,
5. decodes the archive back to PNGs with the restore job,
6. decodes it again with the audit job, which measures bpp, PSNR and MS-SSIM against the sources,
7. codes each photo with Pillow's JPEG and WebP at the quality whose file is nearest in size to the
   RDEIC bitstream, and writes outputs/demo/report/report.html: the four versions side by side,
   1:1 crops, a rate-quality plot and the jobs' statistics.

The embedded S3 lives only as long as the demo, so the archive, the restored images and the audit
output are copied to outputs/demo/{archive,restored,audit}/ (plain pyarrow/pandas/DuckDB read the
archive). The default photo count keeps the demo at about 5 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUCKET = "rdeic-demo"
DEFAULT_MEGAPIXELS = 1.1
MIN_MEGAPIXELS = 1.0  # the demo shows real-size photos; only tests lower this (hidden --min-megapixels)
DEFAULT_COUNT = 8
# Training photos added after the 4 validation ones, in this order (then the rest, sorted): a city,
# a macro shot, a pattern and a mountain landscape, so the few that fit the time budget differ.
TRAIN_PICKS = ("Bridge_by_Sander_Klootwijk.jpg", "LadyBird.jpg", "analogpattern_by_Peter_Nerlich.jpg",
               "picosdeeuropa_by_Aitzol_Berasategi.jpg")
TOTAL_STEPS = 7


class Steps:
    """One-line step messages with the seconds since the demo started (the jobs add their own bars)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------ model
def default_model(out: Path) -> tuple[str, str]:
    """(model argument for the job, description)."""
    from rdeic_core.codec import resolve_model_path

    try:
        return str(resolve_model_path("mini")), "mini (shipped; trained here on the 22 training photos)"
    except FileNotFoundError:
        from rdeic_core import RDEICCodec

        path = out / "model-tiny-random"
        if not (path / "config.json").exists():
            RDEICCodec.from_config("tiny", seed=0).save_pretrained(path)
        return str(path), "tiny (random weights: no trained `mini` model is shipped yet)"


def model_facts(model: str, description: str) -> dict[str, str]:
    """What the report says about the model: loading it here also fails early on a bad --model."""
    from rdeic_core import RDEICCodec

    codec = RDEICCodec.from_pretrained(model)
    sched = codec.config.schedule
    return {
        "model": description,
        "architecture": str(getattr(codec.config, "name", "?")),
        "directory": str(model),
        "codec fingerprint": codec.fingerprint.hex(),
        "parameters": f"{sum(p.numel() for p in codec.parameters()) / 1e6:.2f} M "
                      f"({sum(t.numel() for t in codec.state_dict().values()) / 1e6:.2f} M values with the buffers)",
        "decoder steps S (relay sampler)": str(sched.default_steps),
        "detail scale": str(sched.default_detail_scale),
    }


# ------------------------------------------------------------------------------------ photos
def select_photos(split: dict[str, list[str]], count: int, names: Sequence[str] = ()) -> list[str]:
    """``names`` if given, else every validation photo then training photos (TRAIN_PICKS first) up to ``count``."""
    if names:
        return list(dict.fromkeys(names))
    train = [n for n in TRAIN_PICKS if n in split["train"]] + sorted(n for n in split["train"] if n not in TRAIN_PICKS)
    return (list(split["validation"]) + train)[:count]


def demo_size(width: int, height: int, megapixels: float, min_megapixels: float) -> tuple[int, int]:
    """(w, h) with the aspect kept and about ``megapixels`` MP, never below ``min_megapixels`` nor upscaled."""
    scale = min(1.0, math.sqrt(megapixels * 1e6 / (width * height)))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    while w * h < min_megapixels * 1e6 and (w < width or h < height):  # rounding may land just below
        w, h = min(width, w + 1), min(height, round((w + 1) * height / width))
    if w * h < min_megapixels * 1e6:
        raise ValueError(f"a {width}x{height} photo is smaller than {min_megapixels} MP")
    return w, h


def prepare_photo(src: Path, dst: Path, megapixels: float, min_megapixels: float) -> Path:
    """``dst`` (PNG): ``src`` EXIF-rotated, RGB, scaled to ~``megapixels`` MP with Lanczos; reused when current."""
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by EXIF: the shown size is transposed
            w, h = h, w
        tw, th = demo_size(w, h, megapixels, min_megapixels)
        if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
            with Image.open(dst) as cached:
                if cached.size == (tw, th):
                    return dst
        swapped = (w, h) != im.size
        im.draft("RGB", (2 * th, 2 * tw) if swapped else (2 * tw, 2 * th))  # JPEG DCT scaling, >= 2x the target
        img = ImageOps.exif_transpose(im).convert("RGB").resize((tw, th), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp.png")
    img.save(tmp, format="PNG", compress_level=3)
    os.replace(tmp, dst)
    return dst


def build_shards(photos: list[Path], per_shard: int) -> list[bytes]:
    """WebDataset tars (key.png + key.json), written with webdataset's own TarWriter."""
    import webdataset as wds

    shards = []
    for start in range(0, len(photos), per_shard):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for p in photos[start:start + per_shard]:
                sink.write({"__key__": sample_key(p), "png": p.read_bytes(), "json": {"source": p.name}})
        shards.append(buf.getvalue())
    return shards


def sample_key(photo: Path) -> str:
    return photo.stem.replace(".", "_")


# ------------------------------------------------------------------------------------ job summaries
def job_stats(name: str, summary: dict[str, Any]) -> Any:
    """The report's row for one job, failures written out as ``reason=count`` / key / shard lines."""
    from demo.report import JobStats

    im = summary["images"]
    failures = [f"{k}={v}" for k, v in (im.get("failed_by_reason") or {}).items()]
    failures += [f"key {k}" for k in (summary.get("failed_keys") or [])[:20]]
    failures += [f"shard {f['shard_id']} after {f['attempts']} attempt(s): {f['error']}"
                 for f in summary.get("failed_shards") or summary.get("shards_failed") or []]
    if summary.get("error"):
        failures.append(f"job did not run: {summary['error']}")
    ok = int(im.get("ok", 0))
    total = int(im.get("total", im.get("audited", ok + int(im.get("failed", 0)))))
    seconds = float(summary.get("seconds") or 0.0)
    return JobStats(name, seconds, total, ok, int(im.get("failed", 0)),
                    float(im.get("this_run_per_s") or (total / seconds if seconds else 0.0)), tuple(failures),
                    str(summary.get("output", "")))


def failed_summary(error: str) -> dict[str, Any]:
    """A job summary for a job that could not start (e.g. no archive shard to restore): zeros and the error."""
    return {"seconds": 0.0, "error": error, "failed_shards": [],
            "images": {"total": 0, "ok": 0, "failed": 0, "failed_by_reason": {}, "this_run_per_s": 0.0}}


def quiet_worker_warnings() -> None:
    """Hide torch's `torch.jit.script` deprecation warning, printed once by the driver and every Ray worker."""
    import warnings

    rule = "ignore:`torch.jit.script` is deprecated:FutureWarning"
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    current = os.environ.get("PYTHONWARNINGS")
    if rule not in (current or ""):  # Ray's workers inherit the environment of the driver
        os.environ["PYTHONWARNINGS"] = f"{current},{rule}" if current else rule


def read_parquet_dir(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return [row for f in sorted(path.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def copy_out(fs: Any, prefix: str, local: Path) -> None:
    """Copy an S3 prefix of the embedded server to a local folder (replacing it): it dies with the demo."""
    shutil.rmtree(local, ignore_errors=True)
    fs.get(prefix, str(local), recursive=True)


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos-dir", type=Path, default=REPO / "data" / "photos",
                    help="what `make photos` wrote: full/*.jpg and split.json")
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, metavar="N",
                    help="photos: the 4 validation photos, then training photos up to N (default %(default)s)")
    ap.add_argument("--photo", action="append", default=[], metavar="NAME",
                    help="archive this photo of full/ (repeatable; replaces --count's selection)")
    ap.add_argument("--megapixels", type=float, default=DEFAULT_MEGAPIXELS,
                    help="size of each demo copy in MP, aspect kept (default %(default)s, at least 1.0)")
    ap.add_argument("--min-megapixels", type=float, default=MIN_MEGAPIXELS, help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                    help="model name or directory (default: the shipped mini, else tiny with random weights)")
    ap.add_argument("--per-shard", type=int, default=None, metavar="N",
                    help="photos per shard (default: spread over the actors)")
    ap.add_argument("--num-actors", type=int, default=None, metavar="N",
                    help="Ray worker actors (default: one per core)")
    ap.add_argument("--perceptual", default="none", metavar="LIST",
                    help="audit's perceptual metrics when their weights exist: lpips,dists,fid or none (default)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "demo", metavar="DIR",
                    help="photos cache, copied outputs and report/ (default: outputs/demo)")
    bars = ap.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_true", default=None, help="always draw bars")
    bars.add_argument("--no-progress", dest="progress", action="store_false", help="never draw bars")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jobs.commands.audit import parse_perceptual

    try:
        perceptual = parse_perceptual(args.perceptual)
    except argparse.ArgumentTypeError as exc:
        print(f"--perceptual: {exc}", file=sys.stderr)
        return 2
    if args.megapixels < args.min_megapixels:
        print(f"--megapixels must be >= {args.min_megapixels} (the demo archives real-size photos)", file=sys.stderr)
        return 2
    full_dir = args.photos_dir / "full"
    if not (args.photos_dir / "split.json").exists() or not full_dir.is_dir():
        print(f"no photos in {args.photos_dir}; run `make photos` first", file=sys.stderr)
        return 2
    # split.json as tools/photos.py writes it (read here directly: `tools` is not an installed package)
    split = json.loads((args.photos_dir / "split.json").read_text(encoding="utf-8"))
    names = select_photos(split, args.count, args.photo)
    missing = [n for n in names if not (full_dir / n).is_file()]
    if not names or missing:
        print(f"photos not found in {full_dir}: {missing or 'none selected'}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    quiet_worker_warnings()

    # 1. model
    steps.say(f"1/{TOTAL_STEPS} model: loading")
    if args.model:
        model, model_desc = args.model, args.model
        from rdeic_core.codec import resolve_model_path

        model = str(resolve_model_path(model))
    else:
        model, model_desc = default_model(out)
    facts = model_facts(model, model_desc)
    steps.say(f"    {model_desc}: {facts['parameters'].split(' (')[0]} parameters, "
              f"S = {facts['decoder steps S (relay sampler)']}")

    # 2. photos
    steps.say(f"2/{TOTAL_STEPS} photos: {len(names)} at ~{args.megapixels} MP from {full_dir}")
    photo_dir = out / "photos"
    photos = []
    for name in names:
        photos.append(prepare_photo(full_dir / name, photo_dir / f"{Path(name).stem}.png", args.megapixels,
                                    args.min_megapixels))
    splits = {n: ("validation" if n in split["validation"] else "train" if n in split["train"] else "")
              for n in names}
    n_val = sum(1 for s in splits.values() if s == "validation")
    steps.say(f"    {n_val} validation (never trained on) + {len(names) - n_val} training photos ready in "
              f"{photo_dir}")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray for the demo
    import ray
    from tqdm.contrib.logging import logging_redirect_tqdm

    from demo.local_s3 import local_s3
    from jobs.commands.archive import ArchiveJob, run_archive
    from jobs.commands.archive import format_summary as archive_text
    from jobs.commands.audit import AuditConfigError, AuditJob, run_audit
    from jobs.commands.audit import format_summary as audit_text
    from jobs.commands.restore import RestoreConfigError, RestoreJob, run_restore
    from jobs.commands.restore import format_summary as restore_text
    from jobs.logs import progress_sink

    started_ray = False
    # The S3 server first: it puts its credentials into the environment, which Ray's workers inherit.
    with local_s3() as s3, logging_redirect_tqdm():
        try:
            if not ray.is_initialized():  # one Ray for the three jobs (else each starts and stops its own)
                ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                         logging_level=logging.WARNING)
                started_ray = True
            resources = ray.cluster_resources()
            actors = args.num_actors or max(1, int(resources.get("GPU", 0) or resources.get("CPU", 1)))
            per_shard = args.per_shard or math.ceil(len(photos) / actors)
            steps.say(f"    Ray {'started' if started_ray else 'in use'}: {resources.get('CPU', 0):g} CPU(s), "
                      f"{resources.get('GPU', 0):g} GPU(s); S3 at {s3.endpoint}")

            # 3. shards
            steps.say(f"3/{TOTAL_STEPS} shards: {len(photos)} photos, {per_shard} per shard, to embedded S3")
            fs = s3.make_bucket(BUCKET)
            shards = build_shards(photos, per_shard)
            keys: dict[str, str] = {}  # archive key -> photo name
            for i, data in enumerate(shards):
                fs.pipe(f"{BUCKET}/shards/demo-{i:06d}.tar", data)
                for p, name in list(zip(photos, names))[i * per_shard:(i + 1) * per_shard]:
                    keys[f"demo-{i:06d}/{sample_key(p)}"] = name
            pattern = f"s3://{BUCKET}/shards/demo-{{000000..{len(shards) - 1:06d}}}.tar"
            steps.say(f"    {len(shards)} shard(s), {sum(map(len, shards)):,} bytes: {pattern}")
            common: dict[str, Any] = {"model": model, "executor": "ray", "num_actors": args.num_actors,
                                      "storage_options": s3.storage_options, "progress": args.progress}

            # 4. archive
            steps.say(f"4/{TOTAL_STEPS} archive: encoding on {actors} Ray actor(s)")
            archive_url = f"s3://{BUCKET}/archive"
            archived = run_archive(ArchiveJob(inputs=(pattern,), output=archive_url, **common),
                                   progress_sink(args.progress))
            print(archive_text(archived.summary), flush=True)
            copy_out(fs, f"{BUCKET}/archive", out / "archive")
            steps.say(f"    archive done in {archived.summary['seconds']:.1f}s; copy in {out / 'archive'}")

            # 5. restore
            steps.say(f"5/{TOTAL_STEPS} restore: decoding the archive to PNGs")
            try:
                restored = run_restore(RestoreJob(archive=archive_url, output=f"s3://{BUCKET}/restored",
                                                  format="folder", **common), progress_sink(args.progress))
                print(restore_text(restored.summary), flush=True)
                restore_summary, restore_code = restored.summary, restored.exit_code
                copy_out(fs, f"{BUCKET}/restored", out / "restored")
            except RestoreConfigError as exc:
                print(f"restore failed: {exc}", file=sys.stderr)
                restore_summary, restore_code = failed_summary(str(exc)), 1
            steps.say(f"    restore done in {restore_summary['seconds']:.1f}s; PNGs in {out / 'restored'}")

            # 6. audit
            steps.say(f"6/{TOTAL_STEPS} audit: decoding again, measuring against the sources")
            try:
                audited = run_audit(AuditJob(archive=archive_url, sources=(pattern,), output=f"s3://{BUCKET}/audit",
                                             fraction=1.0, perceptual=perceptual, **common),
                                    progress_sink(args.progress))
                print(audit_text(audited.summary), flush=True)
                audit_summary, audit_report, audit_code = audited.run_summary, audited.summary, audited.exit_code
                copy_out(fs, f"{BUCKET}/audit", out / "audit")
            except AuditConfigError as exc:
                print(f"audit failed: {exc}", file=sys.stderr)
                audit_summary, audit_report, audit_code = failed_summary(str(exc)), {}, 1
            steps.say(f"    audit done in {audit_summary['seconds']:.1f}s; output in {out / 'audit'}")
        finally:
            if started_ray:
                ray.shutdown()

    # 7. report
    steps.say(f"7/{TOTAL_STEPS} report: JPEG/WebP at the nearest rate, images, plot")
    summaries = {"archive": archived.summary, "restore": restore_summary, "audit": audit_summary,
                 "audit_report": audit_report}
    (out / "summary.json").write_text(json.dumps(summaries, indent=2, default=str) + "\n")
    report_path = make_report(out, names, photos, splits, keys, facts, summaries, perceptual, steps)
    steps.say(f"    done: {len(names)} photos in {steps.elapsed():.0f}s")
    print(f"report: {report_path}")
    print(f"open it: xdg-open {report_path}   (or: python -m http.server -d {report_path.parent} 8000, "
          f"then http://127.0.0.1:8000/report.html)")
    return next((c for c in (archived.exit_code, restore_code, audit_code) if c), 0)


def make_report(out: Path, names: list[str], photos: list[Path], splits: dict[str, str], keys: dict[str, str],
                facts: dict[str, str], summaries: dict[str, dict[str, Any]], perceptual: tuple[str, ...],
                steps: Steps) -> Path:
    """Gather the copied outputs per photo and hand them to ``demo.report``."""
    from PIL import Image

    from demo.report import DemoReport, build_photo, write_report

    archive_rows = {r["key"]: r for r in read_parquet_dir(out / "archive" / "archive")}
    audit_rows = {r["key"]: r for r in read_parquet_dir(out / "audit" / "metrics")}
    by_name = {v: k for k, v in keys.items()}
    report_dir = out / "report"
    shutil.rmtree(report_dir, ignore_errors=True)
    (report_dir / "img").mkdir(parents=True)
    results, curve_points = [], []
    header_steps = sorted({int(r["steps"]) for r in audit_rows.values() if r.get("steps") is not None})
    default_steps = facts["decoder steps S (relay sampler)"]
    setting = "S=" + (",".join(map(str, header_steps)) if header_steps else default_steps)
    for name, photo in zip(names, photos):
        key = by_name[name]
        with Image.open(photo) as im:
            original = np.asarray(im.convert("RGB"))
        row, audit = archive_rows.get(key), audit_rows.get(key)
        restored_png = out / "restored" / "images" / f"{key}.png"
        failure, restored, rdeic = None, None, None
        if row is None:
            failure = "the archive has no row for this photo"
        elif row["status"] != "ok":
            failure = f"archive job: {row['reason']}: {row['error']}"
        elif not restored_png.is_file():
            failure = "the restore job wrote no image for this key (see its summary)"
        else:
            with Image.open(restored_png) as im:
                restored = np.asarray(im.convert("RGB"))
            measured = audit if audit is not None and audit["status"] == "ok" else {}
            rdeic = {"bitstream_bytes": len(row["bitstream"]),
                     "psnr": measured.get("psnr"), "ms_ssim": measured.get("ms_ssim")}
        result, points = build_photo(name, key, splits[name], original, restored, rdeic, report_dir / "img",
                                     setting=setting, restored_png=restored_png if restored is not None else None,
                                     failure=failure)
        if audit is not None and audit["status"] != "ok":
            result.notes.append(f"audit job: {audit['reason']}: {audit['error']}")
        results.append(result)
        curve_points += points
        rd, jp, wp = (result.method(m) for m in ("RDEIC", "JPEG", "WebP"))
        if rd and jp and wp:
            steps.say(f"    {name}: RDEIC {rd.bpp:.4f} bpp {rd.psnr or 0:.2f} dB | JPEG {jp.setting} {jp.bpp:.4f} bpp "
                      f"{jp.psnr or 0:.2f} dB | WebP {wp.setting} {wp.bpp:.4f} bpp {wp.psnr or 0:.2f} dB")
        else:
            steps.say(f"    {name}: {result.failure}")

    ok_rows = [r for r in archive_rows.values() if r["status"] == "ok"]
    n_bytes = sum(len(r["bitstream"]) for r in ok_rows)
    pixels = sum(int(r["width"]) * int(r["height"]) for r in ok_rows)
    src_bytes = sum(int(r["src_bytes"] or 0) for r in ok_rows)
    parquet_bytes = sum(f.stat().st_size for f in (out / "archive").rglob("*.parquet"))
    audit_means = summaries["audit_report"].get("metrics", {})

    def mean(metric: str, digits: int) -> str:
        value = (audit_means.get(metric) or {}).get("mean")
        return "n/a" if value is None else f"{value:.{digits}f}"

    archive_facts = {
        "photos archived": f"{len(ok_rows)} ok of {len(archive_rows)} rows "
                           f"({sum(1 for s in splits.values() if s == 'validation')} validation, "
                           f"{sum(1 for s in splits.values() if s == 'train')} training)",
        "pixels": f"{pixels:,} ({pixels / 1e6:.2f} MP)",
        "bitstream bytes": f"{n_bytes:,}",
        "mean bpp (all bitstream bytes over all pixels)": f"{8 * n_bytes / max(pixels, 1):.4f}",
        "audit means per image": f"bpp {mean('bpp', 4)}, PSNR {mean('psnr', 2)} dB, MS-SSIM {mean('ms_ssim', 4)}",
        "source PNG bytes": f"{src_bytes:,} ({src_bytes / max(n_bytes, 1):,.0f}x the bitstreams)",
        "Parquet files (with keys, CRCs, metadata)": f"{parquet_bytes:,} bytes",
    }
    jobs = [job_stats(n, summaries[n]) for n in ("archive", "restore", "audit")]
    notes = []
    unavailable = summaries["audit_report"].get("metrics_unavailable") or {}
    if not perceptual:
        notes.append("LPIPS, DISTS and FID were not requested (the demo audits with --perceptual none so it stays "
                     "quick on a CPU); `rdeic audit` computes them when their weights are in the torch hub cache.")
    for metric, files in unavailable.items():
        notes.append(f"{metric}: not computed, weights missing: {'; '.join(files)}")
    notes.append("Original = the demo copy of each photo (data/photos/full scaled with Lanczos, aspect kept), "
                 "stored as lossless PNG: exactly what was archived and what every method is measured against.")
    report = DemoReport(
        title=f"RDEIC archive demo: {len(names)} photos, model {facts['architecture']}",
        model=facts, jobs=jobs, archive=archive_facts, photos=results, notes=notes,
        links={"archive (Parquet)": "../archive/archive/", "restored PNGs": "../restored/images/",
               "audit job's report": "../audit/report.html", "job summaries (JSON)": "../summary.json"})
    return write_report(report_dir, report, curve_points)


if __name__ == "__main__":
    raise SystemExit(main())
