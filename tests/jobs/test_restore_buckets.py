"""The restore decoder adapter buckets tiled streams together, and restore batches are bounded by pixels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from jobs.codec import RDEICDecoder
from pipeline.restore import DEFAULT_MAX_PENDING_PIXELS, RestoreConfig
from rdeic_core import RDEICCodec


def test_tiled_streams_of_any_size_share_one_bucket():
    codec = RDEICCodec.from_config("tiny", seed=0)
    codec.tiling = replace(codec.tiling, whole_max_pixels=0)  # tile everything beyond one tile, however small
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (100, 120), (600, 64), (576, 704)]  # two one-tile, two tiled (latent > 64)
    streams = codec.encode([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes])
    dec = RDEICDecoder(codec, "cpu")
    infos = [dec.inspect(s) for s in streams]
    assert infos[0].bucket != infos[1].bucket  # decoded whole: one bucket per padded size
    assert infos[2].bucket == infos[3].bucket == ("tiled", 2, 1.0)
    assert dec.inspect(streams[2], steps=5).bucket == ("tiled", 5, 1.0)
    # decoding the shared bucket together gives each stream's pixels alone
    together = dec.decode(streams[2:])
    for s, im in zip(streams[2:], together):
        assert np.array_equal(dec.decode([s])[0], im)


def test_restore_config_bounds_pending_pixels():
    assert RestoreConfig().max_pending_pixels == DEFAULT_MAX_PENDING_PIXELS
    with pytest.raises(ValueError, match="max_pending_pixels"):
        RestoreConfig(max_pending_pixels=0)
