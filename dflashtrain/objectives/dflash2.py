"""Objective ``dflash2`` (DFlash2; docs/dflash2.md, objective): a DFlash base objective on the unary logits plus the
candidate selector's cross-entropy, pooled over the base's own denominator.

Per block (DFlash convention: slot k ≥ 1 predicts x_{a+k}), with the base's slot weights w and mask m (decay, or
D-PACE with ``base: dpace``):

    ℓ_k     = the base's per-slot loss on U_k = lm_head(h_k)
    S_k(c)  = U_k[c] + <A[x_{a+k−1}] ⊙ P h_k, Bs[c]>,  c ∈ C_k = TopK(U_k, K)      (teacher-forced predecessor)
    ℓ^sel_k = −log softmax_{c ∈ C'_k} S_k(c) [x_{a+k}]
              exclude (default): C'_k = C_k, and no selector loss where x_{a+k} ∉ C_k (g_k = 0, else 1)
              inject:            the weakest candidate (last of C_k) is replaced by x_{a+k} when it is missing
    loss    = (Σ w·m·ℓ + α·Σ w·m·g·ℓ^sel) / Σ w·m

α (``selector_alpha``) may start at 0 for ``selector_warmup_ratio`` of the steps and then ramp linearly to α over
``selector_ramp_ratio`` of them (:func:`selector_alpha_at`). ``selector_stop_gradient`` is applied where the
scores are made (the family detaches U and h inside S). Metrics, on the binary validity mask: ``gold_in_topk``
(label among the K candidates), ``selector_acc`` (the selector's choice from the true predecessor is the label,
among the true candidates), ``selector_tau_est`` (1 + the leading run of such choices per block: the accepted
length of the selector's own walk, since the walk follows the labels until its first miss).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from dflashtrain.config.losses import DFlash2Base, DPaceMode, MaskMode, Reduction, SelectorGold, TargetKind
from dflashtrain.objectives.decay import DecayObjective
from dflashtrain.objectives.dpace import DPaceObjective
from dflashtrain.objectives.metrics import SlotCounts
from dflashtrain.objectives.protocol import ChunkLoss, Normalizer, SlotChunk, unchanged_blocks
from dflashtrain.objectives.slots import weighted_sums

# SlotChunk.extras keys the dflash2 family's logits fill
SELECTOR_CANDIDATES = "selector_candidates"  # [b, c, B, K] long
SELECTOR_SCORES = "selector_scores"  # [b, c, B, K] fp32
SELECTOR_GOLD_SCORE = "selector_gold_score"  # [b, c, B] fp32
CORRECT_SUM, IN_TOPK_SUM, RUN_SUM = "selector_correct_sum", "selector_in_topk_sum", "selector_run_sum"


def selector_cross_entropy(scores: Tensor, candidates: Tensor, gold_score: Tensor, labels: Tensor, inject: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-slot selector CE and what it needs. scores, candidates [..., K]; gold_score, labels [...].

    Returns (ce [...] fp32, supervised g [...] bool, correct [...] bool: argmax over the true candidates is the
    label, in_topk [...] bool). With ``inject`` the label replaces the last candidate where it is missing.
    """
    match = candidates == labels.unsqueeze(-1)  # [..., K]
    in_topk = match.any(dim=-1)
    position = match.float().argmax(dim=-1)  # the label's index among the candidates (0 when absent)
    correct = in_topk & (scores.argmax(dim=-1) == position)
    if inject:
        injected = torch.cat([scores[..., :-1], gold_score.unsqueeze(-1)], dim=-1)
        scores = torch.where(in_topk.unsqueeze(-1), scores, injected)
        position = torch.where(in_topk, position, scores.shape[-1] - 1)
        supervised = torch.ones_like(in_topk)
    else:
        supervised = in_topk
    ce = torch.logsumexp(scores, dim=-1) - scores.gather(-1, position.unsqueeze(-1)).squeeze(-1)
    return ce, supervised, correct, in_topk


def selector_alpha_at(step: int, total_steps: int, alpha: float, warmup_ratio: float, ramp_ratio: float) -> float:
    """α_eff: 0 for the first warmup_ratio·total steps, then a linear ramp over ramp_ratio·total steps, then α."""
    warmup, ramp = warmup_ratio * total_steps, ramp_ratio * total_steps
    if step < warmup:
        return 0.0
    if step < warmup + ramp:
        return alpha * (step - warmup) / ramp
    return alpha


class DFlash2Objective:
    name = "dflash2"
    family = "dflash2"  # dynamic convolutions + candidate selector
    label_offset = 0  # DFlash convention; serving uses the anchor as the bonus token
    normalizer = Normalizer.weight  # the selector term shares the base's Σ w·m
    prepare_blocks = staticmethod(unchanged_blocks)

    def __init__(self, base: DFlash2Base, gamma: Optional[float], dpace_alpha: float, dpace_mode: DPaceMode,
                 mask_mode: MaskMode, target: TargetKind, selector_alpha: float, selector_gold: SelectorGold,
                 selector_warmup_ratio: float, selector_ramp_ratio: float, selector_stop_gradient: bool):
        if DFlash2Base(base) == DFlash2Base.dpace:
            self.base = DPaceObjective(dpace_alpha, dpace_mode, Reduction.weighted_mean, None, mask_mode, target)
        else:
            self.base = DecayObjective(gamma, mask_mode, target)
        self.needs_teacher = self.base.needs_teacher
        self.inject = SelectorGold(selector_gold) == SelectorGold.inject
        self.alpha = float(selector_alpha)
        self.warmup_ratio, self.ramp_ratio = float(selector_warmup_ratio), float(selector_ramp_ratio)
        self.coefficients = {"ce": 1.0, "selector_ce": self.alpha}
        del selector_stop_gradient  # the family applies it (head option), where the scores are computed

    def coefficients_at(self, step: int, total_steps: int) -> Mapping[str, float]:
        alpha = selector_alpha_at(step, total_steps, self.alpha, self.warmup_ratio, self.ramp_ratio)
        return {"ce": 1.0, "selector_ce": alpha}

    def __call__(self, chunk: SlotChunk) -> ChunkLoss:
        per_slot, weights, mask = self.base.slot_terms(chunk)
        total = weighted_sums(per_slot, weights, mask)
        extras = chunk.extras
        if SELECTOR_SCORES not in extras:
            raise ValueError("loss=dflash2 needs the candidate selector's scores (the dflash2 family's logits)")
        ce, supervised, correct, in_topk = selector_cross_entropy(
            extras[SELECTOR_SCORES], extras[SELECTOR_CANDIDATES], extras[SELECTOR_GOLD_SCORE], chunk.labels,
            self.inject)
        selected = mask & supervised
        total.terms["selector_ce"] = ((weights * selected).float() * ce.masked_fill(~selected, 0.0)).sum()
        hit = correct & chunk.valid
        run = torch.where(chunk.drafted, hit, torch.ones_like(hit)).long().cumprod(dim=-1).bool() & chunk.drafted
        total.stats.update({CORRECT_SUM: hit.float().sum(), IN_TOPK_SUM: (in_topk & chunk.valid).float().sum(),
                            RUN_SUM: run.float().sum()})
        return total

    def metrics(self, total: ChunkLoss, counts: SlotCounts) -> Dict[str, Tensor]:
        slots, blocks = counts.valid.sum().clamp(min=1), counts.blocks.clamp(min=1)
        return {"selector_acc": total.stats[CORRECT_SUM] / slots, "gold_in_topk": total.stats[IN_TOPK_SUM] / slots,
                "selector_tau_est": 1 + total.stats[RUN_SUM] / blocks}
