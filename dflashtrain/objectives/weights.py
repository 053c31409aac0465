"""Slot weights, each a small pure function of tensors (tested against the vectors in docs/objectives.md)."""

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


def dpace_raw_weights(confidence: Tensor, valid: Tensor, alpha: float, mode: str = "full") -> Tensor:
    """D-PACE slot weights before re-masking (docs/objectives.md, dpace), per block along the last dim; never crosses blocks.

        q̃_j = α + (1 − α)·q_j on valid slots, 1 elsewhere (anchor, out of range, loss_mask 0, dummy block)
        C_j = Π_{i≤j} q̃_i                      (cumulative confidence)
        full:         w_j = Σ_{m≥j} C_m·valid_m  (= ∂/∂log q̃_j of Σ_m C_m·valid_m)
        cumulative:   w_j = C_j
        continuation: w_j = Σ_{m≥j} C_m·valid_m / max(C_j, tiny)

    confidence q [..., B] (probability of the label, any dtype; detached here), valid [..., B] bool -> [..., B]
    fp32 without grad. The value at an invalid slot is not zero: :func:`dpace_weights` multiplies by valid.
    """
    with torch.no_grad():
        q_tilde = torch.where(valid, alpha + (1.0 - alpha) * confidence.detach().float(), 1.0)  # [..., B]
        conf_cum = q_tilde.cumprod(dim=-1)  # C [..., B]
        if mode == "cumulative":
            return conf_cum
        suffix = (conf_cum * valid).flip(-1).cumsum(dim=-1).flip(-1)  # Σ_{m≥j} C_m·valid_m [..., B]
        if mode == "full":
            return suffix
        if mode == "continuation":
            return suffix / conf_cum.clamp(min=torch.finfo(torch.float32).tiny)
    raise ValueError(f"unknown D-PACE mode {mode!r}; valid: ['full', 'cumulative', 'continuation']")


def dpace_weights(confidence: Tensor, valid: Tensor, alpha: float, mode: str = "full") -> Tensor:
    """D-PACE weights re-masked by validity: ``dpace_raw_weights(...) · valid``. [..., B] fp32, no grad."""
    return dpace_raw_weights(confidence, valid, alpha, mode) * valid
