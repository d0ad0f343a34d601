"""``rdeic train`` / ``python -m jobs.commands.train``: argument wiring, the result model, error exit codes."""

from __future__ import annotations

import argparse
import json

from jobs.commands import train as train_job
from rdeic_core import RDEICCodec


def test_register_adds_the_train_subcommand():
    parser = argparse.ArgumentParser(prog="rdeic")
    sub = parser.add_subparsers(dest="command")
    train_job.register(sub)
    args = parser.parse_args(["train", "--stage", "stage2", "--run-dir", "r", "--init", "m", "--fixed-step", "5",
                              "--lambda-g", "0.25", "--scale-range", "0.4,0.5", "--crop", "128"])
    cfg = train_job.config_from_args(args)
    assert (cfg.stage, cfg.init, cfg.fixed_step, cfg.lambda_g, cfg.scale_range, cfg.crop) == \
        ("stage2", "m", 5, 0.25, (0.4, 0.5), 128)
    assert args.func is train_job.main_from_args
    assert train_job.add_parser is train_job.register  # the name jobs/cli.py looks up


def test_vae_stage_from_the_command_line(tmp_path, mini_photos_dir, capsys):
    run = tmp_path / "vae"
    rc = train_job.main(["--stage", "vae", "--config", "tiny", "--run-dir", str(run), "--steps", "2",
                         "--batch", "1", "--crop", "64", "--photos-dir", str(mini_photos_dir), "--max-side", "256",
                         "--log-every", "1", "--ckpt-every", "2", "--no-progress", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model in" in out and "l_rec=" in out
    records = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {"l_rec", "l_kl", "l_ssim", "loss", "lr", "s_per_step", "grad_norm"} <= set(records[0])
    codec = RDEICCodec.from_pretrained(run / "model")
    meta = json.loads((run / "model" / "config.json").read_text())
    stage = meta["training"]["stages"][-1]
    # the VAE stage calibrates the latent scale (SD's 0.18215 was chosen the same way)
    assert stage["scaling_factor"] == codec.config.scaling_factor == codec.vae.scaling_factor
    assert abs(stage["scaling_factor"] * stage["latent_std"] - 1) < 1e-9
    stored = json.loads((run / "train_config.json").read_text())
    assert stored["stage"] == "vae" and stored["lr"] == 1e-4 and stored["scale_range"] == [0.8, 1.0]


def test_configuration_errors_exit_2(tmp_path, mini_photos_dir, capsys):
    rc = train_job.main(["--stage", "stage1", "--run-dir", str(tmp_path / "x"), "--crop", "96",
                         "--photos-dir", str(mini_photos_dir), "--no-progress"])
    assert rc == 2
    assert "multiple of 64" in capsys.readouterr().err
    rc = train_job.main(["--stage", "prior", "--run-dir", str(tmp_path / "y"), "--crop", "64",
                         "--photos-dir", str(tmp_path / "nophotos"), "--no-progress", "--steps", "1"])
    assert rc == 2
    assert "make photos" in capsys.readouterr().err
