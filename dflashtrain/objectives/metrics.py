"""Training metrics (docs/conventions.md, metrics), on the binary validity mask (no loss weights).

* ``acc``: argmax == label over valid drafted slots; ``acc_k`` per slot index.
* ``tau_est``: per kept block, 1 + the number of leading drafted slots whose argmax is right (the bonus token
  included), averaged over kept blocks. Undrafted slots (anchor, visible prefix) pass through the run.
* ``tau_cumprod``: 1 + Σ_k Π_{i≤k} acc_i, from the per-slot accuracies, for comparison.
* DSpark (:func:`confidence_sums`, :func:`summarize_confidence`): ``tau_probabilistic`` = 1 + Σ_k Π_{j≤k} c*_j·m_j
  per kept block, averaged over kept blocks; ``conf_abs_err`` = mean |σ(u) − c*| and ``conf_bias`` = mean
  (σ(u) − c*) over supervised slots; ``conf_target`` = mean c*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor


@dataclass
class SlotCounts:
    """Additive counts over a batch (or a chunk of it)."""

    correct: Tensor  # [B] correct valid slots per slot index
    valid: Tensor  # [B] valid slots per slot index
    accepted: Tensor  # scalar Σ over kept blocks of leading correct drafted slots
    blocks: Tensor  # scalar number of kept blocks

    def __add__(self, other: "SlotCounts") -> "SlotCounts":
        return SlotCounts(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


def count_slots(correct: Tensor, valid: Tensor, drafted: Tensor, block_keep: Tensor) -> SlotCounts:
    """correct, valid, drafted: [b, c, B] bool; block_keep [b, c] bool."""
    hit = correct & valid
    run = torch.where(drafted, hit, torch.ones_like(hit)).long().cumprod(dim=-1).bool() & drafted  # [b, c, B]
    return SlotCounts(
        correct=hit.flatten(0, -2).sum(dim=0).float(),
        valid=valid.flatten(0, -2).sum(dim=0).float(),
        accepted=(run & block_keep.unsqueeze(-1)).sum().float(),
        blocks=block_keep.sum().float(),
    )


def summarize(counts: SlotCounts) -> Dict[str, Tensor]:
    per_slot = counts.correct / counts.valid.clamp(min=1)
    drafted_slots = counts.valid > 0
    metrics = {
        "acc": counts.correct.sum() / counts.valid.sum().clamp(min=1),
        "tau_est": 1 + counts.accepted / counts.blocks.clamp(min=1),
        "tau_cumprod": 1 + torch.where(drafted_slots, per_slot, torch.ones_like(per_slot)).cumprod(0)[drafted_slots].sum(),
    }
    for k in torch.nonzero(drafted_slots).flatten().tolist():
        metrics[f"acc_k/{k}"] = per_slot[k]
    return metrics


# Additive DSpark sums (chunk -> batch by addition), carried in ChunkLoss.stats (never in the loss);
# ``summarize_confidence`` turns them into metrics.
TAU_PROB_SUM, CONF_TARGET_SUM, CONF_ABS_ERR_SUM, CONF_BIAS_SUM = (
    "tau_prob_sum", "conf_target_sum", "conf_abs_err_sum", "conf_bias_sum")


def confidence_sums(c_star: Tensor, mask: Tensor, confidence: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Detached sums over a chunk. c_star [..., B] in [0, 1], mask [..., B] bool (m), confidence σ(u) [..., B].

        tau_prob_sum    = Σ_blocks Σ_k Π_{j≤k} c*_j·m_j       (a dummy block has m = 0 and adds 0)
        conf_target_sum = Σ m·c*
        conf_abs_err_sum = Σ m·|σ(u) − c*|,  conf_bias_sum = Σ m·(σ(u) − c*)   (only with a confidence head)
    """
    c_star, m = c_star.detach().float(), mask.float()
    sums = {
        TAU_PROB_SUM: (c_star * m).cumprod(dim=-1).sum(),
        CONF_TARGET_SUM: (c_star * m).sum(),
    }
    if confidence is not None:
        error = confidence.detach().float() - c_star
        sums[CONF_ABS_ERR_SUM] = (error.abs() * m).sum()
        sums[CONF_BIAS_SUM] = (error * m).sum()
    return sums


def summarize_confidence(sums: Dict[str, Tensor], num_blocks: Tensor, num_slots: Tensor) -> Dict[str, Tensor]:
    """Metrics from batch sums: num_blocks = kept blocks, num_slots = Σ m (supervised slots)."""
    blocks, slots = num_blocks.clamp(min=1), num_slots.clamp(min=1)
    metrics = {
        "tau_probabilistic": 1 + sums[TAU_PROB_SUM] / blocks,
        "conf_target": sums[CONF_TARGET_SUM] / slots,
    }
    if CONF_ABS_ERR_SUM in sums:
        metrics["conf_abs_err"] = sums[CONF_ABS_ERR_SUM] / slots
        metrics["conf_bias"] = sums[CONF_BIAS_SUM] / slots
    return metrics
