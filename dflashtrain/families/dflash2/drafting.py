"""DFlash2 drafting for inference (docs/dflash2.md, drafting; docs/decoding.md): one backbone pass, then the
selector walks one path from the anchor over each slot's top-K unary candidates.

    U_k = lm_head(h_k), C_k = TopK(U_k, K)                 slots k = 1 .. B−1 of the pass over [anchor, MASK, …]
    y_0 = anchor
    q_k = one-hot of argmax_c S_k(y_{k−1}, c)   (T = 0)    or  softmax_c(S_k(y_{k−1}, c) / T)  (T > 0), c ∈ C_k
    y_k ~ q_k                                               each choice is the next slot's predecessor

Not Viterbi and not a beam: each step sees only the token chosen before it. The verifier's rejection sampling
reads q_k scattered over the vocabulary (zero outside C_k), so speculative sampling stays lossless; only the
temperature shapes q (no top-p / top-k on the draft side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from dflashtrain.families.dflash2.selector import CandidateSelector, edge_scores
from dflashtrain.inference.decode import DFlashProposer, Proposal, Sampler
from dflashtrain.models.dflash import DFlashDrafter
from dflashtrain.models.target import FrozenTarget


@dataclass
class SelectorWalk:
    tokens: Tensor  # [L] long: y_1 .. y_L
    candidates: Tensor  # [L, K] long: C_k
    scores: Tensor  # [L, K] fp32: S_k(y_{k−1}, c) of the path walked
    choice_probs: Tensor  # [L, K] fp32: q_k over the candidates (one-hot when greedy)

    def probs(self, vocab_size: int) -> Tensor:
        """q_k scattered over the vocabulary: [L, V] fp32, zero outside C_k."""
        dense = self.choice_probs.new_zeros(self.choice_probs.shape[0], vocab_size)
        return dense.scatter(-1, self.candidates, self.choice_probs)


@torch.no_grad()
def walk_selector(selector: CandidateSelector, hidden: Tensor, unary: Tensor, anchor: int, temperature: float,
                  generator: Optional[torch.Generator] = None) -> SelectorWalk:
    """hidden [L, d], unary [L, V] of the drafted slots 1..L; anchor: the token before slot 1 -> the walk."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    candidates = unary.topk(selector.top_k, dim=-1).indices  # [L, K]
    prev = torch.tensor(anchor, device=hidden.device)
    tokens, scores, choice_probs = [], [], []
    for k in range(hidden.shape[0]):
        gate = selector.gate(hidden[k], prev)  # [r]
        score = edge_scores(unary[k], gate, selector.successor_codebook, candidates[k])  # [K]
        if temperature == 0:
            choice = score.argmax()
            q = torch.nn.functional.one_hot(choice, score.shape[0]).float()
        else:
            q = torch.softmax(score / temperature, dim=-1)
            choice = torch.multinomial(q, 1, generator=generator)[0]
        prev = candidates[k, choice]
        tokens.append(prev)
        scores.append(score)
        choice_probs.append(q)
    return SelectorWalk(torch.stack(tokens), candidates, torch.stack(scores), torch.stack(choice_probs))


class DFlash2Proposer:
    """Drafting mode for ``dflashtrain.inference.decode.generate``: DFlash's cached backbone pass (the DFlash2
    layers inside it), then the selector walk. B − 1 drafts per round, B tokens per verification."""

    needs_features = True

    def __init__(self, drafter: DFlashDrafter, target: FrozenTarget, selector: CandidateSelector):
        self.backbone = DFlashProposer(drafter, target)
        self.target = target
        self.selector = selector.to(target.lm_head.weight.device)
        self.block_size = drafter.geometry.block_size

    def begin(self, tapped: Tensor) -> None:
        self.backbone.begin(tapped)

    def extend(self, tapped: Tensor) -> None:
        self.backbone.extend(tapped)

    def propose(self, anchor: int, start: int, sampler: Sampler) -> Proposal:
        lm_head = self.target.lm_head
        anchor_ids = torch.tensor([anchor], device=lm_head.weight.device)
        hidden = self.backbone.draft_hidden(anchor_ids, start)[1:]  # [B − 1, d]: the drafted slots
        unary = lm_head(hidden.to(lm_head.weight.dtype)).float()
        walk = walk_selector(self.selector, hidden, unary, anchor, sampler.temperature, sampler.generator)
        return Proposal(tokens=walk.tokens, probs=None if sampler.greedy else walk.probs(unary.shape[-1]))
