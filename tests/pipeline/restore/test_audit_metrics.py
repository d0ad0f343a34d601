"""``rdeic audit`` on real photos: metrics equal independent computations on the same pairs; LPIPS,
DISTS and FID/KID run from (random-init) weights the test writes into a temporary torch hub cache;
without weights their columns are null and the missing files are named, with the network blocked."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.commands.audit import AuditJob, run_audit
from pipeline.audit import sampled
from pipeline.metrics import frechet_distance, kernel_inception_distance, ms_ssim_window
from tests.pipeline.conftest import build_shard_specs
from tests.pipeline.restore.conftest import AuditRun, LocalArchive, block_network, damage_archive, source_image

WEIGHT_NAMES = ("alexnet-owt-7be5be79.pth", "lpips_alex_v0.1.pth", "vgg16-397923af.pth", "dists_alpha_beta.pt",
                "pt_inception-2015-12-05-6726825d.pth")


def _metrics(out: Path) -> dict[str, dict]:
    return {r["key"]: r for p in sorted((out / "metrics").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def _independent_psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / err))


def _independent_window(h: int, w: int) -> int | None:
    """The documented fallback, restated: 11 px when the short side exceeds 160, else the largest odd
    window with (window - 1) * 16 < short side; none below 3 px."""
    side = min(h, w)
    fits = [win for win in (11, 9, 7, 5, 3) if (win - 1) * 16 < side]
    return fits[0] if fits else None


def test_psnr_and_ms_ssim_equal_independent_computations(audit_without_weights: AuditRun,
                                                        local_archive: LocalArchive, codec) -> None:
    from pytorch_msssim import ms_ssim

    table = _metrics(audit_without_weights.output)
    ok_rows = local_archive.ok_rows()
    assert sorted(table) == sorted(ok_rows)  # fraction 1: every archived key audited, nothing else
    photos = [k for k in ok_rows if k.split("/")[1].startswith("photo")]
    assert len(photos) == 6
    for key in photos:
        row, arch = table[key], ok_rows[key]
        original = source_image(local_archive, key)
        decoded = codec.decode([arch["bitstream"]])[0]
        assert row["status"] == "ok" and row["bpp"] == pytest.approx(arch["bpp"], rel=1e-6)
        assert row["psnr"] == pytest.approx(_independent_psnr(original, decoded), abs=1e-9)
        win = _independent_window(*original.shape[:2])
        assert row["ms_ssim_win"] == win
        x = torch.tensor(original, dtype=torch.float32).permute(2, 0, 1)[None]
        y = torch.tensor(decoded, dtype=torch.float32).permute(2, 0, 1)[None]
        want = float(ms_ssim(x, y, data_range=255, win_size=win, size_average=False)[0])
        assert row["ms_ssim"] == pytest.approx(want, abs=1e-6)
        assert row["lpips"] is None and row["dists"] is None and row["fid_patches"] is None
    windows = {table[k]["ms_ssim_win"] for k in photos}
    assert 9 in windows  # the 144/160-px photos need the fallback window
    tiny = table["shard-000001/one_pixel"]
    assert tiny["status"] == "ok" and tiny["ms_ssim"] is None and tiny["ms_ssim_win"] is None and tiny["psnr"] > 0

    summary = audit_without_weights.outcome.summary
    psnrs = [table[k]["psnr"] for k in table]
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(float(np.mean(psnrs)))
    assert summary["metrics"]["psnr"]["n"] == len(table) and summary["images"]["failed"] == 0
    assert summary["ms_ssim_windows"] == {str(k) if k else "none": v for k, v in
                                          _count(table[k]["ms_ssim_win"] for k in table).items()}
    saved = json.loads((audit_without_weights.output / "summary.json").read_text())
    assert saved["metrics"] == summary["metrics"]


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def test_missing_weights_give_null_columns_and_name_every_missing_file(audit_without_weights: AuditRun) -> None:
    summary = audit_without_weights.outcome.summary
    ckpt = audit_without_weights.checkpoints
    missing = summary["metrics_unavailable"]
    assert set(missing) == {"lpips", "dists", "fid"}
    text = json.dumps(missing)
    for name in WEIGHT_NAMES:
        assert str(ckpt / name) in text, name
    assert summary["metrics"]["lpips"]["n"] == 0 and summary["metrics"]["dists"]["mean"] is None
    assert summary["fid"]["fid"] is None and "not found" in summary["fid"]["note"]
    html = (audit_without_weights.output / "report.html").read_text()
    for name in WEIGHT_NAMES:
        assert name in html
    assert not (audit_without_weights.output / "features").exists()


def _write_random_backbones(ckpt: Path) -> None:
    """Random-init weights in the standard files' layouts (what torchvision / lpips / DISTS_pytorch /
    pytorch-fid ship), written into the temporary hub cache."""
    from torchvision.models import alexnet
    from torchvision.models.inception import Inception3
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    torch.save(alexnet(weights=None).state_dict(), ckpt / "alexnet-owt-7be5be79.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * 0.1 for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lins, ckpt / "lpips_alex_v0.1.pth")
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()},
               ckpt / "vgg16-397923af.pth")
    torch.save({"alpha": torch.rand(1, 1475, 1, 1) + 0.05, "beta": torch.rand(1, 1475, 1, 1) + 0.05},
               ckpt / "dists_alpha_beta.pt")
    inception = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    # default init fades to ~1e-8 by pool3, which would make every FID ~0: calibrate the batch-norm
    # statistics on one random batch so each layer's output has unit scale and features vary
    for m in inception.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        inception.train()(torch.rand(2, 3, 299, 299) * 2 - 1)
    torch.save(inception.state_dict(), ckpt / "pt_inception-2015-12-05-6726825d.pth")


def test_lpips_dists_fid_kid_run_from_weights_in_the_hub_cache(tmp_path: Path, hub_dir: Path,
                                                             small_photo_paths: list[Path], codec_model_dir: Path,
                                                             codec, monkeypatch: pytest.MonkeyPatch) -> None:
    from perceptual import PerceptualMetrics, find_weights
    from tests.pipeline.conftest import Expect, encode_image
    from tests.pipeline.restore.conftest import write_archive

    specs = build_shard_specs(small_photo_paths[14:], n_shards=1, photos_per_shard=3, with_hostile=False)
    small = Image.open(small_photo_paths[14]).convert("RGB").resize((48, 24))
    specs[0].add("small", {"png": encode_image(small, "PNG")}, Expect("ok"))  # 24 px: below AlexNet's reach
    archive = write_archive(tmp_path / "a", specs, codec_model_dir)
    _write_random_backbones(hub_dir)
    assert all(s.available for s in find_weights().values())
    block_network(monkeypatch)
    job = AuditJob(archive=str(archive.archive), sources=(archive.pattern,), output=str(tmp_path / "out"),
                   executor="local", batch_size=1, fid_patch=128, worst_k=3)
    outcome = run_audit(job)
    summary = outcome.summary
    assert outcome.exit_code == 0 and summary["metrics_unavailable"] == {}
    table = _metrics(tmp_path / "out")
    assert len(table) == 4
    assert table["shard-000000/small"]["lpips"] is None and table["shard-000000/small"]["dists"] is None
    assert table["shard-000000/small"]["fid_patches"] == 0

    nets = PerceptualMetrics.load("cpu", fid_patch=128)  # the same files, loaded again by the test
    rows = archive.ok_rows()
    for key in ("shard-000000/photo000", "shard-000000/photo001", "shard-000000/photo002"):
        row = table[key]
        assert row["lpips"] > 0 and 0 < row["dists"] < 1
        h, w = row["height"], row["width"]
        assert row["fid_patches"] == (h // 128) * (w // 128) + ((h - 64) // 128) * ((w - 64) // 128)
    key = "shard-000000/photo000"
    original = source_image(archive, key)
    decoded = codec.decode([rows[key]["bitstream"]])[0]
    assert table[key]["lpips"] == pytest.approx(nets.lpips(original, decoded), rel=1e-5)
    assert table[key]["dists"] == pytest.approx(nets.dists(original, decoded), rel=1e-5)
    assert nets.lpips(original, original) == pytest.approx(0.0, abs=1e-7)
    assert nets.dists(original, original) == pytest.approx(0.0, abs=1e-5)

    features = np.load(tmp_path / "out" / "features" / "shard-000000.npz")
    assert len(features["original"]) == len(features["decoded"]) == sum(r["fid_patches"] for r in table.values())
    fid = summary["fid"]
    assert fid["patches"] == len(features["original"]) >= 4
    assert fid["fid"] == pytest.approx(frechet_distance(features["original"], features["decoded"]), rel=1e-9)
    assert features["original"].std(axis=0).mean() > 0.1  # features that vary between patches
    assert fid["fid"] > 1.0
    assert frechet_distance(features["original"], features["original"]) == pytest.approx(0, abs=1e-6)
    # KID is an unbiased estimate: with a handful of patches and random backbones it may be negative,
    # so check it is the estimator applied to the stored features, not its sign
    assert np.isfinite(fid["kid_mean"]) and fid["kid_std"] >= 0
    n_sub = min(len(features["original"]), 1000)
    assert fid["kid_mean"] == pytest.approx(
        kernel_inception_distance(features["original"], features["decoded"], 100, n_sub, job.seed)[0], rel=1e-9)
    assert summary["metrics"]["lpips"]["n"] == summary["metrics"]["dists"]["n"] == 3
    html = (tmp_path / "out" / "report.html").read_text()
    assert "All metrics ran" in html and "hist_lpips.png" in html and "hist_dists.png" in html
    shutil.rmtree(tmp_path / "a")


def test_frechet_distance_matches_scipy_sqrtm_and_kid_is_unbiased() -> None:
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(scale=0.5, size=(16, 16)) + 0.3
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    want = float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(s_a + s_b - 2 * covmean))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    same = kernel_inception_distance(a, rng.normal(size=(400, 16)), subsets=20, subset_size=200)
    apart = kernel_inception_distance(a, b, subsets=20, subset_size=200)
    assert abs(same[0]) < 0.05 < apart[0]


def test_ms_ssim_window_rule() -> None:
    assert [ms_ssim_window(s, 500) for s in (1, 32, 33, 64, 65, 96, 97, 128, 129, 160, 161, 4000)] == \
        [None, None, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11]
    for side in range(1, 300):
        assert ms_ssim_window(side, side) == _independent_window(side, side)


def test_fraction_samples_keys_by_hash_and_failures_are_reported(
        tmp_path: Path, small_photo_paths: list[Path], codec_model_dir: Path, other_model_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main
    from tests.pipeline.restore.conftest import write_archive

    specs = build_shard_specs(small_photo_paths[8:], n_shards=1, photos_per_shard=8, with_hostile=False)
    archive = write_archive(tmp_path / "a", specs, codec_model_dir)
    keys = sorted(archive.ok_rows())
    chosen = [k for k in keys if int.from_bytes(hashlib.sha256(f"7:{k}".encode()).digest()[:8], "big") < 0.5 * 2**64]
    assert 0 < len(chosen) < len(keys) and chosen == [k for k in keys if sampled(k, 0.5, 7)]
    argv = ["--log-level", "WARNING", "audit", "--archive", str(archive.archive), "--source", archive.pattern,
            "--executor", "local", "--no-progress", "--perceptual", "none", "--fid-patch", "128"]
    assert main([*argv, "--output", str(tmp_path / "half"), "--fraction", "0.5", "--seed", "7"]) == 0
    capsys.readouterr()
    assert sorted(_metrics(tmp_path / "half")) == chosen

    damage_archive(archive, other_model_dir, {"shard-000000/photo000": "crc_mismatch",
                                              "shard-000000/photo001": "corrupt_bitstream",
                                              "shard-000000/photo002": "foreign_model"})
    spec = specs[0]
    samples = dict(spec.samples)
    edited = [(k, m) for k, m in spec.samples if k != "photo003"]  # photo003 removed from the source
    changed = Image.open(io.BytesIO(samples["photo004"]["png"])).convert("RGB").rotate(180)
    buf = io.BytesIO()
    changed.save(buf, "PNG")
    edited = [(k, {**m, "png": buf.getvalue()} if k == "photo004" else m) for k, m in edited]
    from tests.pipeline.conftest import tar_of

    (archive.root / "in" / "shard-000000.tar").write_bytes(tar_of(edited))
    assert main([*argv, "--output", str(tmp_path / "full")]) == 0
    out = capsys.readouterr().out
    table = _metrics(tmp_path / "full")
    failures = {k: r["reason"] for k, r in table.items() if r["status"] != "ok"}
    assert failures == {"shard-000000/photo000": "crc_mismatch", "shard-000000/photo001": "corrupt_bitstream",
                        "shard-000000/photo002": "foreign_model", "shard-000000/photo003": "source_missing",
                        "shard-000000/photo004": "source_changed"}
    assert all(table[k]["psnr"] is None for k in failures)
    assert sum(r["status"] == "ok" for r in table.values()) == 3
    assert "corrupt_bitstream=1, crc_mismatch=1, foreign_model=1, source_changed=1, source_missing=1" in out
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert sorted(summary["failed_keys"]) == sorted(failures)
    html = (tmp_path / "full" / "report.html").read_text()
    assert all(k in html for k in failures) and "crc_mismatch" in html
    shutil.rmtree(tmp_path / "a")
