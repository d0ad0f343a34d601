"""`make mini`'s driver (tools/train_mini.py) end to end at one step per stage: every stage runs in
order through `python -m jobs.commands.train`, each rate point gets its own stage 1/2 with the wide control,
model cards are written, and a re-run resumes (re-exports) instead of training again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import train_mini

pytestmark = pytest.mark.slow


def _fingerprint(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text())["fingerprint"]


def test_recipe_runs_every_stage_and_resumes(tmp_path: Path, photos_root: Path) -> None:
    out = tmp_path / "run"
    argv = ["--out-dir", str(out), "--photos-dir", str(photos_root), "--no-install", "--ckpt-every", "1",
            "--steps-vae", "1", "--steps-prior", "1", "--steps-stage1", "1", "--steps-stage2", "1",
            "--rate-point", "lo=1", "--rate-point", "hi=8"]
    assert train_mini.main(argv) == 0
    models = {name: out / name / "stage2" / "model" for name in ("lo", "hi")}
    for name, lam in (("lo", 1), ("hi", 8)):
        meta = json.loads((models[name] / "config.json").read_text())
        assert [s["stage"] for s in meta["training"]["stages"]] == ["vae", "prior", "stage1", "stage2"]
        assert meta["config"]["control"]["ratio"] == 1.0  # --control-ratio 1 at stage 1
        card = (out / name / "README.md").read_text()
        assert f"lambda_g = {lam}" in card and "--control-ratio 1" in card
    assert _fingerprint(models["lo"]) != _fingerprint(models["hi"])
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"vae", "prior", "stage1", "stage2"}

    before = {n: _fingerprint(m) for n, m in models.items()}
    assert train_mini.main(argv) == 0  # every stage finished: resumes, trains nothing, same weights
    assert {n: _fingerprint(m) for n, m in models.items()} == before
    assert json.loads((out / "timings.json").read_text()) == timings
