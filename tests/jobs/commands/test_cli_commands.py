"""The `rdeic` entry point: --help everywhere, and encode/decode of single files with the real tiny codec."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import SUBCOMMAND_HELP, SUBCOMMANDS, main
from tests.jobs.commands.conftest import REPO_ROOT

ISSUE_COMMANDS = ("encode", "decode", "archive", "restore", "audit", "status", "get", "inspect", "convert",
                  "evaluate", "submit", "job")


def test_console_script_and_command_list() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rdeic": "jobs.cli:main"}
    assert set(ISSUE_COMMANDS) <= set(SUBCOMMANDS) and set(SUBCOMMANDS) == set(SUBCOMMAND_HELP)
    # `rdeic --help` in a fresh interpreter lists every command and imports neither torch nor ray
    code = ("import sys; from jobs.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'heavy import'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert f"    {name} " in out.stdout


def _module_present(name: str) -> bool:
    try:
        importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == SUBCOMMANDS[name]:
            return False
        raise
    return True


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    if _module_present(name):
        assert info.value.code == 0
        assert f"usage: rdeic {name}" in capsys.readouterr().out
    else:  # a command whose module is not in this installation says so instead of a traceback
        assert str(info.value.code) == f"rdeic {name}: not available in this installation (no module jobs.{name})"


def test_job_subcommands_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("status", "logs", "stop", "list"):
        with pytest.raises(SystemExit) as info:
            main(["job", action, "--help"])
        assert info.value.code == 0 and f"rdeic job {action}" in capsys.readouterr().out


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: rdeic" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ encode / decode
def test_encode_decode_round_trip_matches_the_library(tmp_path: Path, tiny_model_dir: Path,
                                                      small_photo_paths: list[Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from rdeic_core import RDEICCodec

    torch.set_num_threads(1)
    src = small_photo_paths[0]
    rde, png = tmp_path / "x.rde", tmp_path / "x.png"
    assert main(["encode", str(src), "-o", str(rde), "--model", str(tiny_model_dir), "--steps", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    stream = rde.read_bytes()
    w, h = Image.open(src).size
    assert f"({w}x{h} RGB) -> {rde}: {len(stream)} bytes, {8 * len(stream) / (w * h):.4f} bpp" in out

    codec = RDEICCodec.from_pretrained(tiny_model_dir)
    pixels = np.asarray(Image.open(src).convert("RGB"))
    assert stream == codec.encode([pixels], steps=1)[0]  # the command adds nothing to the library's bytes

    assert main(["decode", str(rde), "-o", str(png), "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    assert f"-> {png}: {w}x{h}, 1 step(s)" in capsys.readouterr().out
    decoded = np.asarray(Image.open(png))
    assert decoded.shape == (h, w, 3)
    np.testing.assert_array_equal(decoded, codec.decode([stream])[0])

    # --steps overrides the header; default output name is IN with .png
    assert main(["decode", str(rde), "--model", str(tiny_model_dir), "--steps", "0", "--device", "cpu"]) == 0
    assert "0 step(s)" in capsys.readouterr().out and (tmp_path / "x.png").is_file()


def test_encode_and_decode_refuse_bad_input(tmp_path: Path, tiny_model_dir: Path, other_model_dir: Path,
                                            small_photo_paths: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    assert main(["encode", str(text), "--model", str(tiny_model_dir)]) == 1
    assert "is not a usable image (not_an_image)" in capsys.readouterr().err
    assert main(["encode", str(tmp_path / "missing.png"), "--model", str(tiny_model_dir)]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["encode", str(small_photo_paths[0]), "--model", str(tmp_path / "no-model")]) == 2
    assert "--model" in capsys.readouterr().err

    assert main(["decode", str(text), "--model", str(tiny_model_dir)]) == 1
    assert "is not a valid RDEIC bitstream" in capsys.readouterr().err
    rde = tmp_path / "a.rde"
    assert main(["encode", str(small_photo_paths[1]), "-o", str(rde), "--model", str(tiny_model_dir)]) == 0
    capsys.readouterr()
    truncated = tmp_path / "cut.rde"
    truncated.write_bytes(rde.read_bytes()[:-5])
    assert main(["decode", str(truncated), "--model", str(tiny_model_dir)]) == 1
    assert "is not a valid RDEIC bitstream" in capsys.readouterr().err
    assert main(["decode", str(rde), "--model", str(other_model_dir)]) == 1
    assert "was written by model" in capsys.readouterr().err
    assert main(["decode", str(rde), "-o", str(tmp_path / "x.unknownext"), "--model", str(tiny_model_dir)]) == 2
    assert "cannot tell an image format" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["encode", str(rde), "--steps", "-1"])
    assert info.value.code == 2
