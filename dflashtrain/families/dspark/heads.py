"""DSpark's two small heads (docs/objectives.md, dspark), composed beside the DFlash drafter (not a subclass of it).

    Markov head (low-rank bigram):  e_k = W1[prev_k]                    W1 = Embedding(V, r)
                                    z_k = lm_head(h_k) + W2·e_k          W2 = Linear(r, V, no bias)
    Confidence head:                u_k = w_c·[h_k ; e_k] + b_c          Linear(d + r, 1), with bias

``prev_k`` is the token *before* slot k's label: in the next-token convention slot k predicts ``x[a+k+1]``, so
``prev_k = x[a+k]`` — the token at the slot's own position. Training teacher-forces it
(:func:`teacher_forced_prev`); inference feeds back each drafted token (:mod:`dflashtrain.families.dspark.drafting`).
The confidence head shares W1 and reads h undetached, so its loss also trains the backbone and W1.

Parameter names: a training checkpoint holds them under ``heads.`` (``heads.markov.embed.weight`` [V, r],
``heads.markov.proj.weight`` [V, r], ``heads.confidence.weight`` [1, d + r], ``heads.confidence.bias`` [1]);
an export renames them (:mod:`dflashtrain.families.dspark.export`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from dflashtrain.data.blocks import DraftBlocks
from dflashtrain.models.target import head_logits


class MarkovHead(nn.Module):
    """Low-rank bigram bias W2·W1[prev].

    W1 starts as a standard embedding (N(0, 1), the scale of the post-norm h it is concatenated with in the
    confidence head); W2 starts at zero, so a fresh head leaves the logits unchanged and learns at a useful rate.
    """

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, rank)  # W1
        self.proj = nn.Linear(rank, vocab_size, bias=False)  # W2
        nn.init.normal_(self.embed.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.proj.weight)

    def forward(self, prev: Tensor) -> Tuple[Tensor, Tensor]:
        """prev [...] long -> (bias [..., V], e = W1[prev] [..., r])."""
        e = self.embed(prev)
        return self.proj(e), e


class DSparkHeads(nn.Module):
    """The Markov head and (optionally) the confidence head, applied to drafter hidden states."""

    def __init__(self, vocab_size: int, hidden_size: int, markov_rank: int, confidence: bool):
        super().__init__()
        if markov_rank <= 0:
            raise ValueError(f"DSpark heads need markov_rank > 0 (the confidence head reads W1), got {markov_rank}")
        self.markov = MarkovHead(vocab_size, markov_rank)
        self.confidence: Optional[nn.Linear] = nn.Linear(hidden_size + markov_rank, 1) if confidence else None
        if self.confidence is not None:
            nn.init.normal_(self.confidence.weight, mean=0.0, std=0.02)
            nn.init.zeros_(self.confidence.bias)

    @property
    def markov_rank(self) -> int:
        return self.markov.embed.embedding_dim

    def forward(self, hidden: Tensor, prev: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """hidden [..., d], prev [...] long -> (Markov bias [..., V], confidence logits u [...] or None)."""
        bias, e = self.markov(prev)
        if self.confidence is None:
            return bias, None
        features = torch.cat([hidden, e.to(hidden.dtype)], dim=-1)  # [..., d + r]
        return bias, self.confidence(features.to(self.confidence.weight.dtype)).squeeze(-1)


def slot_logits(hidden: Tensor, prev: Tensor, lm_head: nn.Module, heads: Optional[DSparkHeads]
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """z = lm_head(h) + W2·W1[prev] and u (the one definition training and drafting share).

    hidden [..., d], prev [...] -> (logits [..., V], confidence logits [...] or None).
    """
    if heads is None:
        return head_logits(hidden, lm_head), None
    bias, confidence = heads(hidden, prev)
    return biased_head_logits(hidden, lm_head, bias), confidence


def biased_head_logits(hidden: Tensor, lm_head: nn.Linear, bias: Tensor) -> Tensor:
    """lm_head(h) + bias as one GEMM that accumulates into the bias (addmm), on the flattened rows: no V-wide add.

    hidden [..., d], bias [..., V] -> [..., V].
    """
    if lm_head.bias is not None:
        bias = bias + lm_head.bias
    weight = lm_head.weight
    rows = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    flat_bias = bias.reshape(rows.shape[0], -1).to(weight.dtype)
    return torch.addmm(flat_bias, rows, weight.t()).view(*hidden.shape[:-1], -1)


def teacher_forced_prev(blocks: DraftBlocks) -> Tensor:
    """prev = [x_a, x_{a+1}, …, x_{a+B−1}]: the data token at each slot's position id. [b, c, B] long.

    Needs the next-token convention (label_pos = a + k + 1), where the label of slot k − 1 is x[a + k]; slot 0
    reads the anchor token from the block input. Out-of-range positions hold label id 0: those slots are
    invalid (their own label is out of range too), so any id is fine there.
    """
    anchor = blocks.input_ids[..., :1]  # [b, c, 1]: x_a (MASK in a dummy block, which is never supervised)
    return torch.cat([anchor, blocks.label_ids[..., :-1]], dim=-1)
