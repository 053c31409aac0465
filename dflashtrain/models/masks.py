"""The anchor-block attention rule (docs/architecture.md, attention rule) and the two attention paths that implement it.

Keys are laid out as ``[context 0..S-1 ; block 0 slots ; block 1 slots ; ...]`` and queries as the N·B block slots.
A query in block ``b`` (anchor ``a_b``) sees

* context key ``t`` iff ``t < a_b`` — strictly: at inference the anchor's own target state does not exist yet;
* every slot of its own block (bidirectional);
* nothing else; a dummy block (``block_keep = False``) sees nothing and its attention output is zero.

With a sliding window W (``model.drafter.sliding_window``, docs/architecture.md, sliding window) a query at
absolute position ``a_b + k`` also needs ``(a_b + k) − t < W`` for context key ``t`` (the window counts the query
itself, as in HF); its own block stays wholly visible, since W ≥ B.

On CUDA the rule is a flex-attention ``BlockMask`` (memory O(S + N·B)); elsewhere it is a dense boolean mask for
SDPA, since flex attention has no CPU backward. Both give the same output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def anchor_mask_mod(anchor_positions: Tensor, block_keep: Tensor, seq_len: int, block_size: int,
                    sliding_window: Optional[int] = None) -> Callable:
    """The rule as a flex-attention ``mask_mod(batch, head, q_idx, kv_idx) -> bool``.

    anchor_positions, block_keep: [b, N]; sliding_window: W or None (no window).
    """

    def mask_mod(batch, head, q_idx, kv_idx):
        block = q_idx // block_size
        keep = block_keep[batch, block]
        anchor = anchor_positions[batch, block]
        sees_context = (kv_idx < seq_len) & (kv_idx < anchor)
        if sliding_window is not None:
            sees_context = sees_context & (anchor + q_idx % block_size - kv_idx < sliding_window)
        sees_own_block = (kv_idx >= seq_len) & ((kv_idx - seq_len) // block_size == block)
        return keep & (sees_context | sees_own_block)

    return mask_mod


def window_visibility(anchor_positions: Tensor, seq_len: int, block_size: int, sliding_window: int) -> Tensor:
    """Context keys inside each query's window: [b, N·B, S] bool, True iff (a + k) − t < W."""
    slots = torch.arange(block_size, device=anchor_positions.device)
    query_positions = (anchor_positions.unsqueeze(-1) + slots).flatten(1)  # [b, N·B]
    context = torch.arange(seq_len, device=anchor_positions.device)
    return query_positions.unsqueeze(-1) - context < sliding_window


def dense_visibility(anchor_positions: Tensor, block_keep: Tensor, seq_len: int, block_size: int,
                     sliding_window: Optional[int] = None) -> Tensor:
    """The rule as a dense bool tensor [b, N·B, S + N·B] (True = visible). For SDPA and tests."""
    batch, num_blocks = anchor_positions.shape
    device = anchor_positions.device
    context = torch.arange(seq_len, device=device)
    sees_context = context.view(1, 1, seq_len) < anchor_positions.unsqueeze(-1)  # [b, N, S]
    own = torch.eye(num_blocks, dtype=torch.bool, device=device)  # [N, N]
    sees_blocks = own.repeat_interleave(block_size, dim=1).unsqueeze(0).expand(batch, -1, -1)  # [b, N, N·B]
    visible = torch.cat([sees_context, sees_blocks], dim=-1) & block_keep.unsqueeze(-1)  # [b, N, S + N·B]
    visible = visible.repeat_interleave(block_size, dim=1)  # [b, N·B, S + N·B]
    if sliding_window is not None:
        visible[..., :seq_len] &= window_visibility(anchor_positions, seq_len, block_size, sliding_window)
    return visible


@dataclass
class AnchorAttentionMask:
    """Everything a drafter layer needs to attend under the rule; built once per forward."""

    query_keep: Tensor  # [b, 1, N·B, 1] float: zeroes the output of dummy blocks
    dense: Optional[Tensor] = None  # [b, 1, N·B, S + N·B] bool, SDPA path
    block_mask: Optional[object] = None  # flex-attention BlockMask, flex path

    @classmethod
    def build(
        cls, anchor_positions: Tensor, block_keep: Tensor, seq_len: int, block_size: int, use_flex: bool,
        sliding_window: Optional[int] = None,
    ) -> "AnchorAttentionMask":
        batch, num_blocks = anchor_positions.shape
        num_queries = num_blocks * block_size
        query_keep = block_keep.repeat_interleave(block_size, dim=1).view(batch, 1, num_queries, 1)
        if use_flex:
            from torch.nn.attention.flex_attention import create_block_mask

            mask_mod = anchor_mask_mod(anchor_positions, block_keep, seq_len, block_size, sliding_window)
            # _compile builds the block mask tile by tile; uncompiled it would first materialize the dense mask.
            block_mask = create_block_mask(
                mask_mod, batch, None, num_queries, seq_len + num_queries, device=anchor_positions.device,
                _compile=anchor_positions.is_cuda,
            )
            return cls(query_keep=query_keep.float(), block_mask=block_mask)
        # A dummy block's query row would be all False, and SDPA turns an empty row into NaN (also in the
        # backward pass). Let such rows see their own block instead and zero their output afterwards.
        rule = dense_visibility(anchor_positions, block_keep, seq_len, block_size, sliding_window)
        everything_own = dense_visibility(anchor_positions, torch.ones_like(block_keep), seq_len, block_size)
        own_block_only = everything_own.clone()
        own_block_only[..., :seq_len] = False
        dense = torch.where(query_keep.view(batch, num_queries, 1), rule, own_block_only)
        return cls(query_keep=query_keep.float(), dense=dense.unsqueeze(1))


_compiled_flex: Optional[Callable] = None


def _flex() -> Callable:
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Compiled flex attention is the fast path on CUDA; eager is a slow reference (forward only on CPU).
        # Sequence lengths vary by batch (padded to a multiple of data.pad_to_multiple_of), so let the compiler
        # mark shapes dynamic after the first change instead of recompiling per length.
        _compiled_flex = torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention
    return _compiled_flex


def attend(query: Tensor, key: Tensor, value: Tensor, mask: AnchorAttentionMask) -> Tensor:
    """query [b, H, Q, hd], key/value [b, Hkv, K, hd] -> [b, H, Q, hd], grouped-query aware."""
    gqa = query.shape[1] != key.shape[1]
    if mask.block_mask is not None:
        out = _flex()(query, key, value, block_mask=mask.block_mask, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.dense, enable_gqa=gqa)
    return out * mask.query_keep.to(out.dtype)
