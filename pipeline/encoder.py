"""What the pipeline needs from a codec, and nothing more: images in, bytes out, an identity.

The pipeline never imports a model. A job hands it an encoder factory: a small picklable object
whose ``identity()`` is cheap (read on the driver to check the output prefix and stamp metadata)
and whose ``load(device)`` builds the real encoder once per worker, where the GPU is
(``pipeline.executors.base.ModelFactory``). ``jobs/codec.py`` adapts ``rdeic_core.RDEICCodec`` to this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    """A loaded codec. ``encode`` returns one non-empty bitstream per image, in order."""

    fingerprint: bytes
    device: str

    def encode(self, images: Sequence[np.ndarray]) -> list[bytes]: ...


@dataclass(frozen=True)
class CodecIdentity:
    """Everything that decides the bytes an encoder writes; ``fingerprint`` is the one compared.

    ``fingerprint`` is the hex sha256 of the model (config + weights + entropy tables): two runs
    with the same fingerprint write interchangeable archives.
    """

    name: str
    fingerprint: str
    entropy_table_digest: str
    codec_version: str
    bitstream_version: str
    model_hashes: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_metadata(self) -> dict[str, str]:
        """Parquet key-value metadata entries (``rdeic.*``), values as strings."""
        return {
            "rdeic.codec.name": self.name,
            "rdeic.codec.fingerprint": self.fingerprint,
            "rdeic.codec.entropy_table_digest": self.entropy_table_digest,
            "rdeic.codec.version": self.codec_version,
            "rdeic.codec.bitstream_version": self.bitstream_version,
            "rdeic.model.hashes": json.dumps(self.model_hashes, sort_keys=True),
            "rdeic.versions": json.dumps(self.versions, sort_keys=True),
        }

