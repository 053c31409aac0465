"""Objective ``decay`` (DFlash, SPEC §3).

    loss = Σ w_k · m_k · CE_k / Σ w_k · m_k,    w_k = exp(−(k − 1)/γ) for drafted slots k ≥ 1

m is the validity mask (``independent`` or ``cumulative``, SPEC §2.2); CE is hard CE on the data token or, with
``target: kd``, soft CE against the target's distribution. γ = 0 or null gives all weights 1.
"""

from __future__ import annotations

from typing import Optional

from dflashtrain.config import MaskMode, TargetKind
from dflashtrain.objectives.core import ChunkLoss, SlotChunk, slot_loss, supervision_mask, weighted_sums
from dflashtrain.objectives.weights import decay_weights, first_drafted_offsets


class DecayObjective:
    name = "decay"
    label_offset = 0  # DFlash convention: slot k predicts x[a + k]
    normalizer = "weight"

    def __init__(self, gamma: Optional[float] = 7.0, mask_mode: MaskMode = MaskMode.independent,
                 target: TargetKind = TargetKind.hard):
        self.gamma = gamma
        self.mask_mode = MaskMode(mask_mode)
        self.target = TargetKind(target)

    @property
    def needs_teacher(self) -> bool:
        return self.target == TargetKind.kd

    def __call__(self, chunk: SlotChunk) -> ChunkLoss:
        weights = decay_weights(first_drafted_offsets(chunk.drafted), self.gamma)  # [b, c, B]
        mask = supervision_mask(chunk.valid, chunk.drafted, self.mask_mode)
        return weighted_sums({"ce": slot_loss(chunk, self.target)}, weights, mask)
