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
SDPA, since flex attention has no CPU backward. Both give the same output. The BlockMask is built directly from the
anchors (:func:`anchor_block_mask`): which 128 × 128 tiles are empty, partly or fully visible follows from each
query tile's smallest and largest anchor, so nothing of size Q × (S + Q) is ever evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

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


TILE = 128  # flex attention's default sparse block size (queries × keys)


def anchor_block_mask(anchor_positions: Tensor, block_keep: Tensor, seq_len: int, block_size: int):
    """The rule as a flex-attention ``BlockMask``, from the anchors alone. anchor_positions, block_keep: [b, N].

    With Q = N·B queries in T = ⌈Q/128⌉ tiles and S + Q keys in K = ⌈(S + Q)/128⌉ tiles, for query tile t let
    hi_t = max and lo_t = min over its queries of the visible context length (a_n for a kept block, 0 for a dummy
    or past Q). Key tile j is
      * full     iff its keys are all context and 128·(j + 1) ≤ lo_t (every query sees every key of it);
      * visible  iff 128·j < hi_t (some context key), or it holds an own-block key [S + n·B, S + (n + 1)·B) of a
                 kept block of the tile;
    and partial when visible but not full (the mask_mod decides each entry there). O(b · (N·B + T·K)) work.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, num_blocks = anchor_positions.shape
    device = anchor_positions.device
    num_q = num_blocks * block_size
    q_tiles, kv_tiles = -(-num_q // TILE), -(-(seq_len + num_q) // TILE)
    pad = q_tiles * TILE - num_q
    keep_q = F.pad(block_keep.repeat_interleave(block_size, dim=1), (0, pad))  # [b, T·128], padding not kept
    context_q = F.pad(anchor_positions.repeat_interleave(block_size, dim=1), (0, pad)) * keep_q
    hi = context_q.view(batch, q_tiles, TILE).amax(-1)  # [b, T]
    lo = context_q.view(batch, q_tiles, TILE).amin(-1)
    own_q = seq_len + torch.arange(q_tiles * TILE, device=device) // block_size * block_size  # first own key
    first_own = torch.where(keep_q.bool(), own_q, seq_len + num_q).view(batch, q_tiles, TILE).amin(-1)
    last_own = torch.where(keep_q.bool(), own_q + block_size - 1, -1).view(batch, q_tiles, TILE).amax(-1)

    start = torch.arange(kv_tiles, device=device) * TILE  # first key of each key tile [K]
    stop = start + TILE - 1
    sees_context = start < hi.unsqueeze(-1)  # [b, T, K]
    sees_own = (start <= last_own.unsqueeze(-1)) & (stop >= first_own.unsqueeze(-1))
    full = (stop < seq_len) & (stop < lo.unsqueeze(-1))
    partial = (sees_context | sees_own) & ~full

    def blocks(selected: Tensor) -> tuple:
        counts = selected.sum(-1, dtype=torch.int32).unsqueeze(1)  # [b, 1, T]
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32).unsqueeze(1)
        return counts, order  # tile indices, selected ones first in increasing order

    kv_num, kv_index = blocks(partial)
    full_num, full_index = blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_index, full_num, full_index, BLOCK_SIZE=TILE,
                                    mask_mod=anchor_mask_mod(anchor_positions, block_keep, seq_len, block_size),
                                    seq_lengths=(num_q, seq_len + num_q))


GROUP_QUERIES = 128  # CPU key groups: about this many queries (whole blocks) each


@dataclass(frozen=True)
class KeyGroup:
    """Consecutive query rows (whole blocks) and the only keys any of them can see: context 0..context−1 and their
    own blocks' slots. ``mask`` is the dense rule restricted to those rows and keys."""

    queries: slice
    context: int
    own: slice  # on the key axis: S + first query .. S + last query + 1
    mask: Tensor  # [b, 1, rows, context + rows] bool


def key_groups(dense: Tensor, anchor_positions: Tensor, block_keep: Tensor, seq_len: int, block_size: int
               ) -> List[KeyGroup]:
    """Split the queries into groups of whole blocks; each attends to a context prefix as long as its largest
    anchor (keys beyond it are masked for all its rows) and to its own blocks. Same softmax rows, so the same
    attention, for about Q·(S/2 + 128) scores instead of Q·(S + Q) (anchors spread over the sequence).

    dense [b, 1, Q, S + Q]; reads the anchors on the host, so it is meant for CPU (GPUs use the BlockMask).
    """
    num_blocks = anchor_positions.shape[1]
    per_group = max(1, GROUP_QUERIES // block_size)
    visible = (anchor_positions * block_keep).amax(dim=0)  # [N] context length each block needs, over rows
    groups = []
    for first in range(0, num_blocks, per_group):
        last = min(first + per_group, num_blocks)
        rows = slice(first * block_size, last * block_size)
        context = int(visible[first:last].max())
        own = slice(seq_len + rows.start, seq_len + rows.stop)
        mask = torch.cat([dense[:, :, rows, :context], dense[:, :, rows, own]], dim=-1)
        groups.append(KeyGroup(queries=rows, context=context, own=own, mask=mask))
    return groups


@dataclass
class AnchorAttentionMask:
    """Everything a drafter layer needs to attend under the rule; built once per forward."""

    query_keep: Tensor  # [b, 1, N·B, 1] float: zeroes the output of dummy blocks
    dense: Optional[Tensor] = None  # [b, 1, N·B, S + N·B] bool, SDPA path
    block_mask: Optional[object] = None  # flex-attention BlockMask, flex path
    groups: Optional[List[KeyGroup]] = None  # SDPA path on CPU: the dense rule by key groups (key_groups)

    @classmethod
    def build(
        cls, anchor_positions: Tensor, block_keep: Tensor, seq_len: int, block_size: int, use_flex: bool,
        sliding_window: Optional[int] = None,
    ) -> "AnchorAttentionMask":
        batch, num_blocks = anchor_positions.shape
        num_queries = num_blocks * block_size
        query_keep = block_keep.repeat_interleave(block_size, dim=1).view(batch, 1, num_queries, 1)
        if use_flex:
            if sliding_window is None:  # the BlockMask straight from the anchors (anchor_block_mask)
                block_mask = anchor_block_mask(anchor_positions, block_keep, seq_len, block_size)
            else:
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
        dense = torch.where(query_keep.view(batch, num_queries, 1), rule, own_block_only).unsqueeze(1)
        groups = None
        if anchor_positions.device.type == "cpu":  # reading the anchors costs nothing there
            groups = key_groups(dense, anchor_positions, block_keep, seq_len, block_size)
        return cls(query_keep=query_keep.float(), dense=dense, groups=groups)


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
    elif mask.groups is not None:
        out = torch.cat([F.scaled_dot_product_attention(
            query[:, :, g.queries], torch.cat([key[:, :, :g.context], key[:, :, g.own]], dim=2),
            torch.cat([value[:, :, :g.context], value[:, :, g.own]], dim=2), attn_mask=g.mask, enable_gqa=gqa)
            for g in mask.groups], dim=2)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.dense, enable_gqa=gqa)
    return out * mask.query_keep.to(out.dtype)
