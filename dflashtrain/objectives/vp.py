"""Objective ``vp_drafter`` (D²SD variable-visible-prefix drafter; docs/objectives.md, vp_drafter).

The drafter of a DFlash block sees a *visible prefix* of p real tokens (the anchor included) and MASK after it:

    block input  = [x_a, x_{a+1}, …, x_{a+p−1}, MASK, …, MASK]          (B slots)
    P(p) ∝ base^p  for p ∈ [p_min, B − 1],  p_min = min(2, B − 1)  (1 with ``include_anchor_only``)
    loss = Σ w_k · m_k · CE_k / Σ w_k · m_k,   w_k = exp(−(k − p)/γ) for k ≥ p, 0 for k < p

DFlash labels (slot k predicts x[a+k]). p is drawn per (sequence, block). The attention rule is unchanged: the
context visible to a block is still t < a (not a + p); the prefix is seen only through the block's own slots.
So at inference a VP drafter can re-draft after an accepted prefix without new target features.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional

import torch
from torch import Tensor

from dflashtrain.config.losses import DEFAULT_PREFIX_WEIGHT_BASE, MaskMode, TargetKind
from dflashtrain.data.blocks import DraftBlocks
from dflashtrain.data.sampling import RowGenerators
from dflashtrain.objectives.metrics import SlotCounts
from dflashtrain.objectives.protocol import ChunkLoss, Normalizer, SlotChunk, constant_coefficients
from dflashtrain.objectives.slots import slot_loss, supervision_mask, weighted_sums
from dflashtrain.objectives.weights import decay_weights, first_drafted_offsets

PREFIX_LEN_SUM = "prefix_len_sum"  # ChunkLoss.stats: Σ over kept blocks of p (the first drafted slot)


def min_prefix_length(block_size: int, include_anchor_only: bool = False) -> int:
    """p_min: 1 (anchor only) when allowed, else 2 — but never past B − 1, so one slot is always drafted."""
    return 1 if include_anchor_only else min(2, block_size - 1)


def prefix_length_probs(block_size: int, base: float, include_anchor_only: bool = False) -> tuple[Tensor, Tensor]:
    """The prefix-length distribution P(p) ∝ base^p over p ∈ [p_min, B − 1].

    Returns (lengths [L] long, probs [L] float64), L = B − p_min. Computed as a softmax of p·ln(base), so large
    or small bases do not overflow. B = 3 → p ≡ 2; B = 2 → p ≡ 1.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if not base > 0:
        raise ValueError(f"prefix_weight_base must be > 0, got {base}")
    lengths = torch.arange(min_prefix_length(block_size, include_anchor_only), block_size)  # [L]
    probs = torch.softmax(lengths.double() * torch.log(torch.tensor(float(base), dtype=torch.float64)), dim=0)
    return lengths, probs


def sample_prefix_lengths(
    batch: int,
    num_blocks: int,
    block_size: int,
    base: float,
    include_anchor_only: bool = False,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """p for every (sequence, block), i.i.d. from :func:`prefix_length_probs`. -> [batch, num_blocks] long.

    ``torch.multinomial`` with replacement on ``device`` (the training device), reshaped to [batch, N].
    """
    lengths, probs = prefix_length_probs(block_size, base, include_anchor_only)
    draws = torch.multinomial(probs.to(device=device, dtype=torch.float32), batch * num_blocks, replacement=True,
                              generator=generator)  # [batch·N] indices into lengths
    return lengths.to(draws.device)[draws].reshape(batch, num_blocks)


def apply_visible_prefix(blocks: DraftBlocks, input_ids: Tensor, prefix_lengths: Tensor) -> DraftBlocks:
    """Show the real tokens x[a+k] in slots k < p of every kept block; draft and supervise only slots k ≥ p.

    blocks: DFlash blocks from ``make_blocks`` (label_offset 0); input_ids [b, S]; prefix_lengths [b, N], p ≥ 1.
    A prefix slot past the sequence (a + k ≥ S) and every slot of a dummy block stay MASK.
    """
    batch, seq_len = input_ids.shape
    slots = torch.arange(blocks.block_size, device=input_ids.device)  # [B]
    visible = slots < prefix_lengths.unsqueeze(-1)  # [b, N, B]
    in_range = blocks.position_ids < seq_len  # [b, N, B]
    real = input_ids.gather(1, blocks.position_ids.clamp(max=seq_len - 1).reshape(batch, -1))  # [b, N·B]
    shown = visible & in_range & blocks.block_keep.unsqueeze(-1)
    return replace(
        blocks,
        input_ids=torch.where(shown, real.view_as(blocks.position_ids), blocks.input_ids),
        drafted=blocks.drafted & ~visible,  # keep & k ≥ p (p ≥ 1 covers the anchor slot)
        slot_valid=blocks.slot_valid & ~visible,
    )


def vp_supervision_mask(valid: Tensor, drafted: Tensor, mode: MaskMode) -> Tensor:
    """m over the supervised suffix only. valid, drafted [..., B] bool.

    independent: m_k = valid_k ∧ drafted_k. cumulative: m_k = Π_{p ≤ j ≤ k} valid_j — prefix slots pass through
    the product whatever their validity, and are never supervised themselves.
    """
    return supervision_mask(valid & drafted, drafted, mode)


class VPDrafterObjective:
    name = "vp_drafter"
    family = "dflash"
    coefficients_at = constant_coefficients
    label_offset = 0  # DFlash convention: slot k predicts x[a + k]
    normalizer = Normalizer.weight
    coefficients = {"ce": 1.0}

    def __init__(self, prefix_weight_base: Optional[float], gamma: Optional[float], include_anchor_only: bool,
                 mask_mode: MaskMode, target: TargetKind):
        self.prefix_weight_base = DEFAULT_PREFIX_WEIGHT_BASE if prefix_weight_base is None else prefix_weight_base
        if not self.prefix_weight_base > 0:
            raise ValueError(f"prefix_weight_base must be > 0, got {self.prefix_weight_base}")
        self.gamma = gamma
        self.include_anchor_only = include_anchor_only
        self.mask_mode = MaskMode(mask_mode)
        self.target = TargetKind(target)
        self.needs_teacher = self.target == TargetKind.kd

    def prepare_blocks(self, blocks: DraftBlocks, input_ids: Tensor, rng: RowGenerators) -> DraftBlocks:
        """Sample p per block (from each row's generator, on the blocks' device) and apply the visible prefix."""
        num_blocks, block_size = blocks.input_ids.shape[1:]
        lengths, probs = prefix_length_probs(block_size, self.prefix_weight_base, self.include_anchor_only)
        draws = rng.multinomial(probs.to(device=input_ids.device, dtype=torch.float32), num_blocks)  # [b, N]
        return apply_visible_prefix(blocks, input_ids, lengths.to(draws.device)[draws])

    def __call__(self, chunk: SlotChunk) -> ChunkLoss:
        # The first drafted slot of a kept block is p, so the decay offsets are k − p.
        weights = decay_weights(first_drafted_offsets(chunk.drafted), self.gamma)  # [b, c, B]
        mask = vp_supervision_mask(chunk.valid, chunk.drafted, self.mask_mode)  # [b, c, B]
        total = weighted_sums({"ce": slot_loss(chunk, self.target)}, weights, mask)
        kept = chunk.drafted.any(dim=-1)  # [b, c]: a kept block always drafts at least slot B − 1
        prefix = (~chunk.drafted).long().cumprod(dim=-1).sum(dim=-1)  # [b, c]: leading undrafted slots = p
        total.stats[PREFIX_LEN_SUM] = (prefix * kept).sum().float()
        return total

    def metrics(self, total: ChunkLoss, counts: SlotCounts) -> Dict[str, Tensor]:
        """prefix_len: the mean sampled p over kept blocks."""
        return {"prefix_len": total.stats[PREFIX_LEN_SUM] / counts.blocks.clamp(min=1)}
