"""Slow, naive references written from docs/conventions.md and docs/objectives.md in plain Python loops.

Nothing here imports the code under test: every expectation in the core tests comes either from a hand-computed
tensor or from one of these per-element loops.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

Nested = List


# --------------------------------------------------------------------------------------------- blocks (docs/conventions.md, labels)
def ref_blocks(
    input_ids: Sequence[Sequence[int]],
    loss_mask: Sequence[Sequence[int]],
    anchors: Sequence[Sequence[int]],
    keep: Sequence[Sequence[bool]],
    block_size: int,
    mask_id: int,
    label_offset: int,
) -> Dict[str, Nested]:
    """Per-element block fields. Returns nested lists [b][N][B] (block_keep/anchor_positions are [b][N])."""
    out = {name: [] for name in ("input_ids", "position_ids", "label_ids", "label_positions", "drafted", "slot_valid")}
    for row, (ids, lm, row_anchors, row_keep) in enumerate(zip(input_ids, loss_mask, anchors, keep)):
        seq_len = len(ids)
        per_row = {name: [] for name in out}
        for a, kept in zip(row_anchors, row_keep):
            block = {name: [] for name in out}
            for k in range(block_size):
                if kept and k == 0:
                    token = ids[a]
                else:
                    token = mask_id
                label_pos = a + k + label_offset
                in_range = label_pos < seq_len
                if label_offset == 0:
                    drafted = kept and k >= 1  # DFlash: slot 0 is the given anchor
                else:
                    drafted = bool(kept)  # next-token: every slot drafted
                supervised = in_range and lm[label_pos] == 1
                block["input_ids"].append(token)
                block["position_ids"].append(a + k)
                block["label_ids"].append(ids[label_pos] if in_range else 0)
                block["label_positions"].append(label_pos if in_range else seq_len - 1)
                block["drafted"].append(drafted)
                block["slot_valid"].append(drafted and supervised)
            for name in out:
                per_row[name].append(block[name])
        for name in out:
            out[name].append(per_row[name])
    return out


def ref_candidates(loss_mask_row: Sequence[int]) -> List[int]:
    """a in [0, S-2] with loss_mask[a] == loss_mask[a+1] == 1."""
    return [a for a in range(len(loss_mask_row) - 1) if loss_mask_row[a] == 1 and loss_mask_row[a + 1] == 1]


# ------------------------------------------------------------------------------------------- masks (docs/architecture.md, attention rule)
def ref_visible(anchors: Sequence[int], keep: Sequence[bool], seq_len: int, block_size: int, q: int, kv: int) -> bool:
    block = q // block_size
    if not keep[block]:
        return False  # a dummy block sees nothing
    if kv < seq_len:
        return kv < anchors[block]  # strictly before the anchor
    return (kv - seq_len) // block_size == block  # own block only, bidirectional


def ref_visibility(anchors, keep, seq_len: int, block_size: int) -> torch.Tensor:
    """[b, N·B, S + N·B] bool from the per-element rule."""
    batch, num_blocks = len(anchors), len(anchors[0])
    num_q = num_blocks * block_size
    out = torch.zeros(batch, num_q, seq_len + num_q, dtype=torch.bool)
    for b in range(batch):
        for q in range(num_q):
            for kv in range(seq_len + num_q):
                out[b, q, kv] = ref_visible(anchors[b], keep[b], seq_len, block_size, q, kv)
    return out


def ref_attention(query, key, value, anchors, keep, seq_len: int, block_size: int) -> torch.Tensor:
    """Explicit float64 softmax over the visible keys; zero output when nothing is visible. GQA by head groups."""
    query, key, value = query.double(), key.double(), value.double()
    batch, heads, num_q, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, num_q, head_dim, dtype=torch.float64)
    scale = 1.0 / math.sqrt(head_dim)
    for b in range(batch):
        for h in range(heads):
            hk = h // group
            for q in range(num_q):
                visible = [kv for kv in range(key.shape[2]) if ref_visible(anchors[b], keep[b], seq_len, block_size, q, kv)]
                if not visible:
                    continue
                scores = [float((query[b, h, q] * key[b, hk, kv]).sum()) * scale for kv in visible]
                top = max(scores)
                exps = [math.exp(s - top) for s in scores]
                total = sum(exps)
                for p, kv in zip(exps, visible):
                    out[b, h, q] += (p / total) * value[b, hk, kv]
    return out


# -------------------------------------------------------------------------------------------- objective (docs/objectives.md, decay)
def ref_log_softmax(row: Sequence[float]) -> List[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def ref_softmax(row: Sequence[float]) -> List[float]:
    return [math.exp(x) for x in ref_log_softmax(row)]


def ref_ce(row: Sequence[float], label: int) -> float:
    return -ref_log_softmax(row)[label]


def ref_soft_ce(row: Sequence[float], teacher_row: Sequence[float]) -> float:
    p = ref_softmax(teacher_row)
    logq = ref_log_softmax(row)
    return -sum(pi * li for pi, li in zip(p, logq))


def ref_decay_weight(slot: int, first_drafted: int, gamma: Optional[float]) -> float:
    """exp(-(k - first)/γ) for drafted slots; γ = 0/None -> 1."""
    if not gamma:
        return 1.0
    return math.exp(-(slot - first_drafted) / gamma)


def ref_supervision(valid: Sequence[bool], drafted: Sequence[bool], mode: str) -> List[bool]:
    """independent: m = valid. cumulative: m_k = valid_k and every earlier *drafted* slot is valid."""
    if mode == "independent":
        return [bool(v) for v in valid]
    out = []
    for k in range(len(valid)):
        ok = bool(valid[k])
        for j in range(k):
            if drafted[j] and not valid[j]:
                ok = False
        out.append(ok)
    return out


# ------------------------------------------------------------------------------------------------ metrics (§7)
def ref_tau_block(correct: Sequence[bool], valid: Sequence[bool], drafted: Sequence[bool]) -> int:
    """1 + leading drafted slots that are valid and correct; undrafted slots are skipped over."""
    accepted = 0
    for k in range(len(correct)):
        if not drafted[k]:
            continue
        if valid[k] and correct[k]:
            accepted += 1
        else:
            break
    return 1 + accepted
