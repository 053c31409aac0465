"""Slot weights, each a small pure function of tensors (tested against SPEC's vectors)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


def decay_weights(slot_offsets: Union[Tensor, int], gamma: Optional[float]) -> Tensor:
    """w = exp(−offset / γ) where ``offset`` counts slots from the first drafted one (which weighs 1).

    DFlash convention: offset = k − 1 for k ≥ 1; next-token: offset = k; VP drafter: offset = k − p.
    ``gamma`` 0 or None disables decay (all weights 1). Negative offsets (undrafted slots) get weight 0.
    An int gives the vector for offsets 0..n−1.
    """
    offsets = torch.arange(slot_offsets) if isinstance(slot_offsets, int) else slot_offsets
    offsets = offsets.float()
    if not gamma:
        weights = torch.ones_like(offsets)
    else:
        weights = torch.exp(-offsets.clamp(min=0) / gamma)
    return weights.masked_fill(offsets < 0, 0.0)


def first_drafted_offsets(drafted: Tensor) -> Tensor:
    """For drafted [..., B] bool, each slot's distance from the block's first drafted slot (negative before it)."""
    slots = torch.arange(drafted.shape[-1], device=drafted.device)
    first = torch.where(drafted, slots, drafted.shape[-1]).amin(dim=-1, keepdim=True)  # [..., 1]
    return slots - first
