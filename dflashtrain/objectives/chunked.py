"""LM head + objective over chunks of blocks, so the [b, N, B, V] logits never exist at once (docs/architecture.md).

Each chunk runs under activation checkpointing: its logits are recomputed in the backward pass instead of being
stored. Chunked and unchunked give the same loss, metrics and gradients (tests/test_chunked.py).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dflashtrain.data.blocks import DraftBlocks
from dflashtrain.models.target import head_logits
from dflashtrain.objectives.metrics import SlotCounts, count_slots
from dflashtrain.objectives.protocol import ChunkLoss, Objective, SlotChunk

# (hidden chunk [b, c, B, d], blocks chunk) -> (logits [b, c, B, V], extras)
LogitsFn = Callable[[Tensor, DraftBlocks], Tuple[Tensor, Dict[str, Tensor]]]


def teacher_logits(final_hidden: Tensor, label_positions: Tensor, lm_head: torch.nn.Module) -> Tensor:
    """The target's logits *for* each label: its head at position label_pos − 1 (docs/conventions.md). fp32, no grad.

    final_hidden [b, S, d], label_positions [b, c, B] -> [b, c, B, V].
    """
    with torch.no_grad():
        batch, d = final_hidden.shape[0], final_hidden.shape[-1]
        source = (label_positions - 1).clamp(min=0).view(batch, -1, 1).expand(-1, -1, d)
        gathered = final_hidden.gather(1, source).view(*label_positions.shape, d)
        return head_logits(gathered, lm_head).float()


def chunked_objective(
    hidden: Tensor,
    blocks: DraftBlocks,
    objective: Objective,
    logits_fn: LogitsFn,
    chunk_blocks: int,
    teacher: Optional[Callable[[Tensor], Tensor]] = None,
    use_checkpoint: bool = True,
) -> Tuple[ChunkLoss, SlotCounts]:
    """hidden [b, N, B, d] -> summed ChunkLoss and slot counts over all N blocks.

    ``teacher`` maps label positions [b, c, B] to teacher logits (given only when the objective needs them).
    """

    def one_chunk(h: Tensor, sub: DraftBlocks) -> Tuple[ChunkLoss, Tensor]:
        logits, extras = logits_fn(h, sub)
        chunk = SlotChunk(
            logits=logits.float(),
            labels=sub.label_ids,
            valid=sub.slot_valid,
            drafted=sub.drafted,
            teacher_logits=teacher(sub.label_positions) if teacher is not None else None,
            extras=extras,
        )
        correct = logits.detach().argmax(dim=-1) == sub.label_ids
        return objective(chunk), correct

    total: Optional[ChunkLoss] = None
    counts: Optional[SlotCounts] = None
    num_blocks = hidden.shape[1]
    for start in range(0, num_blocks, chunk_blocks):
        stop = min(start + chunk_blocks, num_blocks)
        sub = blocks.chunk(start, stop)
        h = hidden[:, start:stop]
        if use_checkpoint and h.requires_grad:
            loss, correct = checkpoint(one_chunk, h, sub, use_reentrant=False)
        else:
            loss, correct = one_chunk(h, sub)
        chunk_counts = count_slots(correct, sub.slot_valid, sub.drafted, sub.block_keep)
        total = loss if total is None else total + loss
        counts = chunk_counts if counts is None else counts + chunk_counts
    return total, counts
