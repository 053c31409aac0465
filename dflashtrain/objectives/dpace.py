"""Objective ``dpace`` (D-PACE; docs/objectives.md, dpace): detached slot weights from the drafter's own confidence.

Per block, over drafted slots j (DFlash convention, slot 0 is the given anchor):

    q_j = exp(−CE_j)          probability of the data token, detached (target=kd: a separate no-grad hard CE)
    q̃_j = α + (1 − α)·q_j     1 on invalid slots, before the product
    C_j = Π_{i≤j} q̃_i,  w_j = valid_j · Σ_{m≥j} C_m·valid_m          (mode full; cumulative: C_j;
                                                                      continuation: suffix / C_j)
    loss = Σ w·m·ℓ / den,  den = Σ w·m (weighted_mean) | Σ m (per_token) | number of sequences (per_sequence)

ℓ is hard CE on the data token, or soft CE against the target with ``target: kd``. m is the supervision mask
(``independent`` or ``cumulative``, docs/conventions.md); slots outside m count as invalid in the weights too. The decay γ
is ignored (the schema warns when it is set). The step applies ``den`` through :attr:`normalizer`.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.losses import DPaceMode, MaskMode, Reduction, TargetKind
from dflashtrain.objectives.protocol import (
    ChunkLoss,
    Normalizer,
    SlotChunk,
    constant_coefficients,
    no_metrics,
    unchanged_blocks,
)
from dflashtrain.objectives.slots import slot_cross_entropy, slot_loss, supervision_mask, weighted_sums
from dflashtrain.objectives.weights import dpace_weights

# Reduction name (the published implementations differ exactly here) -> the global denominator.
REDUCTION_NORMALIZER = {
    Reduction.weighted_mean: Normalizer.weight,  # Σ w·m
    Reduction.per_token: Normalizer.tokens,  # Σ m
    Reduction.per_sequence: Normalizer.sequences,  # sequences in the global batch
}


class DPaceObjective:
    name = "dpace"
    family = "dflash"
    coefficients_at = constant_coefficients
    label_offset = 0  # DFlash convention: slot k predicts x[a + k]
    coefficients = {"ce": 1.0}
    prepare_blocks = staticmethod(unchanged_blocks)
    metrics = staticmethod(no_metrics)

    def __init__(self, alpha: float, mode: DPaceMode, reduction: Reduction, gamma: Optional[float],
                 mask_mode: MaskMode, target: TargetKind):
        if not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
            raise ConfigError("loss.alpha", f"must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.mode = DPaceMode(mode)
        self.reduction = Reduction(reduction)
        self.normalizer = REDUCTION_NORMALIZER[self.reduction]
        self.mask_mode = MaskMode(mask_mode)
        self.target = TargetKind(target)
        self.needs_teacher = self.target == TargetKind.kd
        del gamma  # ignored under dpace: the schema keeps it only to warn when it is set

    def __call__(self, chunk: SlotChunk) -> ChunkLoss:
        return weighted_sums(*self.slot_terms(chunk))

    def slot_terms(self, chunk: SlotChunk) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
        """(per-slot losses {"ce": ℓ}, weights w, mask m), each [b, c, B]: what the chunk's sums are made of."""
        mask = supervision_mask(chunk.valid, chunk.drafted, self.mask_mode)  # [b, c, B]
        loss = slot_loss(chunk, self.target)  # [b, c, B]
        with torch.no_grad():
            hard_ce = loss if self.target == TargetKind.hard else slot_cross_entropy(chunk.logits, chunk.labels)
            confidence = torch.exp(-hard_ce.detach())  # q [b, c, B]
        weights = dpace_weights(confidence, mask, self.alpha, self.mode.value)  # [b, c, B], no grad
        return {"ce": loss}, weights, mask
