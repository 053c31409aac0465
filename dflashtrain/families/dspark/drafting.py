"""DSpark sequential drafting for inference (docs/objectives.md, dspark; docs/decoding.md): one backbone pass, then a left-to-right Markov loop.

The drafter's backbone drafts a block in one non-causal pass (hidden h_0..h_{B−1}); only the cheap Markov bias
is sequential. In the next-token convention slot k proposes the token after position a + k, so:

    prev_0 = anchor token (the last committed token, at the block's first position)
    z_k    = lm_head(h_k) + W2·W1[prev_k]           the same logits as training (heads.slot_logits)
    q_k    = softmax(z_k / T)  (one-hot of argmax z_k when T = 0)
    t_k    ~ q_k,  prev_{k+1} = t_k                 each drafted token is fed back as the next slot's prev
    c_k    = σ(u_k),  u_k = confidence([h_k ; W1[prev_k]])   (confidence of slot k given the drafted prefix)

With teacher forcing (prev = the data tokens) this is exactly the training logits hook; the tests check that the
loop reproduces those logits when it is fed the same tokens.

:class:`DSparkProposer` plugs this into the speculative decoding loop (``dflashtrain.inference.decode``): the backbone pass
and the context cache are DFlash's (composed, not inherited); a round verifies ``[anchor, t_0, …, t_{B−1}]``,
i.e. B + 1 tokens per target forward for B drafts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dflashtrain.families.dspark.heads import DSparkHeads, slot_logits
from dflashtrain.inference.decode import DFlashProposer, Proposal, Sampler
from dflashtrain.models.dflash import DFlashDrafter
from dflashtrain.models.target import FrozenTarget


@dataclass
class SequentialDraft:
    tokens: Tensor  # [..., B] long: drafted tokens t_0..t_{B−1}
    probs: Tensor  # [..., B, V] fp32: q_k, the distribution t_k was drawn from (one-hot when greedy)
    token_probs: Tensor  # [..., B] fp32: q_k(t_k) (1 when greedy)
    logits: Tensor  # [..., B, V] fp32: z_k at T = 1 (Markov bias included)
    confidences: Optional[Tensor]  # [..., B] fp32 σ(u_k), or None without a confidence head


@torch.no_grad()
def draft_sequential(
    hidden: Tensor,
    anchor_token: Union[int, Tensor],
    lm_head: nn.Module,
    heads: Optional[DSparkHeads],
    temperature: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> SequentialDraft:
    """Draft one block (or a batch of blocks) left to right through the Markov head.

    hidden [..., B, d]: the drafter's final hidden states for the block ``[anchor, MASK, …]`` (one backbone pass);
    anchor_token: int or [...] long, the token at the block's first position; lm_head: the target's frozen head;
    heads: the DSpark heads (None: no Markov bias, the loop then equals parallel argmax/sampling);
    temperature: 0 = greedy argmax, > 0 = sample from softmax(z / T) with ``generator``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    block_size = hidden.shape[-2]
    prev = torch.as_tensor(anchor_token, dtype=torch.long, device=hidden.device).expand(hidden.shape[:-2])  # [...]
    tokens, probs, logits_out, confidences = [], [], [], []
    for k in range(block_size):
        logits, confidence = slot_logits(hidden[..., k, :], prev, lm_head, heads)  # [..., V], [...]
        logits = logits.float()
        if temperature == 0:
            token = logits.argmax(dim=-1)  # [...]
            q = F.one_hot(token, logits.shape[-1]).float()
        else:
            q = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(q.reshape(-1, q.shape[-1]), 1, generator=generator).view(q.shape[:-1])
        tokens.append(token)
        probs.append(q)
        logits_out.append(logits)
        if confidence is not None:
            confidences.append(torch.sigmoid(confidence.float()))
        prev = token
    probs_t = torch.stack(probs, dim=-2)  # [..., B, V]
    tokens_t = torch.stack(tokens, dim=-1)  # [..., B]
    return SequentialDraft(
        tokens=tokens_t,
        probs=probs_t,
        token_probs=probs_t.gather(-1, tokens_t.unsqueeze(-1)).squeeze(-1),
        logits=torch.stack(logits_out, dim=-2),
        confidences=torch.stack(confidences, dim=-1) if confidences else None,
    )


class DSparkProposer:
    """Drafting mode for ``dflashtrain.decode.generate``: DFlash's cached backbone pass, then the Markov loop.

    The block ``[anchor, MASK, …]`` sits at positions start .. start+B−1 exactly as in training; slot k drafts the
    token at position start + k + 1, so all B slots are drafts and a round verifies B + 1 tokens.
    """

    needs_features = True

    def __init__(self, drafter: DFlashDrafter, target: FrozenTarget, heads: Optional[DSparkHeads]):
        self.backbone = DFlashProposer(drafter, target)
        self.target = target
        self.heads = heads.to(target.lm_head.weight.device) if heads is not None else None  # fp32 is fine
        self.block_size = drafter.geometry.block_size + 1  # tokens per verification: the anchor and B drafts

    def begin(self, tapped: Tensor) -> None:
        self.backbone.begin(tapped)

    def extend(self, tapped: Tensor) -> None:
        self.backbone.extend(tapped)

    def propose(self, anchor: int, start: int, sampler: Sampler) -> Proposal:
        lm_head = self.target.lm_head
        anchor_ids = torch.tensor([anchor], device=lm_head.weight.device)
        hidden = self.backbone.draft_hidden(anchor_ids, start).to(lm_head.weight.dtype)  # [B, d]
        draft = draft_sequential(hidden, anchor, lm_head, self.heads, sampler.temperature, sampler.generator)
        return Proposal(tokens=draft.tokens, probs=None if sampler.greedy else draft.probs)
