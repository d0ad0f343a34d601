"""Training of the RDEIC codec (spec 4.3 and section 5), pure torch.

Stages, each starting from the previous one's saved model (``--init``):

* ``vae``    autoencoder (only for models without pretrained SD weights, e.g. the embedded ``tiny``);
* ``prior``  the base UNet as a plain ε-prediction diffusion prior on the VAE latents;
* ``stage1`` RDEIC's independent training (residual forward process, x̂0 loss, rate, VQ);
* ``stage2`` fixed-step fine-tuning through the S-step sampler and the VAE decoder.

See docs/training.md for the recipe and commands. Modules: :mod:`.data` (photo crops),
:mod:`.stages` (per-stage losses and parameter groups), :mod:`.perceptual` (LPIPS or its
substitute), :mod:`.trainer` (the resumable loop).
"""

from __future__ import annotations

from .stages import STAGES, LossSettings
from .trainer import TrainConfig, TrainResult, train

__all__ = ["STAGES", "LossSettings", "TrainConfig", "TrainResult", "train"]
