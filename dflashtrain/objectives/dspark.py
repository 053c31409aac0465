"""Objective ``dspark`` (DSpark; docs/objectives.md, dspark): next-token convention, Markov-biased logits, a confidence head.

Per slot k of a block (slot k predicts x[a+k+1]; every slot is drafted), all softmaxes in fp32:

    z_k   = lm_head(h_k) + W2·W1[prev_k]                 (the dspark family's logits add the Markov bias)
    p_t,k = softmax(lm_head(h^T_final[a+k]))             target distribution, T = 1, no grad
    CE_k  = −log softmax(z_k)[x_{a+k+1}]
    L1_k  = Σ_v |softmax(z_k)_v − p_t,k,v|               ∈ [0, 2]
    c*_k  = clamp(1 − ½·L1_k, 0, 1)                      detached: the confidence head's target
    BCE_k = BCEWithLogits(u_k, c*_k)                     u_k = confidence logit (the family's extras)

    w_k = exp(−k/γ), m = cumulative validity (default);   term_t = Σ w·m·ℓ_t / Σ w·m
    loss = ce_alpha·CE + l1_alpha·L1 + conf_alpha·BCE

The chunk returns the three numerators Σ w·m·ℓ_t under "ce", "l1", "bce"; :attr:`coefficients` holds the alphas
the step multiplies them by (it logs each term un-weighted). ``ChunkLoss.stats`` carries the additive sums of the
DSpark metrics (``tau_probabilistic``, confidence error and bias), summarized by :meth:`metrics`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dflashtrain.config.losses import MaskMode
from dflashtrain.objectives.protocol import ChunkLoss, Normalizer, SlotChunk, constant_coefficients, unchanged_blocks
from dflashtrain.objectives.slots import supervision_mask, weighted_sums
from dflashtrain.objectives.metrics import SlotCounts, confidence_sums, summarize_confidence
from dflashtrain.objectives.weights import decay_weights, first_drafted_offsets

CONFIDENCE_LOGITS = "confidence_logits"  # SlotChunk.extras key the dspark family's logits fill: u [b, c, B]


def l1_distance(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """L1_k = Σ_v |softmax(z_k) − softmax(z_T,k)|. logits, teacher_logits [..., V] -> [...] fp32 in [0, 2]."""
    return ce_and_l1(logits, teacher_logits, None)[1]


def ce_and_l1(logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor]) -> tuple:
    """(CE_k or None, L1_k) from one log-softmax of z: p = exp(log p), CE = −log p[label], L1 = ‖p − p_t‖₁.

    logits, teacher_logits [..., V], labels [...] -> ([...], [...]) fp32. The teacher's softmax has no gradient.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        target = torch.softmax(teacher_logits.float(), dim=-1)
    l1 = torch.linalg.vector_norm(log_p.exp() - target, ord=1, dim=-1)
    ce = None if labels is None else -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return ce, l1


def confidence_target(l1: Tensor) -> Tensor:
    """c*_k = clamp(1 − ½·L1_k, 0, 1), detached (the total-variation overlap of the two distributions)."""
    return (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)


class DSparkObjective:
    name = "dspark"
    family = "dspark"  # the Markov and confidence heads, sequential drafting
    coefficients_at = constant_coefficients
    label_offset = 1  # next-token convention: slot k predicts x[a + k + 1], slot 0 supervised
    normalizer = Normalizer.weight
    needs_teacher = True  # p_t comes from the target's final hidden state at label_pos − 1 = a + k
    prepare_blocks = staticmethod(unchanged_blocks)

    def __init__(self, ce_alpha: float, l1_alpha: float, conf_alpha: float, gamma: Optional[float],
                 mask_mode: MaskMode):
        self.gamma = gamma
        self.mask_mode = MaskMode(mask_mode)
        self.uses_confidence = conf_alpha > 0  # the confidence head exists iff its loss weight is > 0
        self.coefficients: Dict[str, float] = {"ce": float(ce_alpha), "l1": float(l1_alpha)}
        if self.uses_confidence:
            self.coefficients["bce"] = float(conf_alpha)

    def __call__(self, chunk: SlotChunk) -> ChunkLoss:
        if chunk.teacher_logits is None:
            raise ValueError("loss=dspark needs the target's logits at label_pos − 1 (needs_teacher)")
        weights = decay_weights(first_drafted_offsets(chunk.drafted), self.gamma)  # [b, c, B]: exp(−k/γ)
        mask = supervision_mask(chunk.valid, chunk.drafted, self.mask_mode)  # [b, c, B]
        ce, l1 = ce_and_l1(chunk.logits, chunk.teacher_logits, chunk.labels)  # [b, c, B] each
        c_star = confidence_target(l1)
        per_slot = {"ce": ce, "l1": l1}
        confidence = None
        if self.uses_confidence:
            if CONFIDENCE_LOGITS not in chunk.extras:
                raise ValueError("conf_alpha > 0 needs the confidence head's logits (model.drafter.markov_rank > 0)")
            u = chunk.extras[CONFIDENCE_LOGITS].float()  # [b, c, B]
            per_slot["bce"] = F.binary_cross_entropy_with_logits(u, c_star, reduction="none")
            confidence = torch.sigmoid(u)
        total = weighted_sums(per_slot, weights, mask)
        total.stats.update(confidence_sums(c_star, mask, confidence))
        return total

    def metrics(self, total: ChunkLoss, counts: SlotCounts) -> Dict[str, Tensor]:
        """tau_probabilistic, conf_target, conf_abs_err, conf_bias from the batch's summed chunk."""
        return summarize_confidence(total.stats, counts.blocks, total.token_sum)
