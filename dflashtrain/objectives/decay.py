"""Objective ``decay`` (DFlash; docs/objectives.md, decay).

    loss = Σ w_k · m_k · ℓ_k / Σ w_k · m_k,    w_k = exp(−(k − 1)/γ) for drafted slots k ≥ 1

m is the supervision mask (``independent`` or ``cumulative``, docs/conventions.md); ℓ is hard CE on the data
token or, with ``target: kd``, soft CE against the target's distribution. γ = 0 or null gives all weights 1.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import Tensor

from dflashtrain.config.losses import MaskMode, TargetKind
from dflashtrain.objectives.protocol import (
    ChunkLoss,
    Normalizer,
    SlotChunk,
    constant_coefficients,
    no_metrics,
    unchanged_blocks,
)
from dflashtrain.objectives.slots import slot_loss, supervision_mask, weighted_sums
from dflashtrain.objectives.weights import decay_weights, first_drafted_offsets


class DecayObjective:
    name = "decay"
    family = "dflash"
    coefficients_at = constant_coefficients
    label_offset = 0  # DFlash convention: slot k predicts x[a + k]
    normalizer = Normalizer.weight
    coefficients = {"ce": 1.0}
    prepare_blocks = staticmethod(unchanged_blocks)
    metrics = staticmethod(no_metrics)

    def __init__(self, gamma: Optional[float], mask_mode: MaskMode, target: TargetKind):
        self.gamma = gamma
        self.mask_mode = MaskMode(mask_mode)
        self.target = TargetKind(target)
        self.needs_teacher = self.target == TargetKind.kd

    def __call__(self, chunk: SlotChunk) -> ChunkLoss:
        return weighted_sums(*self.slot_terms(chunk))

    def slot_terms(self, chunk: SlotChunk) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
        """(per-slot losses {"ce": ℓ}, weights w, mask m), each [b, c, B]: what the chunk's sums are made of."""
        weights = decay_weights(first_drafted_offsets(chunk.drafted), self.gamma)  # [b, c, B]
        mask = supervision_mask(chunk.valid, chunk.drafted, self.mask_mode)
        return {"ce": slot_loss(chunk, self.target)}, weights, mask
