"""The Objective interface: everything the training step needs from an objective, declared once.

An objective sees one chunk of blocks at a time (:class:`SlotChunk`, tensors ``[b, c, B, ...]``) and returns
additive sums (:class:`ChunkLoss`). The step adds the chunks up and reduces them globally (docs/conventions.md,
reduction):

    loss = W · Σ_t α_t · num_t / (all_reduce(den) + ε)

``num_t`` are the loss terms (``ChunkLoss.terms``), ``α_t`` the objective's :attr:`Objective.coefficients` (the
two must name the same terms; :meth:`Objective.coefficients_at` may schedule them over the steps), ``den``
is chosen by :attr:`Objective.normalizer`. Statistics that are not loss
terms travel separately in ``ChunkLoss.stats`` and only ever reach :meth:`Objective.metrics`.

:func:`check_objective` is applied to every objective the trainer builds: a missing member or a value of the wrong
kind is an error at construction, never a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from dflashtrain.data.blocks import DraftBlocks
    from dflashtrain.data.sampling import RowGenerators
    from dflashtrain.objectives.metrics import SlotCounts


class Normalizer(str, Enum):
    """The global denominator of the loss."""

    weight = "weight"  # Σ w·m (the weighted mean)
    tokens = "tokens"  # Σ m (supervised slots)
    sequences = "sequences"  # sequences in the global batch


@dataclass
class SlotChunk:
    logits: Tensor  # [b, c, B, V] fp32 drafter logits
    labels: Tensor  # [b, c, B] long
    valid: Tensor  # [b, c, B] bool: drafted and supervised
    drafted: Tensor  # [b, c, B] bool: slots the drafter predicts (suffix after the visible prefix)
    teacher_logits: Optional[Tensor] = None  # [b, c, B, V] fp32 target logits at label_pos - 1
    extras: Dict[str, Tensor] = field(default_factory=dict)  # family tensors (e.g. DSpark confidence logits)


@dataclass
class ChunkLoss:
    terms: Dict[str, Tensor]  # loss term -> Σ w·m·ℓ over the chunk (scalar); weighted by the coefficients
    weight_sum: Tensor  # Σ w·m
    token_sum: Tensor  # Σ m
    slot_weight_sum: Tensor  # [B] Σ over blocks of w·m per slot (for logging mean weights)
    stats: Dict[str, Tensor] = field(default_factory=dict)  # additive statistics, never part of the loss

    def __add__(self, other: "ChunkLoss") -> "ChunkLoss":
        return ChunkLoss(
            terms={name: value + other.terms[name] for name, value in self.terms.items()},
            weight_sum=self.weight_sum + other.weight_sum,
            token_sum=self.token_sum + other.token_sum,
            slot_weight_sum=self.slot_weight_sum + other.slot_weight_sum,
            stats={name: value + other.stats[name] for name, value in self.stats.items()},
        )


@runtime_checkable
class Objective(Protocol):
    name: str  # the loss=<name> option
    family: str  # the drafting family it trains (dflashtrain/families/<family>)
    label_offset: int  # 0: slot k predicts x[a+k] (DFlash); 1: x[a+k+1] (next-token)
    normalizer: Normalizer
    coefficients: Mapping[str, float]  # loss term -> α; exactly the names of ChunkLoss.terms
    needs_teacher: bool  # whether chunks need the target's logits at label_pos - 1

    def prepare_blocks(self, blocks: "DraftBlocks", input_ids: Tensor, rng: "RowGenerators") -> "DraftBlocks":
        """The blocks the drafter sees (VP shows a visible prefix); unchanged for most objectives. Random draws
        come from ``rng``, the batch's per-row generators (so they are reproducible on resume and on any rank)."""

    def __call__(self, chunk: SlotChunk) -> ChunkLoss:
        """Additive loss terms and statistics of one chunk."""

    def metrics(self, total: ChunkLoss, counts: "SlotCounts") -> Dict[str, Tensor]:
        """Objective-specific metrics of a batch (its summed chunks), logged as train/<name>."""

    def coefficients_at(self, step: int, total_steps: int) -> Mapping[str, float]:
        """The coefficients at an optimizer step (same names as :attr:`coefficients`; DFlash2 ramps its selector
        weight). Objectives without a schedule declare ``coefficients_at = constant_coefficients``."""


MEMBERS = ("name", "family", "label_offset", "normalizer", "coefficients", "needs_teacher",
           "prepare_blocks", "__call__", "metrics", "coefficients_at")


def check_objective(objective: object) -> Objective:
    """``objective`` if it declares every member with a value of the right kind; else TypeError naming it."""
    where = type(objective).__name__
    missing = [name for name in MEMBERS if not hasattr(objective, name)]
    if missing:
        raise TypeError(f"objective {where} does not declare {', '.join(missing)} (see dflashtrain.objectives.protocol)")
    problems = []
    if not isinstance(objective.name, str) or not objective.name:
        problems.append(f"name {objective.name!r} is not a non-empty string")
    if not isinstance(objective.family, str):
        problems.append(f"family {objective.family!r} is not a string")
    if objective.label_offset not in (0, 1):
        problems.append(f"label_offset {objective.label_offset!r} is not 0 or 1")
    if not isinstance(objective.normalizer, Normalizer):
        problems.append(f"normalizer {objective.normalizer!r} is not a Normalizer")
    if not isinstance(objective.needs_teacher, bool):
        problems.append(f"needs_teacher {objective.needs_teacher!r} is not a bool")
    coefficients = objective.coefficients
    if not isinstance(coefficients, Mapping) or not coefficients or not all(
            isinstance(k, str) and isinstance(v, float) for k, v in coefficients.items()):
        problems.append(f"coefficients {coefficients!r} is not a non-empty mapping of term name -> float")
    callables = ("prepare_blocks", "__call__", "metrics", "coefficients_at")
    if not all(callable(getattr(objective, name)) for name in callables):
        problems.append(f"{', '.join(callables)} must be callable")
    if problems:
        raise TypeError(f"objective {where}: " + "; ".join(problems))
    return objective  # type: ignore[return-value]


def constant_coefficients(objective: Objective, step: int, total_steps: int) -> Mapping[str, float]:
    """``coefficients_at`` of an objective whose coefficients do not change during training."""
    return objective.coefficients


def unchanged_blocks(blocks: "DraftBlocks", input_ids: Tensor, rng: "RowGenerators") -> "DraftBlocks":
    """``prepare_blocks`` of an objective that trains on the blocks as built (anchor, then MASK)."""
    return blocks


def no_metrics(total: ChunkLoss, counts: "SlotCounts") -> Dict[str, Tensor]:
    """``metrics`` of an objective with nothing beyond the shared metrics (acc, tau_est, ...)."""
    return {}
