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
from collections.abc import Iterator

import torch
from torch import nn


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


_SAFE_SUBCLASSES: dict[type[nn.GroupNorm], type] = {}


def _singleton_safe(cls: type[nn.GroupNorm]) -> type:
    """A subclass of a GroupNorm class that accepts groups holding a single value.

    A 64-pixel image has a 1x1 bottleneck, and a narrow model (the control
    module is 0.2x wide) can have one channel per group there. torch's Python
    wrapper refuses that case ("Expected more than 1 value per channel"),
    although the result is well defined: a single value normalises to exactly
    0, so the output is the affine bias.
    """
    if cls not in _SAFE_SUBCLASSES:
        def forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
            if x.numel() // max(x.shape[0] * self.num_groups, 1) > 1:
                return cls.forward(self, x)
            if self.bias is None:
                return torch.zeros_like(x)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return self.bias.view(shape).to(x.dtype).expand_as(x).contiguous()

        _SAFE_SUBCLASSES[cls] = type(f"SingletonSafe{cls.__name__}", (cls,), {"forward": forward})
    return _SAFE_SUBCLASSES[cls]


def install_singleton_safe_group_norms(module: nn.Module) -> int:
    """Make every GroupNorm in ``module`` accept single-value groups (see :func:`_singleton_safe`)."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.GroupNorm) and type(m) not in _SAFE_SUBCLASSES.values():
            m.__class__ = _singleton_safe(type(m))
            n += 1
    return n
