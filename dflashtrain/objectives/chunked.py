"""LM head + objective over chunks of blocks, so the [b, N, B, V] logits never exist at once (docs/architecture.md).

A chunk's logits live only while its loss and its gradient are taken: the chunk runs with its hidden states
detached, ``torch.autograd.grad`` of Σ_t α_t·num_t gives the gradient with respect to them (and to any trainable
tensor the chunk reads, e.g. DSpark's heads) at once, and the logits are freed. The backward pass then only scales
those stored gradients by the upstream one, so the V-wide head GEMM runs twice per step (forward and gradient)
instead of three times as under activation checkpointing, and the argmax, the teacher's logits and every V-wide
softmax run once per chunk. Chunked and unchunked give the same loss, metrics and gradients to float rounding
(tests/test_chunked.py).

Contract: the terms are differentiable along the objective's coefficients only. The gradient of the returned terms
with respect to an upstream gradient g [T] is that of s·Σ_t α_t·num_t with s = Σ_t g_t·α_t / Σ_t α_t² — exact for
every reduction of the form scale · Σ_t α_t·num_t (the step's, :func:`dflashtrain.train.module.loss_numerator`),
and for any use of a single-term objective. On CPU a gradient that is not along α raises.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dflashtrain.data.blocks import DraftBlocks
from dflashtrain.models.target import head_logits
from dflashtrain.objectives.metrics import SlotCounts, count_slots
from dflashtrain.objectives.protocol import ChunkLoss, Objective, SlotChunk

CHECK_ON_CPU = True  # check the contract on CPU, where reading the upstream gradient costs nothing (NaN: the guard's)
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


def chunk_loss(h: Tensor, sub: DraftBlocks, objective: Objective, logits_fn: LogitsFn,
               teacher: Optional[Callable[[Tensor], Tensor]]) -> Tuple[ChunkLoss, SlotCounts]:
    """One chunk: logits, the objective's sums and the slot counts. h [b, c, B, d]."""
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
    return objective(chunk), count_slots(correct, sub.slot_valid, sub.drafted, sub.block_keep)


def chunked_objective(
    hidden: Tensor,
    blocks: DraftBlocks,
    objective: Objective,
    logits_fn: LogitsFn,
    chunk_blocks: int,
    teacher: Optional[Callable[[Tensor], Tensor]] = None,
    use_checkpoint: bool = True,
    coefficients: Optional[Dict[str, float]] = None,
) -> Tuple[ChunkLoss, SlotCounts]:
    """hidden [b, N, B, d] -> summed ChunkLoss and slot counts over all N blocks.

    ``teacher`` maps label positions [b, c, B] to teacher logits (given only when the objective needs them).
    ``use_checkpoint`` (the memory-bounded path, default) takes each chunk's gradient in the forward pass as the
    module docstring says; False keeps every chunk's graph for an ordinary backward (the reference in the tests).
    ``coefficients``: the α of this step (``objective.coefficients_at``; default ``objective.coefficients``).
    """
    bounded = use_checkpoint and hidden.requires_grad and torch.is_grad_enabled()
    starts = range(0, hidden.shape[1], chunk_blocks)
    if not bounded:
        parts = [chunk_loss(hidden[:, s:s + chunk_blocks], blocks.chunk(s, s + chunk_blocks), objective, logits_fn,
                            teacher) for s in starts]
        return _sum(p[0] for p in parts), _sum(p[1] for p in parts)

    coefficients = dict(objective.coefficients if coefficients is None else coefficients)
    if not any(coefficients.values()):  # no term trains at this step: nothing to differentiate along
        coefficients = {name: 1.0 for name in coefficients}
    names = list(coefficients)
    alphas = [coefficients[name] for name in names]
    hidden_grad = torch.empty_like(hidden)
    leaves: Optional[List[Tensor]] = None  # trainable tensors the chunk reads besides hidden (found once)
    leaf_grads: List[Tensor] = []
    total, counts = None, None
    for s in starts:
        sub = blocks.chunk(s, s + chunk_blocks)
        with torch.enable_grad():
            h = hidden[:, s:s + chunk_blocks].detach().requires_grad_(True)
            loss, chunk_counts = chunk_loss(h, sub, objective, logits_fn, teacher)
            combined = sum(alpha * loss.terms[name] for name, alpha in zip(names, alphas))
            if leaves is None:
                leaves = graph_leaves(combined, exclude=h)
                leaf_grads = [torch.zeros_like(leaf) for leaf in leaves]
            grads = torch.autograd.grad(combined, [h, *leaves], allow_unused=True)
        hidden_grad[:, s:s + chunk_blocks] = grads[0] if grads[0] is not None else 0.0
        for accumulated, grad in zip(leaf_grads, grads[1:]):
            if grad is not None:
                accumulated.add_(grad)
        loss = _detached(loss)
        total = loss if total is None else total + loss
        counts = chunk_counts if counts is None else counts + chunk_counts

    values = torch.stack([total.terms[name] for name in names])  # [T]
    terms = PrecomputedGradient.apply(values, torch.tensor(alphas, device=values.device, dtype=values.dtype),
                                      [hidden_grad, *leaf_grads], hidden, *leaves)
    total.terms = dict(zip(names, terms.unbind(0)))
    return total, counts


class PrecomputedGradient(torch.autograd.Function):
    """terms [T] whose gradient with respect to (hidden, *leaves) was taken in the forward pass, for Σ_t α_t·term_t.

    backward: g [T] -> s · grads with s = Σ_t g_t·α_t / Σ_t α_t² (see the module docstring).
    """

    @staticmethod
    def forward(ctx, values: Tensor, alphas: Tensor, grads: Sequence[Tensor], *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        ctx.save_for_backward(alphas)
        return values.clone()

    @staticmethod
    def backward(ctx, upstream: Tensor):
        (alphas,) = ctx.saved_tensors
        scale = (upstream * alphas).sum() / (alphas * alphas).sum()
        checkable = CHECK_ON_CPU and upstream.device.type == "cpu" and bool(torch.isfinite(upstream).all())
        if checkable and not torch.allclose(upstream, scale * alphas, rtol=1e-5, atol=0.0):
            raise RuntimeError(f"chunked objective terms are differentiable along the coefficients {alphas.tolist()} "
                               f"only; got an upstream gradient {upstream.tolist()}")
        return (None, None, None, *(scale.to(g.dtype) * g for g in ctx.grads))


def graph_leaves(output: Tensor, exclude: Tensor) -> List[Tensor]:
    """The leaf tensors requiring grad that ``output`` depends on, except ``exclude`` (autograd graph order)."""
    leaves: List[Tensor] = []
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            if variable is not exclude and all(variable is not leaf for leaf in leaves):
                leaves.append(variable)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _detached(loss: ChunkLoss) -> ChunkLoss:
    return ChunkLoss(terms={k: v.detach() for k, v in loss.terms.items()}, weight_sum=loss.weight_sum.detach(),
                     token_sum=loss.token_sum.detach(), slot_weight_sum=loss.slot_weight_sum.detach(),
                     stats={k: v.detach() for k, v in loss.stats.items()})


def _sum(items):
    total = None
    for item in items:
        total = item if total is None else total + item
    return total
