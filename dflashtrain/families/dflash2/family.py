"""The dflash2 family (docs/dflash2.md): the DFlash drafter with grouped dynamic convolutions around every
sublayer, plus a low-rank candidate selector that walks one path through each slot's top-K unary candidates.

Objective ``dflash2`` trains it (DFlash label convention); its export declares ``DFlash2DraftModel``.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from dflashtrain.data.blocks import DraftBlocks
from dflashtrain.families import DraftingFamily
from dflashtrain.families.dflash2 import export
from dflashtrain.families.dflash2.drafting import DFlash2Proposer
from dflashtrain.families.dflash2.layers import DFlash2DecoderLayer
from dflashtrain.families.dflash2.selector import CandidateSelector
from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
from dflashtrain.models.target import head_logits
from dflashtrain.objectives.dflash2 import SELECTOR_CANDIDATES, SELECTOR_GOLD_SCORE, SELECTOR_SCORES

def build_drafter(geometry: DrafterGeometry, options: Dict[str, Any]) -> DFlashDrafter:
    layer = functools.partial(DFlash2DecoderLayer, kernel_size=options["conv_kernel_size"],
                              group_size=options["conv_group_size"])
    return DFlashDrafter(geometry, make_layer=layer)


def build_heads(vocab_size: int, hidden_size: int, options: Dict[str, Any]) -> CandidateSelector:
    return CandidateSelector(vocab_size, hidden_size, options["selector_rank"], options["selector_top_k"],
                             options["selector_stop_gradient"])


def teacher_forced_prev(blocks: DraftBlocks) -> Tensor:
    """The token before each slot's label: x_{a+k−1} (the anchor for slots 0 and 1). [b, c, B] long."""
    return torch.cat([blocks.input_ids[..., :1], blocks.label_ids[..., :-1]], dim=-1)


def logits(hidden: Tensor, blocks: DraftBlocks, lm_head: nn.Module, heads: CandidateSelector
           ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The unary logits lm_head(h) [b, c, B, V] (what the base objective trains) and the selector's teacher-forced
    scores over the top-K candidates (extras)."""
    unary = head_logits(hidden, lm_head)
    selected = heads.teacher_forced(hidden, unary, teacher_forced_prev(blocks), blocks.label_ids)
    return unary, {SELECTOR_CANDIDATES: selected.candidates, SELECTOR_SCORES: selected.scores,
                   SELECTOR_GOLD_SCORE: selected.gold_score}


def proposer(drafter: DFlashDrafter, heads: CandidateSelector, target: Any) -> DFlash2Proposer:
    return DFlash2Proposer(drafter, target, heads)


FAMILY = DraftingFamily(
    name="dflash2",
    architecture=export.ARCHITECTURE,
    label_offset=0,
    build_drafter=build_drafter,
    build_heads=build_heads,
    logits=logits,
    proposer=proposer,
    export_config=export.export_config,
    options_from_export=export.options_from_export,
    export_tensors=export.export_tensors,
    heads_from_export=export.heads_from_export,
    is_head_tensor=export.is_head_tensor,
    training_options=export.TRAINING_OPTIONS,
)
