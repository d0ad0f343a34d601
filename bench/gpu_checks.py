"""Checks that need a CUDA device; run them on a lent GPU (`python -m bench.gpu_checks`).

They are not part of the CPU test suite (CI has no GPU). Each prints PASS/FAIL.
* GPU encode (bf16 networks) -> CPU decode: the entropy side must agree bit for bit.
* bf16 autocast of the noise estimator stays close to fp32.
* sd21 (random weights) bf16, 4096 x 3072 through the tiled codec: encode + decode time and peak
  GPU memory (a figure for docs/benchmarks-tiling.md; PASS when it completes).
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def gpu_encode_cpu_decode() -> bool:
    from rdeic_core import RDEICCodec

    cpu = RDEICCodec.from_config("tiny", seed=0)
    gpu = RDEICCodec.from_config("tiny", seed=0).to("cuda", torch.bfloat16)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (200, 136), (130, 70)]]
    streams = gpu.encode(images)
    lat_cpu = [cpu.decode_latents([s]).c_latent for s in streams]
    lat_gpu = [gpu.decode_latents([s]).c_latent.cpu() for s in streams]
    ok = all(torch.equal(a, b) for a, b in zip(lat_cpu, lat_gpu))
    out = cpu.decode(streams)
    ok = ok and all(o.shape == im.shape for o, im in zip(out, images))
    return ok


def bf16_noise_estimator_close() -> bool:
    from rdeic_core import RDEICCodec

    c = RDEICCodec.from_config("tiny", seed=0)
    ne = c.noise_estimator.cuda()
    g = torch.Generator().manual_seed(0)
    for p in ne.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(generator=g).mul_(0.1)
    x = torch.randn(2, 4, 16, 16, generator=g).cuda()
    hint = torch.randn(2, c.config.compression.M, 16, 16, generator=g).cuda()
    ctx = c.context.cuda().expand(2, -1, -1)
    with torch.no_grad():
        ref = ne(x, 299, ctx, hint)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = ne(x, 299, ctx, hint)
    return bool((out.float() - ref).abs().max() < 0.05 * ref.abs().max())


def sd21_bf16_4096x3072_tiled() -> bool:
    import time

    from rdeic_core import RDEICCodec

    codec = RDEICCodec.from_config("sd21", seed=0).to("cuda", torch.bfloat16)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3072, 4096, 3), dtype=np.uint8)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    stream = codec.encode([image])[0]
    torch.cuda.synchronize()
    enc = time.perf_counter() - t
    t = time.perf_counter()
    out = codec.decode([stream], steps=2)[0]
    torch.cuda.synchronize()
    dec = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"  sd21 bf16 4096x3072 S=2 tile batch {codec.tiling.batch}: encode {enc:.1f} s, decode {dec:.1f} s, "
          f"peak GPU memory {peak:.1f} GiB, {len(stream)} bytes")
    return out.shape == image.shape


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    failed = 0
    for fn in (gpu_encode_cpu_decode, bf16_noise_estimator_close, sd21_bf16_4096x3072_tiled):
        ok = fn()
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {fn.__name__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
