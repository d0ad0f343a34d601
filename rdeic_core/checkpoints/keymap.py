"""Key mapping from the official (LDM / Lightning) layout to ``RDEICCodec``'s state dict, with accounting.

Every source tensor ends up in exactly one bucket:

* **mapped** to one of our keys (``SOURCE -> OURS``),
* **rebuilt** (compressai CDF tables: recomputed by ``update(force=True)``, as
  the reference does after loading, whatever compressai version wrote them),
* **context** (the OpenCLIP text tower, read once to compute the stored
  empty-prompt embedding),
* **ignored** by a rule of :data:`IGNORE_RULES`, each with its reason,

and anything else is *unexplained*, which the converter turns into an error
that lists the keys. The SD UNet and VAE go through diffusers' own LDM
converters; which source tensor each converted tensor came from is recovered
by object identity (the converters move tensors, they do not copy them), so a
key those converters silently skip is still caught.

Our control module keeps LDM's block structure (``input_blocks.<i>.<k>``), so
its mapping is a leaf rename inside ResBlocks and Downsamples only; the
compression module is state-dict compatible with the reference's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
CONTROL_PREFIX = "control_model."
CONTROL_NET_PREFIX = "control_model.control_model."
COMPRESSION_PREFIX = "preprocess_model."

OUR_UNET = "noise_estimator.unet."
OUR_VAE = "vae.vae."
OUR_CONTROL = "noise_estimator.control."
OUR_NOISE_ESTIMATOR = "noise_estimator."
OUR_COMPRESSION = "compression."
OUR_CONTEXT = "context"

# LDM schedule buffers (ldm/models/diffusion/ddpm.py register_schedule); ours is config, checked separately.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights",
)

# (predicate on the source key, reason). Checked in order; the first match wins.
IGNORE_RULES: tuple[tuple[Callable[[str], bool], str], ...] = (
    (lambda k: k in SCHEDULE_BUFFERS,
     "diffusion schedule buffer (ours comes from the config; alphas_cumprod is checked)"),
    (lambda k: k == "logvar", "LDM training-loss weight"),
    (lambda k: k.startswith("model_ema."), "EMA shadow weights (RDEIC runs with use_ema: False)"),
    (lambda k: k.startswith("perceptual_loss."), "LPIPS training loss of stage-2 fine-tuning"),
    (lambda k: k.startswith(VAE_PREFIX + "loss."), "VAE training loss (discriminator / LPIPS)"),
    (lambda k: k.startswith("cond_stage_model."), "text encoder (only the empty-prompt context is kept)"),
    (lambda k: k == COMPRESSION_PREFIX + "quantize.usage", "VQ code-usage statistics (training only)"),
)

# compressai GaussianConditional tables: rebuilt, never loaded (their shapes depend on the scale table).
CDF_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
_CDF_RE = re.compile(r"^(?P<mod>.*gaussian_conditional)\.(?P<buf>_quantized_cdf|_offset|_cdf_length|scale_table)$")

# compressai renamed EntropyBottleneck parameters (``_matrix0`` -> ``matrices.0``, 1.2.0) and, long before,
# exposed the CDF buffers without the underscore; normalise both before mapping.
_EB_OLD_RE = re.compile(r"^(?P<mod>.+)\.(?P<kind>_matrix|_bias|_factor)(?P<idx>\d+)$")
_EB_NEW = {"_matrix": "matrices", "_bias": "biases", "_factor": "factors"}
_OLD_CDF_RE = re.compile(
    r"^(?P<mod>.+\.(?:gaussian_conditional|entropy_bottleneck))\.(?P<buf>quantized_cdf|offset|cdf_length)$")

# LDM ResBlock / Downsample leaves -> diffusers ResnetBlock2D / Downsample2D leaves.
_RESBLOCK_LEAVES = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
    ("op.", "conv."),
)
_CONTROL_BLOCK_RE = re.compile(r"^(?P<block>input_blocks\.\d+\.\d+|middle_block\.\d+)\.(?P<leaf>.+)$")
_ZERO_CONV_RE = re.compile(
    r"^(enc_zero_convs_out\.\d+\.0|middle_block_out\.0|dec_zero_convs_out\.\d+\.0)\.(weight|bias)$")


@dataclass
class KeyMap:
    """Our key -> tensor, with the source key each came from."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # our key -> source key
    tied: set[str] = field(default_factory=set)  # further source names of an already mapped tensor object

    def add(self, ours: str, tensor: torch.Tensor, source: str) -> None:
        if ours in self.state:
            raise CheckpointError(f"two source keys map to {ours}: {self.origin[ours]} and {source}")
        self.state[ours] = tensor
        self.origin[ours] = source

    def update(self, other: KeyMap) -> None:
        for k, v in other.state.items():
            self.add(k, v, other.origin[k])
        self.tied |= other.tied


def ignore_reason(key: str) -> str | None:
    for pred, reason in IGNORE_RULES:
        if pred(key):
            return reason
    return None


def normalize_compressai_keys(
        state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Rename keys written by other compressai versions to 1.2.x names; returns (state, [(old, new)])."""
    out: dict[str, torch.Tensor] = {}
    renames: list[tuple[str, str]] = []
    for k, v in state.items():
        new = k
        if m := _EB_OLD_RE.match(k):
            new = f"{m.group('mod')}.{_EB_NEW[m.group('kind')]}.{m.group('idx')}"
        elif m := _OLD_CDF_RE.match(k):
            new = f"{m.group('mod')}._{m.group('buf')}"
        if new != k:
            renames.append((k, new))
            if new in state:
                raise CheckpointError(f"compressai key {k} and its newer name {new} are both present")
        out[new] = v
    return out, renames


def is_cdf_buffer(key: str) -> bool:
    return _CDF_RE.match(key) is not None


# ---------------------------------------------------------------------------- diffusers LDM converters
def _memory_id(t: torch.Tensor) -> tuple[int, int, int]:
    return t.untyped_storage().data_ptr(), int(t.storage_offset()), t.numel()


def _attribute(sub: Mapping[str, torch.Tensor], converted: Mapping[str, Any], prefix: str, what: str) -> KeyMap:
    """Which source key each converted tensor is.

    The converters move tensors or take views of them (``w[:, :, 0, 0]`` for the
    VAE attention), never copy, so a converted tensor is either the source
    object itself or starts at the same memory with the same number of elements.
    """
    by_id: dict[int, list[str]] = {}
    by_memory: dict[tuple[int, int, int], list[str]] = {}
    for k, v in sub.items():
        by_id.setdefault(id(v), []).append(k)
        if v.numel():
            by_memory.setdefault(_memory_id(v), []).append(k)
    out = KeyMap()
    for key, t in converted.items():
        if t is None:
            raise CheckpointError(f"{what}: the converter produced no tensor for {key}")
        keys = by_id.get(id(t)) or (by_memory.get(_memory_id(t)) if t.numel() else None)
        if not keys:
            raise CheckpointError(f"{what}: cannot tell which source tensor became {key}")
        out.add(prefix + key, t, keys[0])
        out.tied.update(keys[1:])  # the same tensor under several source names (tied weights)
    return out


def _run_converter(fn: Callable[..., dict[str, Any]], sub: dict[str, torch.Tensor], config: dict[str, Any],
                   what: str) -> dict[str, Any]:
    try:
        return fn(sub, config)
    except KeyError as e:
        raise CheckpointError(f"{what}: the checkpoint lacks key {e.args[0]!r} that its layout requires") from None


def map_ldm_unet(src: Mapping[str, torch.Tensor], unet_config: dict[str, Any]) -> KeyMap:
    """``model.diffusion_model.*`` -> ``noise_estimator.unet.*`` (diffusers' ``convert_ldm_unet_checkpoint``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sub = {k: v for k, v in src.items() if k.startswith(UNET_PREFIX)}
    if not sub:
        return KeyMap()
    converted = _run_converter(convert_ldm_unet_checkpoint, sub, unet_config, "SD UNet")
    return _attribute(sub, converted, OUR_UNET, "SD UNet")


def map_ldm_vae(src: Mapping[str, torch.Tensor], vae_config: dict[str, Any]) -> KeyMap:
    """``first_stage_model.*`` -> ``vae.vae.*`` (diffusers' ``convert_ldm_vae_checkpoint``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sub = {k: v for k, v in src.items() if k.startswith(VAE_PREFIX) and ignore_reason(k) is None}
    if not sub:
        return KeyMap()
    converted = _run_converter(convert_ldm_vae_checkpoint, sub, vae_config, "SD VAE")
    return _attribute(sub, converted, OUR_VAE, "SD VAE")


# ---------------------------------------------------------------------------- RDEIC modules
def control_key(source_key: str) -> str | None:
    """``control_model.*`` -> ours, or None if the key is not part of the RDEIC noise estimator."""
    if source_key.startswith(CONTROL_NET_PREFIX):
        rest = source_key[len(CONTROL_NET_PREFIX):]
        m = _CONTROL_BLOCK_RE.match(rest)
        if m:
            leaf = m.group("leaf")
            for old, new in _RESBLOCK_LEAVES:
                if leaf.startswith(old):
                    leaf = new + leaf[len(old):]
                    break
            rest = f"{m.group('block')}.{leaf}"
        return OUR_CONTROL + rest
    if source_key.startswith(CONTROL_PREFIX):
        rest = source_key[len(CONTROL_PREFIX):]
        if rest == "scale_list" or _ZERO_CONV_RE.match(rest):
            return OUR_NOISE_ESTIMATOR + rest
    return None


def map_control(src: Mapping[str, torch.Tensor]) -> tuple[KeyMap, list[str]]:
    """The control module, zero convs and ``scale_list``; returns (mapping, control keys we cannot place)."""
    out = KeyMap()
    unplaced = []
    for k, v in src.items():
        if not k.startswith(CONTROL_PREFIX):
            continue
        ours = control_key(k)
        if ours is None:
            unplaced.append(k)
        else:
            out.add(ours, v, k)
    return out, unplaced


def map_compression(src: Mapping[str, torch.Tensor]) -> tuple[KeyMap, list[str], list[tuple[str, str]]]:
    """``preprocess_model.*`` -> ``compression.*``; returns (mapping, rebuilt CDF keys, compressai renames)."""
    sub = {k: v for k, v in src.items() if k.startswith(COMPRESSION_PREFIX) and ignore_reason(k) is None}
    norm, renames = normalize_compressai_keys(sub)
    back = {new: old for old, new in renames}
    out = KeyMap()
    rebuilt = []
    for k, v in norm.items():
        source = back.get(k, k)
        if is_cdf_buffer(k):
            rebuilt.append(source)
            continue
        out.add(OUR_COMPRESSION + k[len(COMPRESSION_PREFIX):], v, source)
    return out, rebuilt, renames


def map_diffusers_component(state: Mapping[str, torch.Tensor], prefix: str) -> KeyMap:
    """A diffusers folder's vae/unet weights are already in our naming below ``prefix``."""
    out = KeyMap()
    for k, v in state.items():
        out.add(prefix + k, v, k)
    return out
