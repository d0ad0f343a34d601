"""Safe reading of checkpoint files: tensors in, never pickled code executed.

* ``.safetensors``: read with safetensors (no pickle at all).
* anything else (``.ckpt``, ``.pt``, ``.pth``, ``.bin``): ``torch.load(weights_only=True)``,
  memory-mapped when the file is in the zip format, so a 5 GB SD checkpoint is
  not copied into RAM. A pickle that needs more than tensors and plain
  containers (a Lightning checkpoint with an OmegaConf ``hyper_parameters``,
  say) is refused with an explanation of how to extract its weights once, in an
  environment the user trusts.

A Lightning checkpoint is unwrapped to its ``state_dict``; its other top-level
entries (optimizer state, loops, callbacks, ...) are on an explicit ignore list
and reported, and an unknown top-level entry that holds tensors is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, UnsafeCheckpointError

# Top-level entries of a PyTorch Lightning checkpoint besides "state_dict" (all PL 1.x/2.x versions).
LIGHTNING_ENTRIES: dict[str, str] = {
    "epoch": "Lightning bookkeeping",
    "global_step": "Lightning bookkeeping",
    "pytorch-lightning_version": "Lightning bookkeeping",
    "optimizer_states": "optimizer state (training only)",
    "lr_schedulers": "LR scheduler state (training only)",
    "callbacks": "Lightning callback state",
    "loops": "Lightning loop state",
    "hparams_name": "Lightning hyper-parameters",
    "hyper_parameters": "Lightning hyper-parameters",
    "hparams_type": "Lightning hyper-parameters",
    "datamodule_hyper_parameters": "Lightning hyper-parameters",
    "native_amp_scaling_state": "AMP grad-scaler state (training only)",
    "amp_scaling_state": "AMP grad-scaler state (training only)",
}

_HASH_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed (model cards record it for every input)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SourceFile:
    """One input file, as the model card describes it."""

    path: str
    sha256: str
    size: int
    role: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.size, "role": self.role}


@dataclass
class LoadedCheckpoint:
    """The state dict of one checkpoint file plus what was set aside and why."""

    source: SourceFile
    tensors: dict[str, torch.Tensor]
    set_aside: dict[str, str] = field(default_factory=dict)  # top-level entry -> why it is not weights
    set_aside_tensors: int = 0  # tensors inside those entries (optimizer moments, ...)
    info: dict[str, Any] = field(default_factory=dict)  # epoch / global_step when present


def _unsafe_message(path: Path, err: BaseException) -> str:
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    what = f" (it references {m.group(1)})" if m else ""
    return (
        f"{path}: refusing to unpickle{what}: the file needs more than tensors and plain containers, and "
        "rdeic never executes pickled code (torch.load(weights_only=True)). If you trust the file, extract its "
        "weights once in an isolated environment and convert that instead, e.g.\n"
        "  python -c \"import torch; from safetensors.torch import save_file; "
        f"ck = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = ck.get('state_dict', ck); "
        "save_file({k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}, 'weights.safetensors')\"\n"
        "then pass weights.safetensors."
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{path}: cannot be read by torch.load: {e}") from e
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_unsafe_message(path, e)) from None
    try:  # legacy (non-zip) torch.save format: no mmap
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_unsafe_message(path, e)) from None
    except Exception as e:  # any other failure is a broken file; say which
        raise CheckpointError(f"{path}: cannot be read by torch.load: {e}") from e


def _count_tensors(obj: Any) -> int:
    if torch.is_tensor(obj):
        return 1
    if isinstance(obj, Mapping):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def _strip_module_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    """DataParallel/DDP checkpoints prefix every key with ``module.`` (the reference strips it too)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _unwrap(path: Path, obj: Any) -> tuple[dict[str, Any], dict[str, str], int, dict[str, Any]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a dict of tensors (or a Lightning checkpoint), got {type(obj).__name__}")
    set_aside: dict[str, str] = {}
    n_aside = 0
    info: dict[str, Any] = {}
    while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        for k, v in obj.items():
            if k == "state_dict":
                continue
            if k in LIGHTNING_ENTRIES:
                set_aside[k] = LIGHTNING_ENTRIES[k]
                n_aside += _count_tensors(v)
                if k in ("epoch", "global_step") and isinstance(v, int):
                    info[k] = v
            elif _count_tensors(v):
                raise CheckpointError(
                    f"{path}: top-level entry {k!r} holds {_count_tensors(v)} tensor(s) but is neither the "
                    f"state_dict nor a known Lightning entry ({sorted(LIGHTNING_ENTRIES)}); refusing to guess "
                    "whether they are weights"
                )
            else:
                set_aside[k] = "non-tensor metadata"
        obj = obj["state_dict"]
    return dict(obj), set_aside, n_aside, info


def _read_raw(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    return _torch_load(path)


def load_checkpoint(path: str | os.PathLike, role: str, hash_file: bool = True) -> LoadedCheckpoint:
    """Read one checkpoint file into a flat ``{key: tensor}`` dict (see the module doc for the rules)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role} checkpoint {path} does not exist or is not a file")
    raw = _read_raw(path)
    sd, set_aside, n_aside, info = _unwrap(path, raw)
    sd = _strip_module_prefix(sd)
    bad = {k: type(v).__name__ for k, v in sd.items() if not torch.is_tensor(v)}
    if bad:
        shown = dict(list(sorted(bad.items()))[:20])
        raise CheckpointError(f"{path}: state_dict entries that are not tensors ({len(bad)}): {shown}")
    source = SourceFile(path=str(path), sha256=sha256_file(path) if hash_file else "", size=path.stat().st_size,
                        role=role)
    return LoadedCheckpoint(source=source, tensors=sd, set_aside=set_aside, set_aside_tensors=n_aside, info=info)


# ---------------------------------------------------------------------------- diffusers folders
_WEIGHT_NAMES = {
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
}


@dataclass
class DiffusersComponent:
    name: str
    config: dict[str, Any]
    checkpoint: LoadedCheckpoint


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "unet").is_dir() and (p / "vae").is_dir()


def _find_weights(folder: Path, name: str) -> Path:
    for fname in _WEIGHT_NAMES[name]:
        if (folder / fname).is_file():
            return folder / fname
    raise CheckpointError(f"{folder}: no weights file (looked for {list(_WEIGHT_NAMES[name])})")


def load_diffusers_component(root: str | os.PathLike, name: str, hash_file: bool = True) -> DiffusersComponent:
    """``root/<name>/config.json`` + its weights (sharded checkpoints are not supported)."""
    folder = Path(root) / name
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: missing config.json")
    config = json.loads(cfg_path.read_text())
    ckpt = load_checkpoint(_find_weights(folder, name), role=f"sd-diffusers/{name}", hash_file=hash_file)
    return DiffusersComponent(name=name, config=config, checkpoint=ckpt)


def load_context_file(path: str | os.PathLike) -> tuple[torch.Tensor, SourceFile]:
    """A stored empty-prompt embedding: a tensor file (safetensors or torch.save of a tensor or a dict).

    A dict must hold one tensor or a ``context`` key. Accepts [L, D] or
    [1, L, D]; returns float32 [1, L, D].
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"context file {path} does not exist or is not a file")
    raw = _read_raw(path)
    if torch.is_tensor(raw):
        tensor = raw
    elif isinstance(raw, Mapping) and "context" in raw:
        tensor = raw["context"]
    elif isinstance(raw, Mapping) and len(raw) == 1:
        tensor = next(iter(raw.values()))
    else:
        keys = sorted(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{path}: expected one tensor or a 'context' key, found {keys}")
    if not torch.is_tensor(tensor):
        raise CheckpointError(f"{path}: context is a {type(tensor).__name__}, not a tensor")
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3 or tensor.shape[0] != 1:
        raise CheckpointError(f"{path}: context must be [L, D] or [1, L, D], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{path}: context must be finite floating point values")
    source = SourceFile(path=str(path), sha256=sha256_file(path), size=path.stat().st_size, role="context")
    return tensor.to(torch.float32).clone().contiguous(), source
