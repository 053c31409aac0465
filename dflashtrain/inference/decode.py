"""Speculative decoding with a DFlash-family drafter (docs/decoding.md): the loop users judge a drafter by.

One sequence at a time (batch 1), KV caches on both sides:

    prefill   target(prompt) -> first token x_P, tapped features of positions 0..P-1 -> drafter context cache
    round     block  = [last committed token, MASK, ..., MASK] at positions start .. start+B-1
              drafts = slots 1..B-1 of one drafter pass (argmax, or samples from q = softmax(z/T))
              target(block) with its cache -> logits of all B slots in one forward
              accept the longest prefix with draft[1:] == target_argmax[:-1]     (greedy)
                     or speculative sampling: keep draft k w.p. min(1, p/q), else resample from
                     norm(max(0, p - q)) and stop; all kept -> a bonus token from p        (T > 0, lossless)
              commit accepted drafts + one target token; crop the target cache to the committed length;
              append the verified tokens' features (block slots 0..accepted) to the drafter's context cache
    τ         mean over rounds of (accepted + 1): tokens committed per target forward, bonus included

The drafting of a block is a *proposer* object, so drafting modes plug in without touching the loop:
:class:`DFlashProposer` (one non-causal pass; :meth:`DFlashProposer.draft_hidden` takes a visible prefix of any
length p: VP re-drafting), :class:`D2SDProposer` (the DFlash block plus rows re-drafted by a variable-prefix
drafter, verified together), :class:`PlainDecoding` (block size 1: the baseline). A drafting family brings its own
(``DraftingFamily.proposer``; DSpark: sequential Markov-head drafting after one backbone pass).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor

from dflashtrain.models.dflash import ContextCache, DFlashDrafter
from dflashtrain.models.target import FrozenTarget


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Sampler:
    """Greedy at temperature 0, else samples from softmax(logits / T) (fp32) with a seeded generator."""

    temperature: float = 0.0
    generator: Optional[torch.Generator] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        """logits [n, V] -> p [n, V] fp32."""
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def draw(self, probs: Tensor) -> Tensor:
        """probs [n, V] -> tokens [n]."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def pick(self, logits: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """logits [n, V] -> (tokens [n], the distributions they were drawn from [n, V], or None when greedy)."""
        if self.greedy:
            return logits.argmax(dim=-1), None
        probs = self.probs(logits)
        return self.draw(probs), probs

    def uniform(self, device: torch.device) -> float:
        return float(torch.rand((), generator=self.generator, device=device))


# ---------------------------------------------------------------------------------------------- target side
class TargetSession:
    """The frozen target on one sequence, with its HF KV cache (created by the prefill, cropped after each round).

    A round may verify several candidate rows at once (D²SD): the cache is repeated to R rows for that forward and
    reduced to the winning row afterwards (:meth:`keep`).
    """

    def __init__(self, target: FrozenTarget, with_features: bool):
        self.target = target
        self.with_features = with_features
        self.cache = None
        self.rows = 1  # rows held by the cache

    @torch.no_grad()
    def forward(self, rows: Tensor, start: int, last_only: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """rows [R, n] at positions start .. start+n-1 -> (logits [R, n or 1, V], tapped [R, n, n_taps·d])."""
        num_rows, length = rows.shape
        if num_rows > 1:
            self.cache.batch_repeat_interleave(num_rows)
            self.rows = num_rows
        positions = torch.arange(start, start + length, device=rows.device).expand(num_rows, length)
        out = self.target.model(
            input_ids=rows,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            output_hidden_states=self.with_features,
            logits_to_keep=1 if last_only else 0,
        )
        self.cache = out.cache
        tapped = None
        if self.with_features:  # hidden_states[i + 1] is the output of layer i (docs/architecture.md)
            tapped = torch.cat([out.hidden_states[i + 1] for i in self.target.layer_ids], dim=-1)
        return out.logits, tapped

    def keep(self, row: int, length: int) -> None:
        """Keep one row (after a multi-row forward) and its first ``length`` positions."""
        if self.rows > 1:
            self.cache.batch_select_indices(torch.tensor([row], device=self.target.lm_head.weight.device))
            self.rows = 1
        excess = self.cache.get_seq_length() - length
        if excess > 0:
            self.cache.crop(-excess)  # a negative crop removes that many positions


# ---------------------------------------------------------------------------------------------- drafting modes
@dataclass
class Proposal:
    tokens: Tensor  # [L] drafted tokens after the anchor (L = B - 1 for DFlash, 0 plain), or [R, L] candidate rows
    probs: Optional[Tensor] = None  # [L, V] the distributions they were drawn from; None = deterministic drafts

    def rows(self) -> Tensor:
        return self.tokens if self.tokens.dim() == 2 else self.tokens.unsqueeze(0)  # [R, L]


class Proposer(Protocol):
    """A drafting mode. The loop calls begin(prompt features), then per round propose() and extend()."""

    block_size: int  # tokens per target verification (anchor included)
    needs_features: bool  # whether the target must return tapped features

    def begin(self, tapped: Tensor) -> None: ...

    def propose(self, anchor: int, start: int, sampler: Sampler) -> Proposal: ...

    def extend(self, tapped: Tensor) -> None: ...


class PlainDecoding:
    """Block size 1: the target alone, through the same loop and caches (the speedup baseline)."""

    block_size = 1
    needs_features = False

    def begin(self, tapped: Optional[Tensor]) -> None:
        pass

    def propose(self, anchor: int, start: int, sampler: Sampler) -> Proposal:
        return Proposal(tokens=torch.empty(0, dtype=torch.long))

    def extend(self, tapped: Optional[Tensor]) -> None:
        pass


class DFlashProposer:
    """DFlash drafting: one non-causal drafter pass over [visible prefix, MASK, ...] with cached context.

    The drafter's context cache holds the committed positions strictly before the anchor; the block sits at
    positions start .. start+B-1 with start = anchor position = cache length.
    """

    needs_features = True

    def __init__(self, drafter: DFlashDrafter, target: FrozenTarget):
        self.drafter, self.target = drafter, target
        self.block_size = drafter.geometry.block_size
        self.mask_token_id = drafter.geometry.mask_token_id
        self.cache = ContextCache(len(drafter.layers))

    def begin(self, tapped: Tensor) -> None:
        self.cache = ContextCache(len(self.drafter.layers))
        self.extend(tapped)

    def extend(self, tapped: Tensor) -> None:
        """tapped [T_new, n·d]: features of the newly committed (verified) positions."""
        self.drafter.extend_context(self.cache, tapped.unsqueeze(0))

    @torch.no_grad()
    def draft_hidden(self, visible: Tensor, start: int) -> Tensor:
        """visible [p] real tokens (anchor first) in slots 0..p-1, MASK after -> drafter hidden [B, d].

        p = 1 is DFlash drafting; p > 1 is VP re-drafting (context still strictly before the anchor).
        """
        block = torch.full((self.block_size,), self.mask_token_id, dtype=torch.long, device=visible.device)
        block[: visible.shape[0]] = visible
        embeds = self.target.embed_tokens(block.unsqueeze(0))  # [1, B, d]
        positions = torch.arange(start, start + self.block_size, device=visible.device).unsqueeze(0)
        return self.drafter.draft_cached(embeds, positions, self.cache)[0]

    def draft_logits(self, visible: Tensor, start: int) -> Tensor:
        """-> logits [B - p, V] of the drafted slots p..B-1 through the frozen target head."""
        hidden = self.draft_hidden(visible, start)[visible.shape[0]:]
        lm_head = self.target.lm_head
        return lm_head(hidden.to(lm_head.weight.dtype))

    def propose(self, anchor: int, start: int, sampler: Sampler) -> Proposal:
        anchor_ids = torch.tensor([anchor], device=self.target.lm_head.weight.device)
        tokens, probs = sampler.pick(self.draft_logits(anchor_ids, start))
        return Proposal(tokens=tokens, probs=probs)


class D2SDProposer:
    """D²SD drafting (greedy): the DFlash block plus K alternative rows re-drafted by a variable-prefix drafter.

    The first drafter drafts d_1..d_{B-1} with confidences c_k = max softmax. The chance that verification first
    fails at slot k is reach_k·(1 − c_k), reach_k = Π_{j<k} c_j; at the K most likely slots the row branches to
    the first drafter's second choice a_k, and the VP drafter re-drafts slots k+1..B-1 seeing the prefix
    [anchor, d_1..d_{k-1}, a_k] (k + 1 visible tokens, context still strictly before the anchor). All 1 + K rows
    are verified in one batched target forward; the longest accepted row is committed. The batch stands in for the
    paper's shared-prefix tree with cascade attention: the same candidates and τ, not its verification cost.
    """

    needs_features = True

    def __init__(self, first: DFlashProposer, second: DFlashProposer, branches: int):
        g1, g2 = first.drafter.geometry, second.drafter.geometry
        for name in ("block_size", "target_layer_ids", "mask_token_id", "hidden_size"):
            if getattr(g1, name) != getattr(g2, name):
                raise ValueError(f"the two drafters differ in {name}: {getattr(g1, name)} vs {getattr(g2, name)}")
        self.first, self.second, self.branches = first, second, branches
        self.block_size = first.block_size

    def begin(self, tapped: Tensor) -> None:
        self.first.begin(tapped)
        self.second.begin(tapped)

    def extend(self, tapped: Tensor) -> None:
        self.first.extend(tapped)
        self.second.extend(tapped)

    def propose(self, anchor: int, start: int, sampler: Sampler) -> Proposal:
        if not sampler.greedy:
            raise ValueError("D²SD drafting is greedy only (temperature 0)")
        anchor_ids = torch.tensor([anchor], device=self.first.target.lm_head.weight.device)
        top = torch.softmax(self.first.draft_logits(anchor_ids, start).float(), dim=-1).topk(2, dim=-1)  # [B-1, 2]
        main, confidence = top.indices[:, 0], top.values[:, 0]
        reach = torch.cat([confidence.new_ones(1), confidence.cumprod(0)[:-1]])  # P(slots 1..k-1 all accepted)
        branch_slots = (reach * (1 - confidence)).topk(min(self.branches, main.shape[0])).indices.sort().values
        rows = [main]
        for k in branch_slots.tolist():  # 0-based index into the drafts: slot k + 1
            prefix = torch.cat([main[:k], top.indices[k, 1:]])  # d_1..d_k-1, then the alternative a_k
            visible = torch.cat([anchor_ids, prefix])
            tail = self.second.draft_logits(visible, start).argmax(dim=-1) if visible.shape[0] < self.block_size \
                else main.new_empty(0)
            rows.append(torch.cat([prefix, tail]))
        return Proposal(tokens=torch.stack(rows))  # [1 + K, B-1]


# ---------------------------------------------------------------------------------------------- verification
def verify(proposal: Proposal, target_logits: Tensor, sampler: Sampler) -> Tuple[int, int]:
    """Drafts d_1..d_L against the target's logits of the verified block [anchor, d_1..d_L] ([L+1, V]; row i
    predicts the token after slot i). Returns (accepted drafts, the target's next token after them).

    Greedy: accepted = longest prefix with d_k == argmax row k-1; next = argmax of row `accepted`.
    T > 0:  keep d_k with probability min(1, p_{k-1}(d_k) / q_k(d_k)); at the first rejection draw the next
            token from norm(max(0, p_{k-1} - q_k)); if all are kept, draw a bonus token from p_L. With
            ``proposal.probs`` None the drafts are deterministic (q one-hot).
    """
    drafts = proposal.tokens
    if sampler.greedy:
        target_tokens = target_logits.argmax(dim=-1)  # [L+1]
        accepted = int((drafts == target_tokens[:-1]).long().cumprod(dim=0).sum())
        return accepted, int(target_tokens[accepted])
    p = sampler.probs(target_logits)  # [L+1, V]
    for k, token in enumerate(drafts.tolist()):
        q_k = proposal.probs[k] if proposal.probs is not None else torch.nn.functional.one_hot(
            drafts[k], p.shape[-1]).float()
        if sampler.uniform(p.device) * float(q_k[token]) <= float(p[k, token]):  # u < p/q, without dividing
            continue
        residual = (p[k] - q_k).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had probability ~0
            residual = p[k]
        return k, int(sampler.draw((residual / residual.sum()).unsqueeze(0)))
    return drafts.shape[0], int(sampler.draw(p[-1:]))


def verify_rows(proposal: Proposal, target_logits: Tensor, sampler: Sampler) -> Tuple[int, int, int]:
    """target_logits [R, L+1, V] of R candidate rows -> (winning row, accepted drafts, next token).

    One row: :func:`verify`. Several rows (greedy only): the row with the most accepted drafts, the first row on a
    tie; every row is a causal continuation of the same committed prefix, so each is verified exactly.
    """
    if proposal.tokens.dim() == 1:
        return (0, *verify(proposal, target_logits[0], sampler))
    if not sampler.greedy:
        raise ValueError("candidate rows are verified greedily only (temperature 0)")
    results = [verify(Proposal(tokens), logits, sampler) for tokens, logits in zip(proposal.tokens, target_logits)]
    row = max(range(len(results)), key=lambda r: (results[r][0], -r))
    return (row, *results[row])


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class Generation:
    tokens: List[int]  # generated tokens (a stop token, when hit, is the last one)
    accepted: List[int] = field(default_factory=list)  # per round: accepted drafts that were committed
    winning_rows: List[int] = field(default_factory=list)  # per round: the verified row committed (0 = main draft)
    seconds: float = 0.0  # wall time of the whole generation (prefill included)

    @property
    def rounds(self) -> int:
        return len(self.accepted)


def commit(tokens: List[int], new_tokens: Sequence[int], stop_token_ids: Sequence[int], max_new_tokens: int) -> bool:
    """Append new_tokens up to and including the first stop token or the budget. Returns whether generation ends."""
    for token in new_tokens:
        tokens.append(token)
        if token in stop_token_ids or len(tokens) >= max_new_tokens:
            return True
    return False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    target: FrozenTarget,
    proposer: Proposer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    sampler: Sampler,
) -> Generation:
    """Speculative decoding of one prompt. The last round of a generation counts only the tokens it committed
    (a stop token mid-block or the budget ends the round early)."""
    device = target.lm_head.weight.device
    stop = set(int(t) for t in stop_token_ids)
    _synchronize(device)
    started = time.perf_counter()
    session = TargetSession(target, proposer.needs_features)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, P]
    logits, tapped = session.forward(prompt, start=0, last_only=True)
    first = sampler.pick(logits[0, -1:])[0]
    generation = Generation(tokens=[])
    done = commit(generation.tokens, [int(first)], stop, max_new_tokens)
    if not done:
        proposer.begin(tapped[0] if tapped is not None else None)
    start = prompt.shape[1]  # position of the anchor (the last committed token)
    while not done:
        anchor = generation.tokens[-1]
        proposal = proposer.propose(anchor, start, sampler)
        proposal.tokens = proposal.tokens.to(device)
        rows = proposal.rows()  # [R, L]
        anchors = torch.full((rows.shape[0], 1), anchor, dtype=torch.long, device=device)
        logits, tapped = session.forward(torch.cat([anchors, rows], dim=1), start)  # [R, L+1, V]
        row, accepted, next_token = verify_rows(proposal, logits, sampler)
        before = len(generation.tokens)
        done = commit(generation.tokens, rows[row, :accepted].tolist() + [next_token], stop, max_new_tokens)
        generation.accepted.append(len(generation.tokens) - before - 1)
        generation.winning_rows.append(row)
        if done:
            break
        start += accepted + 1
        session.keep(row, start)  # the anchor and the accepted drafts; the next anchor is not in the cache yet
        proposer.extend(tapped[row, : accepted + 1] if tapped is not None else None)
    _synchronize(device)
    generation.seconds = time.perf_counter() - started
    return generation


@contextlib.contextmanager
def single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Batch-1 decoding runs many tiny ops: on CPU, intra-op threads only add synchronization (measured on the
    tiny default: 8 prompts in 5.6 s with one thread, 73 s with two on a busy 2-core machine). Restored after."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- statistics
def acceptance_stats(generations: Sequence[Generation], block_size: int) -> Dict[str, object]:
    """τ = mean over all rounds of (accepted + 1); histogram of accepted lengths 0..B-1; per drafted position k
    the rate P(accepted >= k) and the conditional rate P(accepted >= k | accepted >= k-1)."""
    accepted = [a for g in generations for a in g.accepted]
    rounds = len(accepted)
    histogram = [sum(1 for a in accepted if a == n) for n in range(block_size)]
    reached = [sum(1 for a in accepted if a >= k) for k in range(block_size)]  # reached[0] = rounds
    return {
        "tau": (sum(accepted) + rounds) / rounds if rounds else float("nan"),
        "rounds": rounds,
        "histogram": histogram,
        "accept_rate": [reached[k] / rounds if rounds else 0.0 for k in range(1, block_size)],
        "conditional_accept_rate": [reached[k] / reached[k - 1] if reached[k - 1] else 0.0
                                    for k in range(1, block_size)],
    }
