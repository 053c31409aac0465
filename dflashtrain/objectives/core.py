"""Pieces every objective shares: per-slot losses, validity modes, and the chunk contract.

An objective sees one chunk of blocks at a time (:class:`SlotChunk`, all tensors ``[b, c, B, ...]``) and returns
additive sums (:class:`ChunkLoss`); the module adds the chunks up and applies the global reduction of SPEC §2.4:

    loss = W · Σ_terms α_t · num_t  /  (all_reduce(den) + ε)

where ``den`` is Σ w·m (``weighted_mean``), Σ m (``per_token``) or the number of sequences (``per_sequence``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dflashtrain.config import MaskMode, TargetKind

NORMALIZERS = ("weight", "tokens", "sequences")


@dataclass
class SlotChunk:
    logits: Tensor  # [b, c, B, V] fp32 drafter logits
    labels: Tensor  # [b, c, B] long
    valid: Tensor  # [b, c, B] bool: drafted and supervised
    drafted: Tensor  # [b, c, B] bool: slots the drafter predicts (suffix after the visible prefix)
    teacher_logits: Optional[Tensor] = None  # [b, c, B, V] fp32 target logits at label_pos - 1
    extras: Dict[str, Tensor] = field(default_factory=dict)  # objective-specific tensors (e.g. prefix lengths)


@dataclass
class ChunkLoss:
    terms: Dict[str, Tensor]  # name -> Σ w·m·ℓ over the chunk (scalar)
    weight_sum: Tensor  # Σ w·m
    token_sum: Tensor  # Σ m
    slot_weight_sum: Tensor  # [B] Σ over blocks of w·m per slot (for logging mean weights)


def slot_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE_k = −log softmax(z_k)[label_k]. logits [..., V], labels [...] -> [...] fp32."""
    flat = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
    return flat.view(labels.shape)


def soft_cross_entropy(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KD (SPEC §2.3): −Σ_v softmax(z_T)_v · log_softmax(z_D)_v, no temperature. -> [...] fp32."""
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
    """Additive sums of a chunk. per_slot: name -> [b, c, B]; weights [b, c, B] or [B]; mask [b, c, B] bool."""
    wm = (weights * mask).float().expand(mask.shape)  # [b, c, B]
    return ChunkLoss(
        terms={name: (wm * values.masked_fill(~mask, 0.0)).sum() for name, values in per_slot.items()},
        weight_sum=wm.sum(),
        token_sum=mask.float().sum(),
        slot_weight_sum=wm.flatten(0, -2).sum(dim=0),
    )
