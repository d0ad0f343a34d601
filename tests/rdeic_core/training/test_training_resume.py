"""Checkpoint/resume: a run interrupted after a checkpoint and resumed gives the same next-step losses
and the same final weights as an uninterrupted run; a resume with other options is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from rdeic_core import RDEICCodec
from rdeic_core.training import TrainConfig, train
from rdeic_core.training.trainer import list_checkpoints, read_log

LOSS_KEYS = ("loss", "l_simple", "l_guide", "l_bpp", "l_vq", "q_bpp", "grad_norm")


def _cfg(run_dir, photos, steps, **kw) -> TrainConfig:
    base = dict(stage="stage1", run_dir=str(run_dir), config="tiny", steps=steps, batch=1, crop=64,
                photos_dir=str(photos), seed=7, log_every=1, ckpt_every=2, max_side=256, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_matches_an_uninterrupted_run(tmp_path, mini_photos_dir):
    straight = train(_cfg(tmp_path / "a", mini_photos_dir, steps=3))
    assert [r["step"] for r in straight.history] == [1, 2, 3]

    # run 3 steps, then lose what came after the step-2 checkpoint (as a crash before step 3's save would)
    train(_cfg(tmp_path / "b", mini_photos_dir, steps=3))
    ckpts = list_checkpoints(tmp_path / "b")
    assert [s for s, _ in ckpts] == [2, 3]
    shutil.rmtree(ckpts[-1][1])
    shutil.rmtree(tmp_path / "b" / "model")
    resumed = train(_cfg(tmp_path / "b", mini_photos_dir, steps=3))
    assert resumed.start_step == 2
    assert [r["step"] for r in resumed.history] == [3]

    a3, b3 = straight.history[-1], resumed.history[-1]
    for k in LOSS_KEYS:
        assert a3[k] == b3[k], f"{k}: uninterrupted {a3[k]!r} vs resumed {b3[k]!r}"
    # the log holds each step once (the pre-crash step-3 line was dropped)
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3]
    # identical final weights
    fa = json.loads((straight.model_dir / "config.json").read_text())["fingerprint"]
    fb = json.loads((resumed.model_dir / "config.json").read_text())["fingerprint"]
    assert fa == fb


def test_export_is_a_loadable_model_with_training_history(tmp_path, mini_photos_dir):
    res = train(_cfg(tmp_path / "r", mini_photos_dir, steps=1, lambda_g=0.5))
    codec = RDEICCodec.from_pretrained(res.model_dir)
    meta = json.loads((res.model_dir / "config.json").read_text())
    (entry,) = meta["training"]["stages"]
    assert entry["stage"] == "stage1" and entry["lambda_g"] == 0.5 and entry["steps"] == 1
    assert set(entry["final_terms"]) >= {"loss", "l_bpp", "l_vq"}
    start = RDEICCodec.from_config("tiny", seed=7)
    assert codec.fingerprint != start.fingerprint  # trained weights, refreshed identity
    # the next stage starts from it and extends the history
    res2 = train(_cfg(tmp_path / "s2", mini_photos_dir, steps=1, stage="stage2", init=str(res.model_dir),
                      config="tiny", ckpt_every=1, perceptual="ms-ssim"))
    meta2 = json.loads((res2.model_dir / "config.json").read_text())
    assert [s["stage"] for s in meta2["training"]["stages"]] == ["stage1", "stage2"]
    assert meta2["training"]["stages"][-1]["perceptual_loss"] == "ms-ssim-dssim"
    assert next(read_log(tmp_path / "s2"))["perceptual"] == "ms-ssim-dssim"


def test_resume_with_different_options_is_refused(tmp_path, mini_photos_dir):
    train(_cfg(tmp_path / "c", mini_photos_dir, steps=1, ckpt_every=1))
    with pytest.raises(ValueError, match="lambda_g"):
        train(_cfg(tmp_path / "c", mini_photos_dir, steps=2, ckpt_every=1, lambda_g=0.1))
    # more steps (and other logging) is fine
    res = train(_cfg(tmp_path / "c", mini_photos_dir, steps=2, ckpt_every=1, log_every=5))
    assert res.start_step == 1 and res.end_step == 2


def test_resume_accepts_the_same_init_spelled_relative_or_absolute(tmp_path, monkeypatch):
    """`make mini` passes an absolute --init, a user re-running by hand a relative one: same directory."""
    from rdeic_core.training.trainer import _check_resume_config

    (tmp_path / "prev" / "model").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    stored = TrainConfig(stage="stage1", run_dir=str(run), init=str(tmp_path / "prev" / "model"))
    (run / "train_config.json").write_text(json.dumps(stored.to_dict()))
    monkeypatch.chdir(tmp_path)
    _check_resume_config(run, TrainConfig(stage="stage1", run_dir="run", init="prev/model"))
    _check_resume_config(run, TrainConfig(stage="stage1", run_dir="run", init="./prev/../prev/model"))
    with pytest.raises(ValueError, match="init"):
        _check_resume_config(run, TrainConfig(stage="stage1", run_dir="run", init="other"))


def _vae_cfg(run_dir, photos, steps, **kw) -> TrainConfig:
    return _cfg(run_dir, photos, steps, stage="vae", ema_decay=0.9, ssim_weight=0.0, **kw)


def test_ema_weights_are_exported_and_survive_a_resume(tmp_path, mini_photos_dir):
    """--ema-decay: the exported model holds the average, not the last step's weights, and a run
    resumed from a checkpoint ends with the same average as an uninterrupted one."""
    import torch

    straight = train(_vae_cfg(tmp_path / "a", mini_photos_dir, steps=3))
    ckpt = torch.load(list_checkpoints(tmp_path / "a")[-1][1] / "state.pt", weights_only=False)
    last_step = ckpt["model"]["vae.vae.decoder.conv_out.weight"]
    exported = RDEICCodec.from_pretrained(straight.model_dir).state_dict()["vae.vae.decoder.conv_out.weight"]
    assert ckpt["ema"]["updates"] == 3
    assert not torch.equal(last_step, exported)
    meta = json.loads((straight.model_dir / "config.json").read_text())
    assert meta["training"]["stages"][-1]["ema_decay"] == 0.9

    train(_vae_cfg(tmp_path / "b", mini_photos_dir, steps=3))
    ckpts = list_checkpoints(tmp_path / "b")
    shutil.rmtree(ckpts[-1][1])
    shutil.rmtree(tmp_path / "b" / "model")
    resumed = train(_vae_cfg(tmp_path / "b", mini_photos_dir, steps=3))
    assert resumed.start_step == 2
    fa = json.loads((straight.model_dir / "config.json").read_text())["fingerprint"]
    fb = json.loads((resumed.model_dir / "config.json").read_text())["fingerprint"]
    assert fa == fb


def test_logvar_init_sets_the_starting_posterior_and_only_for_a_fresh_vae(tmp_path, mini_photos_dir):
    from rdeic_core.training.trainer import build_codec

    cfg = _cfg(tmp_path / "l", mini_photos_dir, steps=1, stage="vae", logvar_init=-8.0).resolved()
    codec = build_codec(cfg)
    bias = codec.vae.vae.quant_conv.bias.detach()
    c = codec.config.latent_channels
    assert bool((bias[c:] == -8.0).all()) and not bool((bias[:c] == -8.0).any())
    with pytest.raises(ValueError, match="logvar_init"):
        _cfg(tmp_path / "m", mini_photos_dir, steps=1, stage="vae", logvar_init=-8.0, init=str(tmp_path)).resolved()
    with pytest.raises(ValueError, match="ema_decay"):
        _cfg(tmp_path / "n", mini_photos_dir, steps=1, stage="stage1", ema_decay=0.9).resolved()
    with pytest.raises(ValueError, match="train_vae_decoder"):
        _cfg(tmp_path / "o", mini_photos_dir, steps=1, stage="stage1", train_vae_decoder=True).resolved()


def test_a_run_from_before_an_option_existed_resumes_at_its_default(tmp_path, mini_photos_dir):
    """train_config.json of an older trainer lacks the fields added since: they were at their defaults."""
    cfg = dict(stage="vae", ssim_weight=0.0, ckpt_every=1)
    train(_cfg(tmp_path / "d", mini_photos_dir, steps=1, **cfg))
    path = tmp_path / "d" / "train_config.json"
    stored = json.loads(path.read_text())
    for key in ("lowfreq_weight", "ema_decay", "logvar_init"):
        del stored[key]
    path.write_text(json.dumps(stored))
    res = train(_cfg(tmp_path / "d", mini_photos_dir, steps=2, **cfg))
    assert res.start_step == 1
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="lowfreq_weight: stored 0.0 vs now 1.0"):
        train(_cfg(tmp_path / "d", mini_photos_dir, steps=3, lowfreq_weight=1.0, **cfg))
