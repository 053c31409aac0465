"""The loss of one optimizer step over every rank and every accumulated micro-batch (docs/conventions.md, reduction).

An optimizer step trains on k micro-batches (``trainer.accumulate_grad_batches``) on each of W ranks. Its loss is
one global mean over all of them,

    L = Σ_{r,i} Σ_t α_t · num_t(r, i) / (D + ε),    D = Σ_{r,i} den(r, i)

with den chosen by the objective's normalizer. D is a constant for autograd (the weights are detached), so
∇L = Σ_{r,i} ∇num(r, i) / (D + ε). It is applied in one pass without knowing D in advance:

1. every micro-batch's additive sums (den, the loss terms, the metric counts) are summed over ranks in one
   collective on a packed, detached copy;
2. the micro-batch's loss is ``W · Σ_t α_t · num_t / (P + ε)``, where P, the *provisional* denominator, is the
   global den of the step's first micro-batch (1 if that is 0, so that no later micro-batch is divided by ε alone);
   Lightning divides it by k and DDP / FSDP average the gradients over the W ranks;
3. before the optimizer step (and before clipping) the gradients are multiplied by ``k · (P + ε) / (D + ε)``.

With k = 1, P = D (or 1 when D = 0 and the step is skipped): the factor is exactly 1 and the loss is
``W · Σ α·num / (D + ε)``, the formula without accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

from dflashtrain.objectives.metrics import SlotCounts
from dflashtrain.objectives.protocol import ChunkLoss, Normalizer

EPS = 1e-8


def loss_numerator(total: ChunkLoss, coefficients: Mapping[str, float]) -> Tensor:
    """Σ_t α_t · num_t. The objective's coefficients must name exactly its loss terms."""
    if set(coefficients) != set(total.terms):
        raise ValueError(f"the objective's coefficients {sorted(coefficients)} do not name its loss terms "
                         f"{sorted(total.terms)}")
    return sum(alpha * total.terms[name] for name, alpha in coefficients.items())


def local_denominator(total: ChunkLoss, normalizer: Normalizer, num_sequences: int) -> Tensor:
    """This rank's share of the loss's denominator, a new fp32 tensor: Σ w·m, Σ m or the number of sequences."""
    if normalizer == Normalizer.weight:
        return total.weight_sum.detach().float().clone()
    if normalizer == Normalizer.tokens:
        return total.token_sum.detach().float().clone()
    if normalizer == Normalizer.sequences:
        return torch.tensor(float(num_sequences), device=total.weight_sum.device)
    raise ValueError(f"unknown normalizer {normalizer!r}; valid: {[n.value for n in Normalizer]}")


@dataclass
class StepSums:
    """Additive sums of one or more micro-batches, detached: everything the loss and the logged values need."""

    den: Tensor  # scalar, the normalizer's denominator
    total: ChunkLoss  # loss terms, Σ w·m, Σ m, Σ w·m per slot, objective statistics
    counts: Optional[SlotCounts]  # metric counts (acc, tau_est, ...), when the caller logs them

    def tensors(self) -> Dict[str, Tensor]:
        """Name -> tensor, in a fixed order (the same on every rank: the objective fixes the names)."""
        named = {"den": self.den, "weight_sum": self.total.weight_sum,
                 "token_sum": self.total.token_sum, "slot_weight_sum": self.total.slot_weight_sum}
        named.update({f"term/{k}": v for k, v in self.total.terms.items()})
        named.update({f"stat/{k}": v for k, v in self.total.stats.items()})
        if self.counts is not None:
            named.update({f"count/{f.name}": getattr(self.counts, f.name) for f in fields(SlotCounts)})
        return named

    @classmethod
    def from_tensors(cls, named: Mapping[str, Tensor]) -> "StepSums":
        def group(prefix: str) -> Dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in named.items() if k.startswith(prefix)}

        total = ChunkLoss(terms=group("term/"), weight_sum=named["weight_sum"], token_sum=named["token_sum"],
                          slot_weight_sum=named["slot_weight_sum"], stats=group("stat/"))
        counts = group("count/")
        return cls(den=named["den"], total=total, counts=SlotCounts(**counts) if counts else None)

    def __add__(self, other: "StepSums") -> "StepSums":
        mine, theirs = self.tensors(), other.tensors()
        return StepSums.from_tensors({k: v + theirs[k] for k, v in mine.items()})


def local_sums(total: ChunkLoss, counts: Optional[SlotCounts], normalizer: Normalizer, num_sequences: int
               ) -> StepSums:
    """This rank's sums of one micro-batch, detached fp32 copies (the autograd graph is untouched)."""
    detached = ChunkLoss(
        terms={k: v.detach().float() for k, v in total.terms.items()},
        weight_sum=total.weight_sum.detach().float(), token_sum=total.token_sum.detach().float(),
        slot_weight_sum=total.slot_weight_sum.detach().float(),
        stats={k: v.detach().float() for k, v in total.stats.items()},
    )
    if counts is not None:
        counts = SlotCounts(**{f.name: getattr(counts, f.name).detach().float() for f in fields(SlotCounts)})
    return StepSums(local_denominator(total, normalizer, num_sequences), detached, counts)


def pack(sums: StepSums) -> Tensor:
    """Every sum flattened into one new fp32 vector (so one collective carries all of them)."""
    return torch.cat([t.reshape(-1).float() for t in sums.tensors().values()])


def unpack(flat: Tensor, like: StepSums) -> StepSums:
    """The inverse of :func:`pack`, shaped like ``like``."""
    named, start = {}, 0
    for name, tensor in like.tensors().items():
        named[name] = flat[start:start + tensor.numel()].view(tensor.shape)
        start += tensor.numel()
    return StepSums.from_tensors(named)


@dataclass
class StepReport:
    """What the host knows of one optimizer step after its one read (all host values)."""

    factor: Optional[float]  # the gradient factor, or None: no supervised slot anywhere, the step is skipped
    sums: StepSums  # the step's global sums
    loss: Tensor  # the step's global loss (a CPU scalar)
    rows: int  # sequences in the global step
    grad_norm: float  # ‖∇‖₂ of the step's gradients (after the factor; under fsdp the norm of this rank's shard)
    tokens: float  # this rank's real tokens in the step
    local_loss: float  # the sum of the losses backward ran on, on this rank
    bad_loss: bool  # a non-finite loss on some rank (the NaN guard's flags: every rank sees the same)
    local_bad_loss: bool  # ... on this rank
    bad_grad: bool  # a non-finite gradient on some rank
    local_bad_grad: bool  # ... on this rank


class AccumulationWindow:
    """The micro-batches of one optimizer step: the provisional denominator P and the running global sums."""

    def __init__(self) -> None:
        self.provisional: Optional[Tensor] = None  # P
        self.sums: Optional[StepSums] = None
        self.rows = 0  # this rank's sequences in the window (host side)

    def add(self, global_sums: StepSums, rows: int) -> Tensor:
        """Record one micro-batch's global sums (and its local rows); returns P, set by the first micro-batch."""
        if self.provisional is None:
            den = global_sums.den
            self.provisional = torch.where(den > 0, den, torch.ones_like(den))
        self.sums = global_sums if self.sums is None else self.sums + global_sums
        self.rows += rows
        return self.provisional

    def close(self, accumulate_grad_batches: int, extra: Optional[Dict[str, Tensor]] = None
              ) -> tuple[Optional[float], StepSums, Dict[str, Tensor]]:
        """End the window: (the gradient factor k·(P + ε)/(D + ε), or None when D = 0; the window's sums; ``extra``),
        all on the host.

        This is the one host read of the step: the sums, P and the caller's ``extra`` scalars (the NaN guard's flags,
        the grad norm) come back in one device -> host copy; D decides whether the step is skipped.
        """
        if self.sums is None:
            raise RuntimeError("no micro-batch was reduced in this optimizer step")
        sums, provisional, extra = self.sums, self.provisional, dict(extra or {})
        self.sums, self.provisional, self.rows = None, None, 0
        scalars = [provisional, *extra.values()]
        host = torch.cat([pack(sums), *(t.detach().reshape(1).float() for t in scalars)]).cpu()
        size = host.numel() - len(scalars)
        sums = unpack(host[:size], like=sums)
        provisional, *values = host[size:].unbind(0)
        den = float(sums.den)
        factor = None if den <= 0 else accumulate_grad_batches * (float(provisional) + EPS) / (den + EPS)
        return factor, sums, dict(zip(extra, values))


def scale_gradients(parameters: List[torch.nn.Parameter], factor: float) -> None:
    """grad ← factor · grad, in place, for every parameter that has one (DTensor gradients included)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and factor != 1.0:
        torch._foreach_mul_(grads, factor)
