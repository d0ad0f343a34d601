"""Loading the official SD 2.1 + RDEIC checkpoints and converting them to our model format.

* :mod:`.converter`: :func:`build_codec` / :func:`convert`, the entry points (``rdeic convert`` calls :func:`convert`).
* :mod:`.loader`: safe file reading (safetensors or ``torch.load(weights_only=True)``).
* :mod:`.keymap`: the LDM -> ours key mapping and the ignore rules.
* :mod:`.infer`: the architecture config from tensor shapes.
* :mod:`.openclip_text`: the empty-prompt context from an OpenCLIP text tower, in plain torch.

See docs/weights.md for the rules and docs/zoo.md for the official rate points.
"""

from __future__ import annotations

from .converter import ConversionReport, build_codec, convert
from .errors import CheckpointError, UnsafeCheckpointError
from .infer import ArchHints

__all__ = ["ArchHints", "CheckpointError", "ConversionReport", "UnsafeCheckpointError", "build_codec", "convert"]
