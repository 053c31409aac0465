"""Per-slot pieces every objective shares: slot losses, validity modes, and weighted sums of a chunk.

Notation (docs/conventions.md): w = slot weights, m = supervision mask, ℓ = per-slot loss.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from dflashtrain.config.losses import MaskMode, TargetKind
from dflashtrain.objectives.protocol import ChunkLoss, SlotChunk


def slot_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE_k = −log softmax(z_k)[label_k]. logits [..., V], labels [...] -> [...] fp32."""
    flat = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
    return flat.view(labels.shape)


def soft_cross_entropy(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KD (docs/conventions.md, targets): −Σ_v softmax(z_T)_v · log_softmax(z_D)_v, no temperature. -> [...] fp32."""
    teacher = torch.softmax(teacher_logits.float(), dim=-1)
    return -(teacher * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def slot_loss(chunk: SlotChunk, target: TargetKind) -> Tensor:
    """The per-slot loss the objective weights: hard CE on data tokens, or KD against the target."""
    if target == TargetKind.hard:
        return slot_cross_entropy(chunk.logits, chunk.labels)
    if target == TargetKind.kd:
        if chunk.teacher_logits is None:
            raise ValueError("target=kd needs teacher logits for the chunk")
        return soft_cross_entropy(chunk.logits, chunk.teacher_logits)
    raise ValueError(f"unknown target {target!r}; valid: {[t.value for t in TargetKind]}")


def cumulative_mask(valid: Tensor, drafted: Tensor) -> Tensor:
    """m_k = Π_{j ≤ k, j drafted} valid_j: a slot counts only if every earlier drafted slot counts.

    Slots that are not drafted (the anchor slot, a visible prefix) pass through the product. [..., B] bool.
    """
    passes = torch.where(drafted, valid, torch.ones_like(valid))
    return passes.long().cumprod(dim=-1).bool() & valid & drafted


def supervision_mask(valid: Tensor, drafted: Tensor, mode: MaskMode) -> Tensor:
    if mode == MaskMode.independent:
        return valid
    if mode == MaskMode.cumulative:
        return cumulative_mask(valid, drafted)
    raise ValueError(f"unknown mask mode {mode!r}; valid: {[m.value for m in MaskMode]}")


def weighted_sums(per_slot: Dict[str, Tensor], weights: Tensor, mask: Tensor) -> ChunkLoss:
    """Additive sums of a chunk: terms Σ w·m·ℓ per name, Σ w·m, Σ m and Σ w·m per slot (no statistics).

    per_slot: name -> [b, c, B]; weights [b, c, B] or [B]; mask [b, c, B] bool.
    """
    wm = (weights * mask).float().expand(mask.shape)  # [b, c, B]
    return ChunkLoss(
        terms={name: (wm * values.masked_fill(~mask, 0.0)).sum() for name, values in per_slot.items()},
        weight_sum=wm.sum(),
        token_sum=mask.float().sum(),
        slot_weight_sum=wm.flatten(0, -2).sum(dim=0),
    )
