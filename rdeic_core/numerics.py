"""Numerics that do not depend on the machine's thread count.

Archives must decode to the same bytes wherever they are restored. On the CPU,
several float32 kernels change their summation order with the number of
intra-op threads (measured here with torch 2.14, 1 vs 2 threads): oneDNN
convolutions, MKL GEMMs behind ``nn.Linear`` for small row counts, and
``group_norm`` for some batch/group counts. Each differs by ~1e-7-1e-6, which
is enough to flip a few decoded pixels by one level.

Reproducible mode therefore runs the codec's network passes on ONE intra-op
thread on the CPU (and with deterministic cuDNN algorithms on CUDA). A
single-threaded pass gives the same bits whatever ``torch.set_num_threads``
the caller uses, and it is how a CPU fleet is run efficiently anyway: one
worker process per core (the archive pipeline's CPU actors do exactly that).
``codec.reproducible = False`` gives up that guarantee to use every thread
for one image's latency.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def reproducible(enabled: bool = True) -> Iterator[None]:
    """Run the block with thread-count-invariant numerics (no-op when ``enabled`` is False)."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            yield
    finally:
        torch.set_num_threads(threads)
