"""Official SD 2.1 + RDEIC checkpoints -> an ``RDEICCodec`` model directory.

    codec, report = build_codec("v2-1_512-ema-pruned.ckpt", "rdeic_2_step2.ckpt")
    convert("v2-1_512-ema-pruned.ckpt", "rdeic_2_step2.ckpt", "models/rdeic-2-step2")
    codec = RDEICCodec.from_pretrained("models/rdeic-2-step2")

The reference loads ``sd = load(ckpt_sd); sd.update(load(ckpt_cc))`` with
``strict=False`` and then ``preprocess_model.update(force=True)``. We keep its
semantics (the RDEIC file wins where both files hold a key; CDF tables are
rebuilt) but not its silence: every source tensor must be mapped, rebuilt,
used for the context or ignored by a named rule, every tensor of ours must be
filled, and every shape must match, or the conversion stops with one error
that lists all problems (see docs/weights.md).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import _SD21_UNET, _SD21_VAE, CodecConfig, get_config
from ..schedule import alphas_cumprod as schedule_alphas_cumprod
from . import infer, keymap, openclip_text
from .errors import CheckpointError
from .infer import ArchHints
from .keymap import KeyMap
from .loader import (
    DiffusersComponent,
    LoadedCheckpoint,
    SourceFile,
    is_diffusers_folder,
    load_checkpoint,
    load_context_file,
    load_diffusers_component,
)

if TYPE_CHECKING:
    from ..codec import RDEICCodec

MODEL_CARD = "README.md"
REPORT_FILE = "conversion_report.json"
MAX_LISTED = 40  # keys shown per problem kind in an error message (the report file has them all)
SCHEDULE_ATOL = 1e-6


# ---------------------------------------------------------------------------- report
@dataclass
class FileAccount:
    """What happened to every tensor of one input file."""

    source: SourceFile
    mapped: dict[str, str] = field(default_factory=dict)  # source key -> our key
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> reason
    rebuilt: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    config: list[str] = field(default_factory=list)  # read as config values (scale_factor)
    overridden: list[str] = field(default_factory=list)  # mapped, but the RDEIC file's value won
    unexplained: list[str] = field(default_factory=list)
    set_aside: dict[str, str] = field(default_factory=dict)  # top-level Lightning entries
    set_aside_tensors: int = 0

    def summary(self) -> dict[str, Any]:
        reasons: dict[str, int] = defaultdict(int)
        for r in self.ignored.values():
            reasons[r] += 1
        return {
            **self.source.to_dict(),
            "tensors_mapped": len(self.mapped),
            "tensors_overridden_by_rdeic_file": len(self.overridden),
            "tensors_rebuilt": len(self.rebuilt),
            "tensors_used_for_context": len(self.context),
            "tensors_read_as_config": len(self.config),
            "tensors_ignored": dict(sorted(reasons.items())),
            "non_weight_entries_set_aside": self.set_aside,
            "tensors_in_set_aside_entries": self.set_aside_tensors,
        }

    def full(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "mapped": self.mapped,
            "ignored": self.ignored,
            "rebuilt": self.rebuilt,
            "context": self.context,
            "config": self.config,
            "overridden": self.overridden,
        }


@dataclass
class ConversionReport:
    files: list[FileAccount]
    config: CodecConfig
    config_source: str  # "inferred from tensor shapes" / "explicit" / "diffusers config.json"
    hints: ArchHints
    context: dict[str, Any]
    compressai_renames: list[tuple[str, str]] = field(default_factory=list)
    overridden_differing: list[str] = field(default_factory=list)
    rate_point: dict[str, Any] | None = None

    @property
    def sources(self) -> list[SourceFile]:
        out = [f.source for f in self.files]
        if self.context.get("source"):
            out.append(self.context["source"])
        return out

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        ctx = {k: (v.to_dict() if isinstance(v, SourceFile) else v) for k, v in self.context.items()}
        return {
            "files": [f.full() if full else f.summary() for f in self.files],
            "config_source": self.config_source,
            "hints": self.hints.to_dict(),
            "context": ctx,
            "compressai_renames": [list(p) for p in self.compressai_renames],
            "overridden_differing": self.overridden_differing,
            "rate_point": self.rate_point,
        }


# ---------------------------------------------------------------------------- sources
@dataclass
class _Sources:
    sd_ckpt: LoadedCheckpoint | None  # LDM single file
    sd_parts: dict[str, DiffusersComponent]  # diffusers folder: vae, unet[, text_encoder]
    rdeic: LoadedCheckpoint

    def accounts(self) -> list[tuple[FileAccount, dict[str, torch.Tensor]]]:
        out = []
        if self.sd_ckpt is not None:
            out.append((FileAccount(self.sd_ckpt.source, set_aside=self.sd_ckpt.set_aside,
                                    set_aside_tensors=self.sd_ckpt.set_aside_tensors), self.sd_ckpt.tensors))
        for part in self.sd_parts.values():
            c = part.checkpoint
            out.append((FileAccount(c.source, set_aside=c.set_aside, set_aside_tensors=c.set_aside_tensors), c.tensors))
        out.append((FileAccount(self.rdeic.source, set_aside=self.rdeic.set_aside,
                                set_aside_tensors=self.rdeic.set_aside_tensors), self.rdeic.tensors))
        return out


def _load_sources(sd: str | os.PathLike, rdeic: str | os.PathLike, hash_files: bool, want_text: bool) -> _Sources:
    if Path(sd).is_dir():
        if not is_diffusers_folder(sd):
            raise CheckpointError(f"{sd} is a directory but not a diffusers SD folder (needs unet/ and vae/)")
        parts = {n: load_diffusers_component(sd, n, hash_files) for n in ("vae", "unet")}
        if want_text and (Path(sd) / "text_encoder").is_dir():
            parts["text_encoder"] = load_diffusers_component(sd, "text_encoder", hash_files)
        sd_ckpt = None
    else:
        parts = {}
        sd_ckpt = load_checkpoint(sd, role="sd", hash_file=hash_files)
    return _Sources(sd_ckpt=sd_ckpt, sd_parts=parts, rdeic=load_checkpoint(rdeic, role="rdeic", hash_file=hash_files))


# ---------------------------------------------------------------------------- config
def _config_from_json(path: Path) -> CodecConfig:
    d = json.loads(path.read_text())
    if "config" in d and "format" in d:  # a model directory's config.json
        d = d["config"]
    return CodecConfig.from_dict(d)


def _resolve_explicit_config(config: CodecConfig | str | os.PathLike) -> CodecConfig:
    if isinstance(config, CodecConfig):
        config.validate()
        return config
    p = Path(config)
    if p.is_dir() and (p / "config.json").is_file():
        return _config_from_json(p / "config.json")
    if p.is_file():
        return _config_from_json(p)
    return get_config(str(config))


def _diffusers_kwargs(cfg: dict[str, Any], template: dict[str, Any], what: str,
                      optional: tuple[str, ...] = ()) -> dict[str, Any]:
    from ..noise_estimator import _UNSUPPORTED_UNET_OPTIONS

    if what == "unet":
        bad = {k: cfg[k] for k in _UNSUPPORTED_UNET_OPTIONS if cfg.get(k) is not None}
        if bad:
            raise CheckpointError(f"diffusers unet/config.json uses options RDEIC does not support: {bad}")
    out = {k: cfg.get(k, v) for k, v in template.items()}
    for k in optional:
        if cfg.get(k) is not None:
            out[k] = cfg[k]
    return out


def _infer_config(src: _Sources, hints: ArchHints, name: str, context_len: int,
                  default_steps: int) -> tuple[CodecConfig, str]:
    rd = src.rdeic.tensors
    scaling = hints.scaling_factor
    if src.sd_ckpt is not None:
        ldm = {**src.sd_ckpt.tensors, **rd}
        vae = infer.infer_vae(ldm, hints)
        unet = infer.infer_unet(ldm, hints)
        how = "inferred from tensor shapes"
        if "scale_factor" in ldm:
            scaling = float(ldm["scale_factor"])
    else:
        vae = _diffusers_kwargs(src.sd_parts["vae"].config, _SD21_VAE, "vae")
        unet = _diffusers_kwargs(src.sd_parts["unet"].config, _SD21_UNET, "unet",
                                 optional=("time_embedding_dim", "transformer_layers_per_block"))
        scaling = float(vae.get("scaling_factor", scaling))
        how = "diffusers config.json (SD) + inferred from tensor shapes (RDEIC)"
    vae["scaling_factor"] = scaling
    control, hint_ch = infer.infer_control(rd, unet, hints)
    comp = infer.infer_compression(rd)
    cfg = infer.build_config(name, vae, unet, control, comp, hint_ch, context_len, default_steps, scaling)
    return cfg, how


# ---------------------------------------------------------------------------- mapping
def _map_file(tensors: dict[str, torch.Tensor], cfg: CodecConfig, diffusers_part: str | None
              ) -> tuple[KeyMap, list[str], list[tuple[str, str]]]:
    """All mappings that apply to one file -> (map, rebuilt CDF keys, compressai renames)."""
    if diffusers_part == "vae":
        return keymap.map_diffusers_component(tensors, keymap.OUR_VAE), [], []
    if diffusers_part == "unet":
        return keymap.map_diffusers_component(tensors, keymap.OUR_UNET), [], []
    if diffusers_part == "text_encoder":
        return KeyMap(), [], []
    km = KeyMap()
    km.update(keymap.map_ldm_unet(tensors, cfg.unet))
    km.update(keymap.map_ldm_vae(tensors, cfg.vae))
    ctrl, _ = keymap.map_control(tensors)
    km.update(ctrl)
    comp, rebuilt, renames = keymap.map_compression(tensors)
    km.update(comp)
    return km, rebuilt, renames


def _text_tower(src: _Sources,
                hints: ArchHints) -> tuple[openclip_text.TextTower, str, str, list[tuple[int, str]]] | None:
    """(tower, layer, description, [(file index, key used)]) from the inputs' text encoder, if any."""
    files = src.accounts()
    openclip: dict[str, torch.Tensor] = {}
    used: list[tuple[int, str]] = []
    for idx, (_, tensors) in enumerate(files):  # later files (the RDEIC one) win, as in the reference
        part = {k[len(keymap.TEXT_PREFIX):]: (k, v) for k, v in tensors.items() if k.startswith(keymap.TEXT_PREFIX)}
        if part:
            used = [u for u in used if u[1][len(keymap.TEXT_PREFIX):] not in part]
            for short, (k, v) in part.items():
                openclip[short] = v
                used.append((idx, k))
    if openclip:
        keep = openclip_text.openclip_keys_used(openclip)
        used = [u for u in used if u[1][len(keymap.TEXT_PREFIX):] in keep]
        tower = openclip_text.tower_from_openclip(openclip, heads=hints.text_heads or None,
                                                  activation=hints.text_activation)
        return tower, hints.text_layer, "OpenCLIP text tower (cond_stage_model.model.*)", used
    te = src.sd_parts.get("text_encoder")
    if te is None:
        return None
    idx = next(i for i, (acc, _) in enumerate(files) if acc.source is te.checkpoint.source)
    oc, hf_used = openclip_text.openclip_from_hf_clip(te.checkpoint.tensors)
    act = te.config.get("hidden_act", hints.text_activation)
    tower = openclip_text.tower_from_openclip(oc, heads=int(te.config.get("num_attention_heads") or 0) or None,
                                              activation=act)
    tower.eps = float(te.config.get("layer_norm_eps", tower.eps))
    # diffusers' SD 2.x text encoder already lacks OpenCLIP's last block: run all of it.
    return tower, "last", "diffusers text_encoder (HF CLIPTextModel, all layers)", [(idx, k) for k in hf_used]


def _check_schedule(files: list[tuple[FileAccount, dict[str, torch.Tensor]]], cfg: CodecConfig) -> None:
    ours = torch.from_numpy(np.asarray(schedule_alphas_cumprod(cfg.schedule), dtype=np.float32))
    for acc, tensors in files:
        t = tensors.get("alphas_cumprod")
        if t is None:
            continue
        if tuple(t.shape) != tuple(ours.shape) or float((t.float() - ours).abs().max()) > SCHEDULE_ATOL:
            raise CheckpointError(
                f"{acc.source.path}: its alphas_cumprod differs from the SD 2.1 schedule of the config "
                f"(beta {cfg.schedule.beta_start}..{cfg.schedule.beta_end}, {cfg.schedule.num_train_timesteps} steps); "
                "RDEIC's sampler would not match the model")


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {s}" for s in items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _allowed_missing(key: str) -> bool:
    return key == keymap.OUR_CONTEXT or keymap.is_cdf_buffer(key)


# ---------------------------------------------------------------------------- main entry points
def build_codec(sd: str | os.PathLike, rdeic: str | os.PathLike, context: str | os.PathLike | None = None,
                config: CodecConfig | str | os.PathLike | None = None, hints: ArchHints | None = None,
                name: str | None = None, hash_files: bool = True) -> tuple[RDEICCodec, ConversionReport]:
    """Load SD 2.1 (LDM file or diffusers folder) + an RDEIC checkpoint into an ``RDEICCodec``.

    Args:
        sd: ``v2-1_512-ema-pruned.ckpt`` / ``.safetensors`` (LDM layout) or a diffusers SD 2.1 folder.
        rdeic: an RDEIC Lightning checkpoint (``control_model.*``, ``preprocess_model.*``) or its
            state dict as safetensors.
        context: a tensor file with the empty-prompt embedding [1, L, D]; default: computed from the
            inputs' text encoder (an error if they have none).
        config: an explicit architecture (``CodecConfig``, a named config, a JSON file or model
            directory); default: inferred from the tensor shapes (+ ``hints``).
        hints: the numbers shapes do not show (head widths, norm groups); official defaults.
        name: the config's name; default from the RDEIC file name.
        hash_files: record each input's sha256 (the model card needs it; tests may skip it).

    Raises:
        CheckpointError: listing every unexplained source key, unfilled tensor and shape mismatch.
        UnsafeCheckpointError: a pickle needing more than tensors and plain containers.
    """
    from ..codec import RDEICCodec  # the codec pulls in diffusers: import it when used

    hints = hints or ArchHints()
    src = _load_sources(sd, rdeic, hash_files, want_text=context is None)
    rp = infer.rate_point_from_name(Path(rdeic).name)
    name = name or Path(rdeic).stem
    ctx_tensor = ctx_source = None
    if context is not None:
        ctx_tensor, ctx_source = load_context_file(context)
    tower_info = None if context is not None else _text_tower(src, hints)
    if ctx_tensor is not None:
        context_len = int(ctx_tensor.shape[1])
    elif tower_info is not None:
        context_len = tower_info[0].context_length
    else:
        raise CheckpointError(
            "no empty-prompt context: the inputs hold no text encoder (cond_stage_model.model.* or a diffusers "
            "text_encoder/); pass a context tensor file")

    if config is not None:
        cfg, how = _resolve_explicit_config(config), "explicit"
        if rp is not None and cfg.schedule.default_steps != rp[1]:
            cfg.schedule.default_steps = rp[1]
    else:
        cfg, how = _infer_config(src, hints, name, context_len, rp[1] if rp else 2)

    files = src.accounts()
    _check_schedule(files, cfg)
    parts_by_source = {id(p.checkpoint.source): n for n, p in src.sd_parts.items()}

    merged = KeyMap()
    renames_all: list[tuple[str, str]] = []
    owner: dict[str, int] = {}  # our key -> index of the file whose value is used
    overridden_differing: list[str] = []
    for idx, (acc, tensors) in enumerate(files):
        km, rebuilt, renames = _map_file(tensors, cfg, parts_by_source.get(id(acc.source)))
        renames_all += renames
        acc.rebuilt = rebuilt
        for ours, s in km.origin.items():
            acc.mapped[s] = ours
            if ours in merged.state:  # RDEIC file (later) wins, as the reference's dict.update
                prev_idx = owner[ours]
                prev_acc = files[prev_idx][0]
                prev_acc.overridden.append(merged.origin[ours])
                if not torch.equal(merged.state[ours].float(), km.state[ours].float()):
                    overridden_differing.append(f"{merged.origin[ours]} ({prev_acc.source.role} vs {acc.source.role})")
            merged.state[ours] = km.state[ours]
            merged.origin[ours] = s
            owner[ours] = idx
        for s in km.tied:
            acc.mapped.setdefault(s, "(tied)")
        if "scale_factor" in tensors:
            acc.config.append("scale_factor")

    ctx_desc: dict[str, Any]
    if tower_info is not None:
        tower, layer, desc, used = tower_info
        for idx, k in used:
            files[idx][0].context.append(k)
        ctx_tensor = openclip_text.empty_prompt_context(tower, layer)
        ctx_desc = {"from": desc, "layer": layer, "heads": tower.heads, "activation": tower.activation,
                    "resblocks_run": len(tower.blocks) - (1 if layer == "penultimate" else 0)}
    else:
        ctx_desc = {"from": "tensor file", "source": ctx_source}

    for acc, tensors in files:
        explained = set(acc.mapped) | set(acc.rebuilt) | set(acc.context) | set(acc.config)
        is_text_encoder = parts_by_source.get(id(acc.source)) == "text_encoder"
        for k in tensors:
            if k in explained:
                continue
            reason = ignore_reason_for(k, is_text_encoder)
            if reason is None:
                acc.unexplained.append(k)
            else:
                acc.ignored[k] = reason

    assert ctx_tensor is not None  # from the context file, or else the text tower (no tower raised above)
    with torch.device("meta"):  # shapes only: check everything before paying for a real model
        shell = RDEICCodec(cfg)
    _check_fit(shell.state_dict(), merged, files, ctx_tensor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        codec = RDEICCodec(cfg)
    _load(codec, merged, ctx_tensor)
    report = ConversionReport(
        files=[acc for acc, _ in files], config=cfg, config_source=how, hints=hints, context=ctx_desc,
        compressai_renames=renames_all, overridden_differing=overridden_differing,
        rate_point={"lambda_g": rp[0], "steps": rp[1]} if rp else None,
    )
    return codec.eval(), report


def ignore_reason_for(key: str, in_text_encoder_file: bool = False) -> str | None:
    if in_text_encoder_file:
        return "text encoder tensor not used by the empty-prompt forward"
    return keymap.ignore_reason(key)


def _check_fit(own: dict[str, torch.Tensor], merged: KeyMap,
               files: list[tuple[FileAccount, dict[str, torch.Tensor]]], context: torch.Tensor) -> None:
    """Every source tensor explained, every tensor of ours filled, every shape equal; else one error listing all."""
    problems = []
    for acc, _ in files:
        if acc.unexplained:
            problems.append(_listing(
                f"unexplained tensors in {acc.source.role} file {acc.source.path} (mapped nowhere, on no ignore "
                "list; a renamed key or another architecture?)", sorted(acc.unexplained)))
    unexpected = sorted(k for k in merged.state if k not in own)
    if unexpected:
        problems.append(_listing("tensors mapped to names our model does not have (source -> ours)",
                                 [f"{merged.origin[k]} -> {k}" for k in unexpected]))
    missing = sorted(k for k in own if k not in merged.state and not _allowed_missing(k))
    if missing:
        problems.append(_listing("tensors of our model left unfilled", missing))
    shapes = [
        f"{merged.origin[k]} -> {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sorted(merged.state.items()) if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if shapes:
        problems.append(_listing("shape mismatches", shapes))
    if tuple(context.shape) != tuple(own[keymap.OUR_CONTEXT].shape):
        problems.append(f"  context: shape {tuple(context.shape)} vs model {tuple(own[keymap.OUR_CONTEXT].shape)}")
    if problems:
        raise CheckpointError("cannot convert the checkpoints:\n" + "\n".join(problems))


def _load(codec: Any, merged: KeyMap, context: torch.Tensor) -> None:
    """Copy the checked tensors in, rebuild the CDF tables, pin the fingerprint."""
    state = {k: v for k, v in merged.state.items()}
    state[keymap.OUR_CONTEXT] = context
    with torch.no_grad():
        result = codec.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if not keymap.is_cdf_buffer(k)]
    if left or result.unexpected_keys:  # cannot happen after the checks above; keep the invariant loud
        raise CheckpointError(f"load_state_dict disagrees: missing {left}, unexpected {result.unexpected_keys}")
    codec.compression.update(force=True)  # the reference's preprocess_model.update(force=True)
    codec.refresh_fingerprint()


def _model_card(report: ConversionReport, out: Path, codec: Any) -> str:
    cfg = report.config
    lines = [
        f"# {cfg.name}",
        "",
        "RDEIC (Relay Residual Diffusion Extreme Image Compression) codec weights, converted by "
        "`rdeic convert` from the official checkpoints. Load with `RDEICCodec.from_pretrained(DIR)`.",
        "",
    ]
    if report.rate_point:
        lines += [f"Rate point: lambda_g = {report.rate_point['lambda_g']}, fine-tuned for "
                  f"{report.rate_point['steps']} sampling steps (the default steps of this model).", ""]
    lines += ["## Inputs", "", "| role | file | bytes | sha256 |", "| --- | --- | --- | --- |"]
    for s in report.sources:
        lines.append(f"| {s.role} | `{Path(s.path).name}` | {s.size} | `{s.sha256}` |")
    lines += [
        "",
        "## Conversion",
        "",
        f"- architecture: {report.config_source}",
        f"- empty-prompt context: {report.context.get('from')}",
        f"- compressai CDF tables: rebuilt with `update(force=True)` (entropy table digest "
        f"`{codec.compression.entropy_table_digest()[:16]}…`)",
        f"- model fingerprint: `{codec.fingerprint.hex()}`",
        f"- key accounting: see `{REPORT_FILE}` (every source tensor mapped, rebuilt, used for the context "
        "or ignored by a named rule)",
        "",
        "| file | mapped | ignored | rebuilt | context |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in report.files:
        lines.append(f"| `{Path(f.source.path).name}` | {len(f.mapped)} | {len(f.ignored)} | {len(f.rebuilt)} | "
                     f"{len(f.context)} |")
    lines += [
        "",
        "## Licences",
        "",
        "The SD 2.1 weights are under the CreativeML Open RAIL++-M licence; the RDEIC weights are the authors' "
        "(huai-chang/RDEIC). Redistribution of this directory follows both.",
        "",
    ]
    return "\n".join(lines)


def convert(sd: str | os.PathLike, rdeic: str | os.PathLike, out_dir: str | os.PathLike,
            context: str | os.PathLike | None = None, config: CodecConfig | str | os.PathLike | None = None,
            hints: ArchHints | None = None, name: str | None = None) -> ConversionReport:
    """Convert and write ``out_dir`` (config.json + model.safetensors + model card + key report)."""
    from .. import __version__

    codec, report = build_codec(sd, rdeic, context=context, config=config, hints=hints, name=name)
    out = Path(out_dir)
    meta = {
        "conversion": {
            "tool": f"rdeic_core {__version__} (rdeic convert)",
            "sources": [s.to_dict() for s in report.sources],
            "config_source": report.config_source,
            "hints": report.hints.to_dict(),
            "rate_point": report.rate_point,
        }
    }
    codec.save_pretrained(out, extra_meta=meta)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(full=True), indent=1, sort_keys=True) + "\n")
    (out / MODEL_CARD).write_text(_model_card(report, out, codec))
    return report
