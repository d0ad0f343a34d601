"""The empty-prompt context from an OpenCLIP text tower, without open_clip and without a network.

RDEIC always conditions SD 2.1 on the embedding of the empty prompt, taken by
LDM's ``FrozenOpenCLIPEmbedder(layer="penultimate")``: token embedding +
positional embedding, the causal-masked residual attention blocks *except the
last one*, then ``ln_final``. It is a constant, so a converted model stores it
(the codec's ``context`` buffer) and nothing at run time needs a text encoder.

This module re-implements exactly that forward in plain torch from the SD
checkpoint's own ``cond_stage_model.model.*`` tensors, so converting never
downloads OpenCLIP weights (the reference constructor does, then overwrites
them with the checkpoint's). It also reads the HF ``CLIPTextModel`` layout of a
diffusers SD 2.x folder (``text_encoder/``), whose last block is already
dropped (23 layers), so there the "last" layer is what the pipeline uses.

Everything runs in float64 and is cast to float32 at the end: the result is a
stored constant, and float64 makes it the same on every machine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import CheckpointError

SOT_TOKEN = 49406  # "<start_of_text>" in the CLIP BPE vocabulary
EOT_TOKEN = 49407  # "<end_of_text>"
DEFAULT_HEAD_DIM = 64  # every OpenCLIP/OpenAI text tower (ViT-B/L/H/bigG) uses 64-wide heads
LAYERS = ("penultimate", "last")

_BLOCK_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_BLOCK_LEAVES = (
    "ln_1.weight", "ln_1.bias",
    "attn.in_proj_weight", "attn.in_proj_bias",
    "attn.out_proj.weight", "attn.out_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)


def tokenize_empty(context_length: int) -> torch.Tensor:
    """open_clip.tokenize("") : [SOT, EOT, 0, 0, ...] of ``context_length`` tokens, shape [1, L]."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 to hold SOT and EOT, got {context_length}")
    tokens = torch.zeros(1, context_length, dtype=torch.long)
    tokens[0, 0] = SOT_TOKEN
    tokens[0, 1] = EOT_TOKEN
    return tokens


@dataclass
class TextTower:
    """An OpenCLIP-layout text transformer's tensors (prefix ``cond_stage_model.model.`` removed)."""

    token_embedding: torch.Tensor  # [vocab, width]
    positional_embedding: torch.Tensor  # [context_length, width]
    blocks: list[dict[str, torch.Tensor]]  # one dict per resblock, keys from _BLOCK_LEAVES
    ln_final_weight: torch.Tensor
    ln_final_bias: torch.Tensor
    heads: int
    activation: str = "gelu"  # "gelu" (OpenCLIP ViT-H) or "quick_gelu" (OpenAI CLIP)
    eps: float = 1e-5

    @property
    def width(self) -> int:
        return int(self.token_embedding.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    def validate(self) -> None:
        w = self.width
        if self.positional_embedding.dim() != 2 or self.positional_embedding.shape[1] != w:
            raise CheckpointError(
                f"text tower: positional_embedding {tuple(self.positional_embedding.shape)} does not match width {w}")
        if self.token_embedding.shape[0] <= EOT_TOKEN:
            raise CheckpointError(
                f"text tower: vocabulary of {self.token_embedding.shape[0]} tokens lacks the CLIP SOT/EOT ids "
                f"{SOT_TOKEN}/{EOT_TOKEN}; this is not a CLIP text encoder")
        if self.heads < 1 or w % self.heads:
            raise CheckpointError(f"text tower: width {w} is not divisible into {self.heads} heads "
                                  "(pass the head count explicitly)")
        if self.activation not in ("gelu", "quick_gelu"):
            raise CheckpointError(f"text tower: unsupported activation {self.activation!r}")
        for i, b in enumerate(self.blocks):
            expect = {
                "attn.in_proj_weight": (3 * w, w), "attn.out_proj.weight": (w, w),
                "ln_1.weight": (w,), "ln_2.weight": (w,),
            }
            for leaf, shape in expect.items():
                if tuple(b[leaf].shape) != shape:
                    raise CheckpointError(
                        f"text tower: transformer.resblocks.{i}.{leaf} has shape {tuple(b[leaf].shape)}, "
                        f"expected {shape}")


def tower_from_openclip(weights: Mapping[str, torch.Tensor], heads: int | None = None,
                        activation: str = "gelu") -> TextTower:
    """Read an OpenCLIP text tower (keys like ``transformer.resblocks.0.attn.in_proj_weight``)."""
    needed = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
    missing = [k for k in needed if k not in weights]
    indices = sorted({int(m.group(1)) for k in weights if (m := _BLOCK_RE.match(k))})
    if indices != list(range(len(indices))):
        raise CheckpointError(f"text tower: resblock indices {indices} are not 0..n-1")
    blocks = []
    for i in indices:
        block = {}
        for leaf in _BLOCK_LEAVES:
            key = f"transformer.resblocks.{i}.{leaf}"
            if key in weights:
                block[leaf] = weights[key]
            else:
                missing.append(key)
        blocks.append(block)
    if not blocks:
        missing.append("transformer.resblocks.0.*")
    if missing:
        raise CheckpointError(f"text tower is incomplete; missing: {missing}")
    width = int(weights["token_embedding.weight"].shape[1])
    tower = TextTower(
        token_embedding=weights["token_embedding.weight"],
        positional_embedding=weights["positional_embedding"],
        blocks=blocks,
        ln_final_weight=weights["ln_final.weight"],
        ln_final_bias=weights["ln_final.bias"],
        heads=heads if heads is not None else max(1, width // DEFAULT_HEAD_DIM),
        activation=activation,
    )
    tower.validate()
    return tower


def openclip_keys_used(weights: Mapping[str, torch.Tensor]) -> set[str]:
    """The keys of an OpenCLIP text tower that :func:`tower_from_openclip` reads."""
    used = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    for k in weights:
        m = _BLOCK_RE.match(k)
        if m and k[m.end():] in _BLOCK_LEAVES:
            used.add(k)
    return used & set(weights)


_HF_LAYER_RE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_HF_LEAF = {
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}


def openclip_from_hf_clip(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """HF ``CLIPTextModel`` keys -> OpenCLIP keys (q/k/v concatenated into ``in_proj``), and the HF keys used."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for src, dst in top.items():
        if src in weights:
            out[dst] = weights[src]
            used.add(src)
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in weights.items():
        m = _HF_LAYER_RE.match(k)
        if not m:
            continue
        i, leaf = int(m.group(1)), m.group(2)
        if leaf in _HF_LEAF:
            out[f"transformer.resblocks.{i}.{_HF_LEAF[leaf]}"] = v
            used.add(k)
        elif re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", leaf):
            qkv.setdefault(i, {})[leaf] = v
            used.add(k)
    for i, parts in qkv.items():
        for kind, leaf in (("weight", "attn.in_proj_weight"), ("bias", "attn.in_proj_bias")):
            names = [f"self_attn.{p}_proj.{kind}" for p in "qkv"]
            if not all(n in parts for n in names):
                raise CheckpointError(f"text encoder layer {i}: missing one of {names}")
            out[f"transformer.resblocks.{i}.{leaf}"] = torch.cat([parts[n] for n in names], dim=0)
    return out, used


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w.to(x.dtype), b.to(x.dtype), eps)


def _block(x: torch.Tensor, p: dict[str, torch.Tensor], heads: int, mask: torch.Tensor, activation: str,
           eps: float) -> torch.Tensor:
    """One OpenCLIP ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x)); x is [B, L, W]."""
    dt = x.dtype
    bsz, length, width = x.shape
    h = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"], eps)
    qkv = F.linear(h, p["attn.in_proj_weight"].to(dt), p["attn.in_proj_bias"].to(dt))
    q, k, v = (t.reshape(bsz, length, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = (q * (1.0 / math.sqrt(width // heads))) @ k.transpose(-1, -2) + mask
    attn = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, length, width)
    x = x + F.linear(attn, p["attn.out_proj.weight"].to(dt), p["attn.out_proj.bias"].to(dt))
    h = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"], eps)
    h = F.linear(h, p["mlp.c_fc.weight"].to(dt), p["mlp.c_fc.bias"].to(dt))
    h = F.gelu(h) if activation == "gelu" else h * torch.sigmoid(1.702 * h)
    return x + F.linear(h, p["mlp.c_proj.weight"].to(dt), p["mlp.c_proj.bias"].to(dt))


@torch.no_grad()
def encode_tokens(tower: TextTower, tokens: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
    """FrozenOpenCLIPEmbedder.encode_with_transformer: [B, L] tokens -> [B, L, W] (float32).

    ``layer="penultimate"`` skips the last resblock (what SD 2.x and RDEIC use),
    ``"last"`` runs them all; ``ln_final`` is applied in both cases.
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    if tokens.dim() != 2 or tokens.shape[1] != tower.context_length:
        raise ValueError(f"tokens must be [B, {tower.context_length}], got {tuple(tokens.shape)}")
    dt = torch.float64
    x = tower.token_embedding.to(dt)[tokens] + tower.positional_embedding.to(dt)
    length = tower.context_length
    mask = torch.full((length, length), float("-inf"), dtype=dt).triu_(1)  # causal, as open_clip's attn_mask
    blocks = tower.blocks[:-1] if layer == "penultimate" else tower.blocks
    if not blocks and layer == "penultimate":
        raise CheckpointError("text tower has a single resblock; the penultimate layer does not exist")
    for p in blocks:
        x = _block(x, p, tower.heads, mask, tower.activation, tower.eps)
    x = _layer_norm(x, tower.ln_final_weight, tower.ln_final_bias, tower.eps)
    return x.to(torch.float32)


def empty_prompt_context(tower: TextTower, layer: str = "penultimate") -> torch.Tensor:
    """The [1, L, W] embedding of "" that the codec stores as its ``context`` buffer."""
    return encode_tokens(tower, tokenize_empty(tower.context_length), layer)
