"""CVQ-VAE vector quantiser of the hyper-latent (spec section 2; reference ``VectorQuantiser``).

Training behaviour is that of the reference configuration ``contras_loss=True,
anchor='closest', decay=0.99, beta=0.25, first_batch=False``:

* nearest code by L2 (the distance is written as a negative distance ``d``),
  straight-through estimator for z_q;
* loss = beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2 + a contrastive
  cross-entropy over the sorted distances (temperature 0.07);
* online "closest" re-initialisation: every code is pulled towards the feature
  closest to it, with a weight that is ~1 for dead codes and ~0 for used ones
  (``embed_prob`` is the running average usage).

Inference uses :meth:`VectorQuantiser.quant` (nearest code, computed in float64
so that the chosen indices do not depend on float32 summation order) and the
decoder uses :meth:`VectorQuantiser.lookup`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VectorQuantiser"]


class VectorQuantiser(nn.Module):
    """Codebook ``embedding.weight`` [K, D], running usage ``embed_prob`` [K]."""

    embed_prob: torch.Tensor

    def __init__(
        self,
        num_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        decay: float = 0.99,
        temperature: float = 0.07,
        contras_loss: bool = True,
    ) -> None:
        super().__init__()
        if num_embed < 2:
            raise ValueError(f"num_embed must be >= 2, got {num_embed}")
        self.num_embed = int(num_embed)
        self.embed_dim = int(embed_dim)
        self.beta = float(beta)
        self.decay = float(decay)
        self.temperature = float(temperature)
        self.contras_loss = bool(contras_loss)
        # The reference builds a (here unused) random feature pool first; drawing the same numbers keeps
        # the RNG stream, hence any seeded initialisation, identical to the reference's.
        torch.rand(self.num_embed, self.embed_dim)
        self.embedding = nn.Embedding(self.num_embed, self.embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.num_embed, 1.0 / self.num_embed)
        self.register_buffer("embed_prob", torch.zeros(self.num_embed))

    # ------------------------------------------------------------------ training / eval forward
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``z`` [B, D, h, w] -> (z_q [B, D, h, w], loss scalar, indices [B, h, w]).

        In training mode z_q carries the straight-through gradient and the
        codebook is re-initialised online (a side effect, as in the reference).
        In eval mode the loss is a zero scalar and nothing changes.
        """
        self._check_input(z)
        b, _, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flat = z.view(-1, self.embed_dim)
        weight = self.embedding.weight

        # Negative squared distance (larger = closer). z is detached: only the codebook receives
        # gradients through d (via the contrastive loss), exactly as in the reference.
        d = (
            -torch.sum(z_flat.detach() ** 2, dim=1, keepdim=True)
            - torch.sum(weight**2, dim=1)
            + 2 * torch.matmul(z_flat.detach(), weight.t())
        )
        # Sort (not argmax) as the reference does: codes re-initialised onto the same feature tie in
        # float32, and the sort's tie order (last of the ascending sort) decides which one is used.
        indices = d.sort(dim=1)[1][:, -1]
        z_q = F.embedding(indices, weight).view(z.shape)

        if not self.training:
            z_q = z_q.permute(0, 3, 1, 2).contiguous()
            return z_q, z.new_zeros(()), indices.view(b, h, w)

        loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        # Running average usage (mean of one-hot encodings == counts / n, exactly).
        avg_probs = torch.bincount(indices, minlength=self.num_embed).to(z_flat.dtype) / indices.numel()
        self.embed_prob.mul_(self.decay).add_(avg_probs, alpha=1 - self.decay)

        # One sort over the batch axis serves both the "closest" anchors and the contrastive loss.
        sort_distance, sort_index = d.sort(dim=0)
        self._reinit_dead_codes(z_flat.detach()[sort_index[-1, :]])
        if self.contras_loss:
            loss = loss + self._contrastive_loss(sort_distance)
        return z_q, loss, indices.view(b, h, w)

    def _reinit_dead_codes(self, closest_feat: torch.Tensor) -> None:
        """Pull each code towards its closest feature, by an amount that is ~1 only for unused codes.

        Written through ``.data`` (no autograd version bump), as the reference
        does: the graph of this step's loss stays valid.
        """
        decay = torch.exp(-(self.embed_prob * self.num_embed * 10) / (1 - self.decay) - 1e-3).unsqueeze(1)
        w = self.embedding.weight.data
        w.copy_(w * (1 - decay) + closest_feat * decay)

    def _contrastive_loss(self, sort_distance: torch.Tensor) -> torch.Tensor:
        """Cross-entropy: the mean of each code's nearest features vs the farthest half of the batch."""
        n = sort_distance.size(0)
        n_pos = max(1, n // self.num_embed)
        dis_pos = sort_distance[-n_pos:, :].mean(dim=0, keepdim=True)
        dis_neg = sort_distance[: n // 2, :]
        logits = torch.cat([dis_pos, dis_neg], dim=0).t() / self.temperature
        target = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def quant(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code by L2 -> (z_q [B, D, h, w] in the codebook dtype, indices [B, h, w] int64).

        Runs in float64 and drops the per-row ||z||^2 term (it does not change
        the argmin but would swamp the small code-dependent part in float32),
        so the choice is reproducible across thread counts and devices.
        """
        self._check_input(z)
        b, _, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).double()
        weight = self.embedding.weight.double()
        d = torch.sum(weight**2, dim=1) - 2 * torch.matmul(z_flat, weight.t())
        indices = d.argmin(dim=1).view(b, h, w)
        return self.lookup(indices), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook entries of ``indices`` [B, h, w] -> [B, D, h, w]."""
        if indices.dim() != 3:
            raise ValueError(f"indices must be [B, h, w], got shape {tuple(indices.shape)}")
        indices = indices.to(device=self.embedding.weight.device, dtype=torch.long)
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.num_embed:
                raise ValueError(f"codebook index out of range [0, {self.num_embed}): min {lo}, max {hi}")
        return F.embedding(indices, self.embedding.weight).permute(0, 3, 1, 2).contiguous()

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.size(1) != self.embed_dim:
            raise ValueError(f"expected z of shape [B, {self.embed_dim}, h, w], got {tuple(z.shape)}")
