"""Cross-process determinism: streams written with 2 threads decode identically in a 1-thread process.

Archives must decode years later on other machines. The entropy-parameter
path is deterministic by design (float64 + snapping, see compression.py);
this test checks it end to end on >= 50 real-photo crops of mixed sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdeic_core import RDEICCodec

SIZES = [(64, 64), (64, 128), (128, 64), (96, 80), (130, 70)]

CHILD = textwrap.dedent(
    """
    import sys, json
    from pathlib import Path
    import numpy as np, torch
    torch.set_num_threads(1)
    from rdeic_core import RDEICCodec
    work = Path(sys.argv[1])
    codec = RDEICCodec.from_pretrained(work / "model")
    streams = [p.read_bytes() for p in sorted((work / "streams").glob("*.rde"))]
    lat = [codec.decode_latents([s]).c_latent[0].numpy() for s in streams]
    imgs = codec.decode(streams)
    np.savez(work / "child.npz", *lat, *imgs)
    print(json.dumps({"threads": torch.get_num_threads(), "n": len(streams)}))
    """
)


def _crops(paths: list[Path], n: int) -> list[np.ndarray]:
    out = []
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    for i in range(n):
        ph = photos[i % len(photos)]
        h, w = SIZES[i % len(SIZES)]
        h, w = min(h, ph.shape[0]), min(w, ph.shape[1])
        y = rng.integers(0, ph.shape[0] - h + 1)
        x = rng.integers(0, ph.shape[1] - w + 1)
        out.append(np.ascontiguousarray(ph[y:y + h, x:x + w]))
    return out


def test_streams_decode_identically_in_a_one_thread_process(tmp_path, small_photo_paths):
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        codec = RDEICCodec.from_config("tiny", seed=0)
        images = _crops(small_photo_paths, 52)
        streams = codec.encode(images, steps=2)
        lat = [codec.decode_latents([s]).c_latent[0].numpy() for s in streams]
        imgs = codec.decode(streams)
    finally:
        torch.set_num_threads(prev)
    codec.save_pretrained(tmp_path / "model")
    (tmp_path / "streams").mkdir()
    for i, s in enumerate(streams):
        (tmp_path / "streams" / f"{i:04d}.rde").write_bytes(s)
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"threads": 1, "n": 52}
    child = np.load(tmp_path / "child.npz")
    arrays = [child[f"arr_{i}"] for i in range(2 * len(streams))]
    for i in range(len(streams)):
        np.testing.assert_array_equal(arrays[i], lat[i], err_msg=f"latent of stream {i} differs")
        np.testing.assert_array_equal(arrays[len(streams) + i], imgs[i], err_msg=f"image of stream {i} differs")
