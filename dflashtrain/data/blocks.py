"""Anchors, block inputs, position ids and labels (docs/architecture.md, anchors and blocks; docs/conventions.md).

For an anchor ``a`` and slot ``k`` of a block of size B:

* input token: ``x[a]`` at slot 0, MASK elsewhere (a dummy block is all MASK);
* position id: ``a + k`` (absolute RoPE);
* label position: ``a + k + label_offset`` — ``label_offset = 0`` is the DFlash convention (slot k predicts
  ``x[a+k]``, slot 0 is the given anchor and is not drafted), ``1`` the next-token convention (slot k predicts
  ``x[a+k+1]``, every slot drafted);
* valid: ``keep · drafted · [label_pos < S] · loss_mask[label_pos]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor


@dataclass
class DraftBlocks:
    anchor_positions: Tensor  # [b, N] long, sorted; dummy blocks hold 0 and sit after the real ones
    block_keep: Tensor  # [b, N] bool
    input_ids: Tensor  # [b, N, B] long
    position_ids: Tensor  # [b, N, B] long, a + k
    label_ids: Tensor  # [b, N, B] long (0 where the label position is out of range)
    label_positions: Tensor  # [b, N, B] long, a + k + label_offset, clamped into [0, S - 1]
    drafted: Tensor  # [b, N, B] bool, slots the drafter predicts (slot 0 excluded in the DFlash convention)
    slot_valid: Tensor  # [b, N, B] bool, drafted and supervised

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[-1]

    def chunk(self, start: int, stop: int) -> "DraftBlocks":
        """Blocks start..stop-1 of every sequence."""
        return DraftBlocks(**{f.name: getattr(self, f.name)[:, start:stop] for f in fields(self)})


def anchor_candidates(loss_mask: Tensor) -> Tensor:
    """[b, S] -> [b, S - 1] bool: a is a candidate iff loss_mask[a] and loss_mask[a + 1]."""
    supervised = loss_mask.bool()
    return supervised[:, :-1] & supervised[:, 1:]


def sample_anchors(
    loss_mask: Tensor, num_anchors: int, generator: Optional[torch.Generator] = None,
    uniforms: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Up to N anchors per sequence, uniformly without replacement, sorted, padded with dummy blocks.

    ``uniforms`` [b, W] are the random scores to rank candidates by (the first S − 1 columns are used, missing ones
    count as 0: only padding lies there); without them they are drawn from ``generator``.
    Returns anchor_positions [b, N] (long) and block_keep [b, N] (bool).
    """
    candidates = anchor_candidates(loss_mask)  # [b, S - 1]
    batch, num_positions = candidates.shape
    if uniforms is None:
        scores = torch.rand(batch, num_positions, generator=generator, device=loss_mask.device)
    else:
        scores = uniforms[:, :num_positions]
        if scores.shape[1] < num_positions:
            scores = torch.cat([scores, scores.new_zeros(batch, num_positions - scores.shape[1])], dim=1)
    scores = scores.masked_fill(~candidates, -1.0)  # non-candidates rank below every candidate
    if num_positions < num_anchors:  # short batch: pad with non-candidates so top-k can return N
        scores = torch.cat([scores, scores.new_full((batch, num_anchors - num_positions), -1.0)], dim=1)
    top_scores, positions = scores.topk(num_anchors, dim=1)
    keep = top_scores >= 0
    positions = positions.masked_fill(~keep, 0)
    # Real anchors in increasing position, dummies last.
    order = torch.where(keep, positions, positions.new_full((), scores.shape[1])).argsort(dim=1)
    return positions.gather(1, order), keep.gather(1, order)


def make_blocks(
    input_ids: Tensor,
    loss_mask: Tensor,
    anchor_positions: Tensor,
    block_keep: Tensor,
    block_size: int,
    mask_token_id: int,
    label_offset: int,
) -> DraftBlocks:
    """Block inputs, positions and labels for the given anchors. input_ids, loss_mask: [b, S]."""
    if label_offset not in (0, 1):
        raise ValueError(f"label_offset must be 0 (DFlash) or 1 (next-token), got {label_offset}")
    batch, seq_len = input_ids.shape
    slots = torch.arange(block_size, device=input_ids.device)  # [B]
    position_ids = anchor_positions.unsqueeze(-1) + slots  # [b, N, B]
    label_positions = position_ids + label_offset
    in_range = label_positions < seq_len
    label_positions = label_positions.clamp(max=seq_len - 1)
    flat = label_positions.view(batch, -1)
    label_ids = input_ids.gather(1, flat).view_as(label_positions).masked_fill(~in_range, 0)
    label_supervised = loss_mask.bool().gather(1, flat).view_as(label_positions) & in_range

    keep = block_keep.unsqueeze(-1)  # [b, N, 1]
    drafted = (slots >= 1 - label_offset).expand_as(position_ids) & keep
    anchor_tokens = input_ids.gather(1, anchor_positions)  # [b, N]
    block_input = torch.full_like(position_ids, mask_token_id)
    block_input[..., 0] = torch.where(block_keep, anchor_tokens, torch.full_like(anchor_tokens, mask_token_id))
    return DraftBlocks(
        anchor_positions=anchor_positions,
        block_keep=block_keep,
        input_ids=block_input,
        position_ids=position_ids,
        label_ids=label_ids,
        label_positions=label_positions,
        drafted=drafted,
        slot_valid=drafted & label_supervised,
    )
