"""LPIPS v0.1 (AlexNet) for the audit: the network training's perceptual loss already defines.

The model itself is ``rdeic_core.training.perceptual.LPIPSAlex`` and stays there: stage-2 training
uses it as its loss, and one definition means the LPIPS an audit reports is the LPIPS a model was
trained against. This module only builds it from the two state dicts the audit found
(:func:`perceptual.weights.find_weights`: the AlexNet backbone, then the lin layers).
"""

from __future__ import annotations

from typing import Any


def build_lpips(alexnet_state: dict[str, Any], lin_state: dict[str, Any]) -> Any:
    """LPIPS-alex, frozen, eval mode: ``net(x, y)`` with inputs in [-1, 1] -> one distance per image."""
    from rdeic_core.training.perceptual import LPIPSAlex

    return LPIPSAlex(alexnet_state, lin_state)
