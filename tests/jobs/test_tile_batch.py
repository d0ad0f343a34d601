"""``--tile-batch`` / ``tile_batch``: the codec's memory bound (``codec.tiling.batch``) on every command
that runs the codec, from the command line or a job spec down to the codec each worker loads."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.cli import main, resolve_args
from jobs.codec import RDEICDecoderFactory, RDEICEncoderFactory, apply_tile_batch
from jobs.commands.archive import ArchiveConfigError, ArchiveJob
from jobs.commands.audit import AuditConfigError, AuditJob
from jobs.commands.encode import load_codec
from jobs.commands.get import GetJob, run_get
from jobs.commands.restore import RestoreConfigError, RestoreJob
from rdeic_core.tiling import TileConfig
from tests.jobs.commands.conftest import write_spec
from tests.pipeline.conftest import TEST_MAX_PIXELS, build_shard_specs

DEFAULT_TILE_BATCH = TileConfig().batch

# The smallest command line of each command that runs the codec (nothing is run: only parsed).
COMMANDS: dict[str, list[str]] = {
    "encode": ["encode", "in.png"],
    "decode": ["decode", "in.rde"],
    "archive": ["archive", "--input", "a.tar", "--output", "/o"],
    "restore": ["restore", "--archive", "/a", "--output", "/o"],
    "audit": ["audit", "--archive", "/a", "--source", "a.tar", "--output", "/o"],
    "get": ["get", "/a", "shard/key", "-o", "x.png"],
    "evaluate": ["evaluate", "--images", "/imgs"],
}
SPEC_KINDS = {"archive": "input: [a.tar]\n  output: /o\n",
              "restore": "archive: /a\n  output: /o\n",
              "audit": "archive: /a\n  source: a.tar\n  output: /o\n"}


# ------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("command", COMMANDS)
def test_every_codec_command_parses_tile_batch(command: str) -> None:
    args, status = resolve_args([*COMMANDS[command], "--tile-batch", "3"])
    assert status is None and args is not None and args.tile_batch == 3
    args, status = resolve_args(COMMANDS[command])
    assert status is None and args is not None and args.tile_batch is None  # None: keep the codec's default


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_tile_batch_below_one_is_refused_with_a_clear_message(command: str, value: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        resolve_args([*COMMANDS[command], "--tile-batch", value])
    assert info.value.code == 2
    shown = repr(value) if value == "two" else value
    assert f"argument --tile-batch: expected an integer >= 1, got {shown}" in capsys.readouterr().err


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_tile_batch_is_a_spec_key_and_the_flag_wins(kind: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "s.yaml", f"{kind}:\n  {SPEC_KINDS[kind]}  tile_batch: 2\n")
    args, status = resolve_args([kind, "--config", str(spec)])
    assert status is None and args is not None and args.tile_batch == 2
    args, _ = resolve_args([kind, "--config", str(spec), "--tile-batch", "5"])
    assert args is not None and args.tile_batch == 5  # CLI > YAML
    # the resolved settings (--print-config, job.yaml) carry the key and load back as a valid spec
    assert main([kind, "--config", str(spec), "--print-config"]) == 0
    resolved = write_spec(tmp_path / "resolved.yaml", capsys.readouterr().out)
    args, status = resolve_args([kind, "--config", str(resolved)])
    assert status is None and args is not None and args.tile_batch == 2

    bad = write_spec(tmp_path / "bad.yaml", f"{kind}:\n  {SPEC_KINDS[kind]}  tile_batch: 0\n")
    assert main([kind, "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"rdeic {kind}: error: {kind}.tile_batch: expected int >= 1, got 0"


def test_jobs_and_factories_refuse_a_tile_batch_below_one(tmp_path: Path) -> None:
    with pytest.raises(ArchiveConfigError, match="--tile-batch must be >= 1, got 0"):
        ArchiveJob(inputs=("a.tar",), output="/o", tile_batch=0)
    with pytest.raises(RestoreConfigError, match="--tile-batch must be >= 1, got -1"):
        RestoreJob(archive="/a", output="/o", tile_batch=-1)
    with pytest.raises(AuditConfigError, match="--tile-batch must be >= 1, got 0"):
        AuditJob(archive="/a", sources=("a.tar",), output="/o", tile_batch=0)
    with pytest.raises(ValueError, match="--tile-batch must be >= 1, got 0"):
        run_get(GetJob(archive=str(tmp_path), key="s/k", output=str(tmp_path / "x.png"), tile_batch=0))
    with pytest.raises(ValueError, match="--tile-batch must be an integer >= 1, got 0"):
        RDEICEncoderFactory("mini", tile_batch=0)
    with pytest.raises(ValueError, match="--tile-batch must be an integer >= 1"):
        RDEICDecoderFactory("mini", None, -3)


# ------------------------------------------------------------------------------------ into the codec
def test_the_factories_and_load_codec_set_tiling_batch_only(tiny_model_dir: Path) -> None:
    codec = load_codec(str(tiny_model_dir), "cpu")
    default = codec.tiling
    assert default.batch == DEFAULT_TILE_BATCH
    assert apply_tile_batch(codec, None).tiling == default
    for factory in (RDEICEncoderFactory(str(tiny_model_dir), None, 3), RDEICDecoderFactory(str(tiny_model_dir),
                                                                                          tile_batch=3)):
        factory = pickle.loads(pickle.dumps(factory))  # as shipped to a Ray worker
        codec = factory.load("cpu").codec
        assert codec.tiling == dataclasses.replace(default, batch=3)  # the tile grid is untouched
    assert load_codec(str(tiny_model_dir), "cpu", 1).tiling == dataclasses.replace(default, batch=1)


class _Seen:
    """``tiling.batch`` of the codec in every encode/decode call (the real methods still run)."""

    def __init__(self) -> None:
        self.encode: list[int] = []
        self.decode: list[int] = []

    def take(self) -> tuple[set[int], set[int]]:
        out = set(self.encode), set(self.decode)
        self.encode.clear()
        self.decode.clear()
        return out


@pytest.fixture(scope="module")
def seen() -> Iterator[_Seen]:
    from rdeic_core import RDEICCodec

    record = _Seen()
    encode, decode = RDEICCodec.encode, RDEICCodec.decode

    def spy_encode(self: Any, *a: Any, **kw: Any) -> Any:
        record.encode.append(self.tiling.batch)
        return encode(self, *a, **kw)

    def spy_decode(self: Any, *a: Any, **kw: Any) -> Any:
        record.decode.append(self.tiling.batch)
        return decode(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RDEICCodec, "encode", spy_encode)
        mp.setattr(RDEICCodec, "decode", spy_decode)
        yield record


def test_encode_and_decode_commands_run_the_codec_with_the_tile_batch(tmp_path: Path, small_photo_paths: list[Path],
                                                                     tiny_model_dir: Path, seen: _Seen,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    stream = tmp_path / "p.rde"
    base = ["--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(["encode", str(small_photo_paths[0]), "-o", str(stream), *base, "--tile-batch", "2"]) == 0
    assert seen.take() == ({2}, set())
    assert main(["decode", str(stream), "-o", str(tmp_path / "p.png"), *base, "--steps", "0", "--tile-batch", "3"]) == 0
    assert seen.take() == (set(), {3})
    assert main(["decode", str(stream), "-o", str(tmp_path / "q.png"), *base, "--steps", "0"]) == 0
    assert seen.take() == (set(), {DEFAULT_TILE_BATCH})

    images = tmp_path / "images"
    images.mkdir()
    (images / "p.png").write_bytes(small_photo_paths[0].read_bytes())
    assert main(["evaluate", "--images", str(images), "--model", str(tiny_model_dir), "--steps", "0",
                 "--jpeg-qualities", "50", "--webp-qualities", "50", "--out", str(tmp_path / "rd"),
                 "--tile-batch", "5"]) == 0
    assert seen.take() == ({5}, {5})
    capsys.readouterr()


def test_archive_restore_audit_get_run_every_worker_codec_with_the_tile_batch(
        tmp_path: Path, small_photo_paths: list[Path], tiny_model_dir: Path, seen: _Seen,
        capsys: pytest.CaptureFixture[str]) -> None:
    spec = build_shard_specs(small_photo_paths, n_shards=1, photos_per_shard=2, with_hostile=False)[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"{spec.name}.tar").write_bytes(spec.tar_bytes())
    archive = tmp_path / "archive"
    common = ["--executor", "local", "--device", "cpu", "--no-progress"]
    yaml_spec = write_spec(tmp_path / "archive.yaml",
                           f"archive:\n  input: [{tmp_path / 'in' / '*.tar'}]\n  output: {archive}\n"
                           f"  model: {tiny_model_dir}\n  max_pixels: {TEST_MAX_PIXELS}\n  tile_batch: 2\n")
    assert main(["--log-level", "WARNING", "archive", "--config", str(yaml_spec), *common]) == 0
    assert seen.take() == ({2}, set())
    assert "tile_batch: 2" in (archive / "job.yaml").read_text()  # the resolved spec records it

    assert main(["--log-level", "WARNING", "restore", "--archive", str(archive), "--output", str(tmp_path / "r"),
                 "--steps", "0", "--tile-batch", "3", *common]) == 0
    assert seen.take() == (set(), {3})

    assert main(["--log-level", "WARNING", "audit", "--archive", str(archive), "--source",
                 str(tmp_path / "in" / "*.tar"), "--output", str(tmp_path / "audit"), "--perceptual", "none",
                 "--steps", "0", "--tile-batch", "4", *common]) == 0
    assert seen.take() == (set(), {4})

    key = f"{spec.name}/{spec.samples[0][0]}"
    assert main(["--log-level", "WARNING", "get", str(archive), key, "-o", str(tmp_path / "one.png"),
                 "--steps", "0", "--device", "cpu", "--tile-batch", "1"]) == 0
    assert seen.take() == (set(), {1})
    assert main(["--log-level", "WARNING", "get", str(archive), key, "-o", str(tmp_path / "two.png"),
                 "--steps", "0", "--device", "cpu"]) == 0
    assert seen.take() == (set(), {DEFAULT_TILE_BATCH})
    capsys.readouterr()
