"""DFlash2's candidate selector (docs/dflash2.md, selector): a rank-r bilinear score over the top-K unary candidates.

For slot k with final draft hidden h_k and unary logits U_k = lm_head(h_k) (the target's frozen head):

    C_k        = TopK(U_k, K)                                       the candidates, by descending unary logit
    S_k(q, c)  = U_k[c] + Σ_j A[q, j] · (P h_k)[j] · Bs[c, j]        q: the token before slot k, c ∈ C_k

A = predecessor_codebook [V, r] (N(0, 0.02)), Bs = successor_codebook [V, r] (zero, so a fresh selector scores
exactly the unary logits), P = hidden_projection [r, d] (no bias). Training teacher-forces q = x_{a+k−1}
(:meth:`CandidateSelector.teacher_forced`); drafting walks one path from the anchor
(:mod:`dflashtrain.families.dflash2.drafting`), both through :func:`edge_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def edge_scores(unary: Tensor, gate: Tensor, successor_codebook: Tensor, candidates: Tensor) -> Tensor:
    """S(q, c) = U[c] + <gate, Bs[c]> with gate = A[q] ⊙ P h.

    unary [..., V], gate [..., r], successor_codebook [V, r], candidates [..., n] long -> [..., n] fp32.
    """
    successors = successor_codebook[candidates].float()  # [..., n, r]
    pair = (successors * gate.float().unsqueeze(-2)).sum(dim=-1)  # [..., n] (no batched matmul of tiny matrices)
    return unary.float().gather(-1, candidates) + pair


@dataclass
class SelectorScores:
    candidates: Tensor  # [..., K] long: the unary top-K, by descending unary logit
    scores: Tensor  # [..., K] fp32: S(q, c) for every candidate, q the teacher-forced predecessor
    gold_score: Tensor  # [...] fp32: S(q, label), whether or not the label is a candidate


class CandidateSelector(nn.Module):
    """The selector's parameters (exported as ``candidate_selector.*``) and its teacher-forced scores."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, top_k: int, stop_gradient: bool):
        super().__init__()
        self.top_k = top_k
        self.stop_gradient = stop_gradient  # training only: the selector term does not move U or h
        self.predecessor_codebook = nn.Parameter(torch.randn(vocab_size, rank) * 0.02)  # A
        self.successor_codebook = nn.Parameter(torch.zeros(vocab_size, rank))  # Bs
        self.hidden_projection = nn.Linear(hidden_size, rank, bias=False)  # P

    @property
    def rank(self) -> int:
        return self.predecessor_codebook.shape[1]

    def gate(self, hidden: Tensor, prev: Tensor) -> Tensor:
        """A[q] ⊙ P h. hidden [..., d], prev [...] long -> [..., r] fp32."""
        projected = self.hidden_projection(hidden.to(self.hidden_projection.weight.dtype)).float()
        return self.predecessor_codebook[prev].float() * projected

    def teacher_forced(self, hidden: Tensor, unary: Tensor, prev: Tensor, labels: Tensor) -> SelectorScores:
        """hidden [..., d], unary [..., V], prev / labels [...] long -> the scores the selector loss reads."""
        candidates = unary.detach().topk(self.top_k, dim=-1).indices  # [..., K]
        if self.stop_gradient:
            hidden, unary = hidden.detach(), unary.detach()
        gate = self.gate(hidden, prev)
        return SelectorScores(
            candidates=candidates,
            scores=edge_scores(unary, gate, self.successor_codebook, candidates),
            gold_score=edge_scores(unary, gate, self.successor_codebook, labels.unsqueeze(-1)).squeeze(-1),
        )
