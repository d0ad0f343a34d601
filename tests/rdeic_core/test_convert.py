"""Checkpoint loading/conversion: official layout, strict key accounting, safe loading, parity."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

PARITY_DIR = Path(__file__).resolve().parent / "parity"
LAYOUT_SEED = 20240521


def official_layout() -> list[dict]:
    """Key names, shapes and file of every tensor of the scaled-down reference model (made by its own code)."""
    return json.loads((PARITY_DIR / "official_layout.json").read_text())["tensors"]


def official_weights(seed: int = LAYOUT_SEED) -> dict[str, torch.Tensor]:
    """Deterministic random values for the official layout (each key seeded by its name).

    Buffers (schedule, compressai scalars, VQ statistics) take the reference's
    own values; everything else is random with fan-in scaling, so no output is
    trivially zero (the zero convs and scale_list are random too).
    """
    from safetensors.torch import load_file

    buffers = load_file(str(PARITY_DIR / "official_buffers.safetensors"))
    out = {}
    for e in official_layout():
        key, shape = e["key"], tuple(e["shape"])
        if key in buffers:
            out[key] = buffers[key].clone()
            continue
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**62))
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) >= 2:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("bias"):
            out[key] = 0.05 * noise
        else:  # norm weights, scale_list, logit_scale
            out[key] = 1.0 + 0.1 * noise
    return out


# ---------------------------------------------------------------------------- fixtures
import argparse  # noqa: E402
import hashlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from rdeic_core import RDEICCodec  # noqa: E402
from rdeic_core.checkpoints import (  # noqa: E402
    ArchHints,
    CheckpointError,
    UnsafeCheckpointError,
    build_codec,
    keymap,
    openclip_text,
)

# The numbers the shapes of the scaled-down layout do not show (its head widths).
HINTS = ArchHints(unet_head_channels=32, control_head_channels=16, text_heads=2, image_size=128)
PARITY_ATOL = 1e-4
RECON_MIN_PSNR_DB = 60.0


def _split(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The SD file's keys and the RDEIC file's keys, as the layout records them."""
    files = {e["key"]: e["file"] for e in official_layout()}
    sd = {k: v for k, v in weights.items() if files[k] == "sd"}
    rd = {k: v for k, v in weights.items() if files[k] == "rdeic"}
    return sd, rd


def _save_lightning(path: Path, state: dict[str, torch.Tensor], **extra) -> Path:
    torch.save({"state_dict": state, "epoch": 7, "global_step": 1000, "pytorch-lightning_version": "1.5.0",
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
                "lr_schedulers": [], **extra}, path)
    return path


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return official_weights()


@pytest.fixture(scope="module")
def files(weights, tmp_path_factory) -> dict[str, Path]:
    """An SD 2.1-style single file and an RDEIC Lightning checkpoint in the official layout."""
    d = tmp_path_factory.mktemp("official")
    sd, rd = _split(weights)
    rd = {**rd, "perceptual_loss.net.lin0.model.1.weight": torch.randn(1, 8, 1, 1)}  # stage-2 checkpoints carry LPIPS
    return {"sd": _save_lightning(d / "v2-1_tiny.ckpt", sd), "rdeic": _save_lightning(d / "rdeic_2_step2.ckpt", rd)}


@pytest.fixture(scope="module")
def built(files):
    torch.set_num_threads(1)
    return build_codec(files["sd"], files["rdeic"], hints=HINTS)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY_DIR / "reference_outputs.safetensors"))


def _rdeic_variant(tmp_path: Path, weights, edit) -> Path:
    _, rd = _split(weights)
    rd = dict(rd)
    edit(rd)
    return _save_lightning(tmp_path / "rdeic_variant.ckpt", rd)


# ---------------------------------------------------------------------------- official layout
def test_official_layout_loads_with_zero_unexplained_keys(built, weights, files):
    codec, report = built
    own = codec.state_dict()
    mapped_total = 0
    for acc in report.files:
        assert acc.unexplained == []
        for src_key, ours in acc.mapped.items():  # every mapped value really is the source tensor
            got, want = own[ours], weights[src_key]
            assert torch.equal(got.reshape(-1), want.reshape(-1).to(got.dtype)), (src_key, ours)
        mapped_total += len(acc.mapped)
    sd_acc, rd_acc = report.files
    assert set(rd_acc.rebuilt) == {f"preprocess_model.gaussian_conditional.{b}" for b in keymap.CDF_BUFFERS}
    assert rd_acc.ignored == {"perceptual_loss.net.lin0.model.1.weight": "LPIPS training loss of stage-2 fine-tuning"}
    assert "alphas_cumprod" in sd_acc.ignored and "logvar" in sd_acc.ignored
    assert len(sd_acc.context) == 4 + 12 * 3  # embeddings + ln_final + 12 tensors per block, 3 blocks
    assert sd_acc.set_aside["optimizer_states"].startswith("optimizer state")
    # every tensor of ours came from the files (or is rebuilt / the context)
    filled = {ours for acc in report.files for ours in acc.mapped.values()}
    assert {k for k in own if k not in filled} == {
        "context", *(f"compression.gaussian_conditional.{b}" for b in keymap.CDF_BUFFERS)}
    assert mapped_total == len(filled)
    # sizes came from the shapes
    cfg = codec.config
    assert cfg.unet["block_out_channels"] == [64, 128, 128, 128] and cfg.unet["cross_attention_dim"] == 32
    assert cfg.control.ratio == 0.5 and cfg.compression.M == 64 and cfg.compression.cc_hidden == (28, 16)
    assert cfg.schedule.default_steps == 2 and report.rate_point == {"lambda_g": "2", "steps": 2}
    assert report.files[0].source.sha256 == hashlib.sha256(files["sd"].read_bytes()).hexdigest()


def test_cdf_tables_are_rebuilt_whatever_the_checkpoint_stored(tmp_path, weights, built):
    """Safetensors inputs, old compressai names, garbage CDF content: the same model as the clean checkpoint.

    The tables are recomputed (update(force=True), as the reference does after
    loading), so even the fingerprint, which covers them, is unchanged.
    """
    sd, rd = _split(weights)
    rd = dict(rd)
    for b in ("_quantized_cdf", "_offset", "_cdf_length"):
        del rd[f"preprocess_model.gaussian_conditional.{b}"]
    rd["preprocess_model.gaussian_conditional.quantized_cdf"] = torch.randint(0, 9, (5, 7), dtype=torch.int32)
    rd["preprocess_model.gaussian_conditional.offset"] = torch.zeros(5, dtype=torch.int32)
    rd["preprocess_model.gaussian_conditional.cdf_length"] = torch.full((5,), 7, dtype=torch.int32)
    rd["preprocess_model.gaussian_conditional.scale_table"] = torch.ones(5)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "sd.safetensors"))
    save_file({k: v.contiguous() for k, v in rd.items()}, str(tmp_path / "rdeic_2_step2.safetensors"))
    codec, report = build_codec(tmp_path / "sd.safetensors", tmp_path / "rdeic_2_step2.safetensors", hints=HINTS,
                                hash_files=False)
    assert ["preprocess_model.gaussian_conditional.quantized_cdf",
            "preprocess_model.gaussian_conditional._quantized_cdf"] in [list(p) for p in report.compressai_renames]
    assert len(report.files[1].rebuilt) == 4
    assert codec.compression.gaussian_conditional._quantized_cdf.shape[0] == 64
    assert codec.compression.entropy_table_digest() == built[0].compression.entropy_table_digest()
    assert codec.fingerprint == built[0].fingerprint


def test_compressai_entropy_bottleneck_renames():
    from compressai.entropy_models import EntropyBottleneck

    eb = EntropyBottleneck(4)
    old = {}
    for k, v in eb.state_dict().items():  # compressai < 1.2 names: _matrix0, _bias0, _factor0
        for new, prefix in (("matrices.", "_matrix"), ("biases.", "_bias"), ("factors.", "_factor")):
            if k.startswith(new):
                k = prefix + k[len(new):]
        old[f"entropy_bottleneck.{k}"] = v
    assert "entropy_bottleneck._matrix0" in old
    norm, renames = keymap.normalize_compressai_keys(old)
    assert ("entropy_bottleneck._matrix0", "entropy_bottleneck.matrices.0") in renames
    fresh = EntropyBottleneck(4)
    fresh.load_state_dict({k[len("entropy_bottleneck."):]: v for k, v in norm.items()}, strict=True)
    with pytest.raises(CheckpointError, match="both present"):
        keymap.normalize_compressai_keys({"m._matrix0": torch.zeros(1), "m.matrices.0": torch.zeros(1)})


# ---------------------------------------------------------------------------- loud failures
def test_renamed_key_fails_listing_both_names(tmp_path, weights, files):
    old = "control_model.control_model.input_blocks.1.0.in_layers.0.weight"
    new = "control_model.control_model.input_blocks.1.0.in_layers.0.gamma"

    def edit(rd):
        rd[new] = rd.pop(old)
    with pytest.raises(CheckpointError) as e:
        build_codec(files["sd"], _rdeic_variant(tmp_path, weights, edit), hints=HINTS, hash_files=False)
    msg = str(e.value)
    assert "tensors mapped to names our model does not have" in msg
    assert f"{new} -> noise_estimator.control.input_blocks.1.0.norm1.gamma" in msg
    assert "left unfilled" in msg and "noise_estimator.control.input_blocks.1.0.norm1.weight" in msg


def test_unknown_key_fails_as_unexplained(tmp_path, weights, files):
    def edit(rd):
        rd["some_new_module.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexplained tensors in rdeic file(.|\n)*some_new_module\.weight"):
        build_codec(files["sd"], _rdeic_variant(tmp_path, weights, edit), hints=HINTS, hash_files=False)


def test_missing_key_fails_listing_our_parameter(tmp_path, weights, files):
    def edit(rd):
        del rd["preprocess_model.entropy_parameters_anchor.3.fusion.2.bias"]
        del rd["control_model.dec_zero_convs_out.4.0.weight"]
    with pytest.raises(CheckpointError) as e:
        build_codec(files["sd"], _rdeic_variant(tmp_path, weights, edit), hints=HINTS, hash_files=False)
    msg = str(e.value)
    assert "left unfilled (2)" in msg
    assert "compression.entropy_parameters_anchor.3.fusion.2.bias" in msg
    assert "noise_estimator.dec_zero_convs_out.4.0.weight" in msg


def test_misshaped_key_names_key_and_both_shapes(tmp_path, weights, files):
    key = "control_model.enc_zero_convs_out.2.0.weight"  # [64, 32, 1, 1]

    def edit(rd):
        rd[key] = torch.zeros(64, 16, 1, 1)
    with pytest.raises(CheckpointError) as e:
        build_codec(files["sd"], _rdeic_variant(tmp_path, weights, edit), hints=HINTS, hash_files=False)
    assert (f"{key} -> noise_estimator.enc_zero_convs_out.2.0.weight: checkpoint (64, 16, 1, 1) vs model "
            "(64, 32, 1, 1)") in str(e.value)


def test_missing_unet_key_in_sd_file_fails(tmp_path, weights):
    sd, rd = _split(weights)
    sd = dict(sd)
    del sd["model.diffusion_model.output_blocks.5.2.conv.weight"]  # an upsampler
    with pytest.raises(CheckpointError,
                       match=r"left unfilled(.|\n)*noise_estimator\.unet\.up_blocks\.1\.upsamplers\.0\.conv\.weight"):
        build_codec(_save_lightning(tmp_path / "sd.ckpt", sd), _save_lightning(tmp_path / "rd.ckpt", rd),
                    hints=HINTS, hash_files=False)


def test_other_diffusion_schedule_is_refused(tmp_path, weights):
    sd, rd = _split(weights)
    sd = {**sd, "alphas_cumprod": sd["alphas_cumprod"] * 0.99}
    with pytest.raises(CheckpointError, match="alphas_cumprod differs"):
        build_codec(_save_lightning(tmp_path / "sd.ckpt", sd), _save_lightning(tmp_path / "rd.ckpt", rd),
                    hints=HINTS, hash_files=False)


# ---------------------------------------------------------------------------- safe loading
class _NotATensor:
    def __reduce__(self):  # would run on an unsafe load
        return (print, ("pickled code ran",))


def test_pickle_with_a_non_tensor_object_is_refused(tmp_path, weights, files):
    _, rd = _split(weights)
    bad = tmp_path / "rdeic_hparams.ckpt"
    torch.save({"state_dict": rd, "hyper_parameters": {"cfg": _NotATensor()}}, bad)
    with pytest.raises(UnsafeCheckpointError) as e:
        build_codec(files["sd"], bad, hints=HINTS, hash_files=False)
    msg = str(e.value)
    assert "refusing to unpickle" in msg and "print" in msg and "weights.safetensors" in msg


def test_non_tensor_state_dict_entry_and_unknown_tensor_entry_are_refused(tmp_path, weights, files):
    _, rd = _split(weights)
    p = tmp_path / "a.ckpt"
    torch.save({"state_dict": {**rd, "control_model.note": "hello"}}, p)
    with pytest.raises(CheckpointError, match=r"not tensors \(1\): \{'control_model.note': 'str'\}"):
        build_codec(files["sd"], p, hints=HINTS, hash_files=False)
    torch.save({"state_dict": rd, "ema_weights": {"x": torch.zeros(2)}}, p)
    with pytest.raises(CheckpointError, match="top-level entry 'ema_weights' holds 1 tensor"):
        build_codec(files["sd"], p, hints=HINTS, hash_files=False)


# ---------------------------------------------------------------------------- parity with the reference
def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.float() - b.float()).abs().max())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


@torch.no_grad()
def test_parity_compression_round_trip(built, golden):
    codec = built[0]
    x = (golden["image"].float() / 255.0).permute(2, 0, 1)[None]
    feat = codec.vae.encode_features(x * 2.0 - 1.0)
    assert _maxdiff(feat, golden["feat"]) <= PARITY_ATOL
    (item,) = codec.compression.compress(feat)
    # same symbols, same CDF tables, same order: the reference's rANS bytes exactly
    assert item.y_string == bytes(golden["y_string"].numpy())
    c_latent, guide_hint = codec.compression.decompress([item.y_string], [item.z_bytes], item.z_shape,
                                                        [item.y_hat_crc32])
    assert _maxdiff(c_latent, golden["c_latent"]) <= PARITY_ATOL
    assert _maxdiff(guide_hint, golden["guide_hint"]) <= PARITY_ATOL


@torch.no_grad()
def test_parity_context_and_noise_estimator(built, golden):
    codec = built[0]
    assert _maxdiff(codec.context, golden["context"]) <= PARITY_ATOL  # our OpenCLIP forward vs open_clip's
    ne = codec.noise_estimator
    for t in (299, 150):
        eps = ne(golden["x_t"], t, golden["context"], golden["guide_hint"])
        assert _maxdiff(eps, golden[f"eps_{t}"]) <= PARITY_ATOL
        assert _maxdiff(ne.forward_unconditional(golden["x_t"], t, golden["context"]),
                        golden[f"eps_uncond_{t}"]) <= PARITY_ATOL
    # the control branch matters on these weights, so the comparison above is not vacuous
    assert _maxdiff(golden["eps_299"], golden["eps_uncond_299"]) > 10 * PARITY_ATOL


@pytest.mark.parametrize("tag,steps,detail_scale", [("s2", 2, 1.0), ("s5", 5, 1.0), ("s2_ds15", 2, 1.5)])
@torch.no_grad()
def test_parity_reconstruction(built, golden, tag, steps, detail_scale):
    codec = built[0]
    z = codec.reconstruct_latent(golden["c_latent"], golden["guide_hint"], steps, detail_scale,
                                 golden[f"{tag}_start_noise"], list(golden[f"{tag}_step_noise"]))
    assert _maxdiff(z, golden[f"{tag}_latent"]) <= PARITY_ATOL
    if f"{tag}_image_float" in golden:
        img = ((codec.vae.decode(z) + 1.0) / 2.0).clamp(0.0, 1.0)
        assert _psnr(img, golden[f"{tag}_image_float"]) >= RECON_MIN_PSNR_DB


# ---------------------------------------------------------------------------- context
def test_context_from_a_provided_tensor(tmp_path, files, built):
    ctx = torch.randn(77, 32)
    save_file({"context": ctx}, str(tmp_path / "ctx.safetensors"))
    codec, report = build_codec(files["sd"], files["rdeic"], context=tmp_path / "ctx.safetensors", hints=HINTS,
                                hash_files=False)
    assert torch.equal(codec.context, ctx[None])
    assert report.context["from"] == "tensor file" and report.files[0].context == []
    reason = report.files[0].ignored["cond_stage_model.model.token_embedding.weight"]
    assert reason.startswith("text encoder")
    torch.save(torch.randn(1, 77, 16), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"context: shape \(1, 77, 16\) vs model \(1, 77, 32\)"):
        build_codec(files["sd"], files["rdeic"], context=tmp_path / "bad.pt", hints=HINTS, hash_files=False)


def test_no_text_encoder_and_no_context_is_an_error(tmp_path, weights):
    sd, rd = _split(weights)
    sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="no empty-prompt context"):
        build_codec(_save_lightning(tmp_path / "sd.ckpt", sd), _save_lightning(tmp_path / "rd.ckpt", rd),
                    hints=HINTS, hash_files=False)


def test_openclip_tokens_and_layers(weights):
    tokens = openclip_text.tokenize_empty(77)
    assert tokens[0, :2].tolist() == [49406, 49407] and int(tokens[0, 2:].abs().sum()) == 0
    oc = {k[len(keymap.TEXT_PREFIX):]: v for k, v in weights.items() if k.startswith(keymap.TEXT_PREFIX)}
    tower = openclip_text.tower_from_openclip(oc, heads=2)
    pen = openclip_text.empty_prompt_context(tower, "penultimate")
    last = openclip_text.empty_prompt_context(tower, "last")
    assert pen.shape == (1, 77, 32) and _maxdiff(pen, last) > 1e-3
    # HF CLIPTextModel layout with the last block dropped (diffusers' SD 2.x export) gives the same embedding
    hf = {
        "text_model.embeddings.token_embedding.weight": oc["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": oc["positional_embedding"],
        "text_model.final_layer_norm.weight": oc["ln_final.weight"],
        "text_model.final_layer_norm.bias": oc["ln_final.bias"],
    }
    leaves = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(len(tower.blocks) - 1):
        b = f"transformer.resblocks.{i}."
        for ours, theirs in leaves.items():
            for kind in ("weight", "bias"):
                hf[f"text_model.encoder.layers.{i}.{theirs}.{kind}"] = oc[f"{b}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", oc[f"{b}attn.in_proj_{kind}"].chunk(3)):
                hf[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part
    converted, used = openclip_text.openclip_from_hf_clip(hf)
    assert used == set(hf)
    hf_tower = openclip_text.tower_from_openclip(converted, heads=2)
    assert torch.equal(openclip_text.empty_prompt_context(hf_tower, "last"), pen)


def test_diffusers_folder_sd_input(tmp_path, built, files):
    """A diffusers-format SD folder (vae/, unet/, text_encoder/) gives the same model as the LDM file."""
    codec = built[0]
    root = tmp_path / "sd21-diffusers"
    codec.vae.vae.save_pretrained(root / "vae")
    codec.noise_estimator.unet.save_pretrained(root / "unet")
    sd = torch.load(files["sd"], weights_only=True)["state_dict"]
    oc = {k[len(keymap.TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(keymap.TEXT_PREFIX)}
    hf = {"text_model.embeddings.token_embedding.weight": oc["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": oc["positional_embedding"],
          "text_model.final_layer_norm.weight": oc["ln_final.weight"],
          "text_model.final_layer_norm.bias": oc["ln_final.bias"],
          "text_model.embeddings.position_ids": torch.arange(77)[None]}
    for i in range(2):  # 3 OpenCLIP blocks, the last dropped
        b = f"transformer.resblocks.{i}."
        for ours, theirs in {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}.items():
            for kind in ("weight", "bias"):
                hf[f"text_model.encoder.layers.{i}.{theirs}.{kind}"] = oc[f"{b}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", oc[f"{b}attn.in_proj_{kind}"].chunk(3)):
                hf[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part.contiguous()
    (root / "text_encoder").mkdir()
    save_file(hf, str(root / "text_encoder" / "model.safetensors"))
    (root / "text_encoder" / "config.json").write_text(json.dumps(
        {"num_attention_heads": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "num_hidden_layers": 2}))
    other, report = build_codec(root, files["rdeic"], hints=HINTS, hash_files=False)
    assert all(not f.unexplained for f in report.files)
    assert report.files[2].ignored == {"text_model.embeddings.position_ids":
                                       "text encoder tensor not used by the empty-prompt forward"}
    a, b = codec.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- CLI + round trip
def _cli(argv: list[str]) -> int:
    from jobs.commands import convert as job

    parser = argparse.ArgumentParser()
    job.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


def test_convert_save_from_pretrained_round_trip(tmp_path, files, built, capsys):
    out = tmp_path / "model"
    hints = [f"{k}={v}" for k, v in (("unet_head_channels", 32), ("control_head_channels", 16), ("text_heads", 2),
                                      ("image_size", 128))]
    argv = ["--sd", str(files["sd"]), "--rdeic", str(files["rdeic"]), "-o", str(out)]
    for h in hints:
        argv += ["--hint", h]
    assert _cli(argv) == 0
    assert "tensors mapped" in capsys.readouterr().out
    loaded = RDEICCodec.from_pretrained(out)
    codec = built[0]
    assert loaded.fingerprint == codec.fingerprint
    assert loaded.config.to_dict() == codec.config.to_dict()
    card = (out / "README.md").read_text()
    for p in files.values():
        assert hashlib.sha256(p.read_bytes()).hexdigest() in card
    meta = json.loads((out / "config.json").read_text())
    assert {s["role"] for s in meta["conversion"]["sources"]} == {"sd", "rdeic"}
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["files"][1]["rebuilt"] and not any(f.get("unexplained") for f in report["files"])
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (stream,) = loaded.encode([image], seed=1)
    assert codec.encode([image], seed=1) == [stream]
    # a second run refuses to overwrite, a broken input exits 1 with the key list on stderr
    assert _cli(argv) == 2
    assert _cli(argv + ["--force", "--config", "tiny"]) == 1  # an explicit config that does not fit
    assert "shape mismatches" in capsys.readouterr().err
    assert _cli(argv + ["--force", "--hint", "unet_head_channels=48"]) == 1
    assert "not a multiple of the head width 48" in capsys.readouterr().err
