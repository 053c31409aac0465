"""Training metrics of SPEC §7, on the binary validity mask (no loss weights).

* ``acc``: argmax == label over valid drafted slots; ``acc_k`` per slot index.
* ``tau_est``: per kept block, 1 + the number of leading drafted slots whose argmax is right (the bonus token
  included), averaged over kept blocks. Undrafted slots (anchor, visible prefix) pass through the run.
* ``tau_cumprod``: 1 + Σ_k Π_{i≤k} acc_i, from the per-slot accuracies, for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

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
