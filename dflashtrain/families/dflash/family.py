"""The dflash family: the DFlash drafter alone, drafting a block in one non-causal pass (docs/architecture.md).

Objectives decay, dpace and vp_drafter train it; its export is the plain DFlash directory (docs/export.md).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import Tensor, nn

from dflashtrain.data.blocks import DraftBlocks
from dflashtrain.families import DraftingFamily
from dflashtrain.inference.decode import DFlashProposer
from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
from dflashtrain.models.target import head_logits


def build_drafter(geometry: DrafterGeometry, options: Dict[str, Any]) -> DFlashDrafter:
    return DFlashDrafter(geometry)


def build_heads(vocab_size: int, hidden_size: int, options: Dict[str, Any]) -> None:
    return None


def logits(hidden: Tensor, blocks: DraftBlocks, lm_head: nn.Module, heads: None) -> Tuple[Tensor, Dict[str, Tensor]]:
    return head_logits(hidden, lm_head), {}


def proposer(drafter: DFlashDrafter, heads: None, target: Any) -> DFlashProposer:
    return DFlashProposer(drafter, target)


def no_heads_from_export(tensors: Dict[str, Tensor], config: Dict[str, Any]) -> Optional[nn.Module]:
    return None


FAMILY = DraftingFamily(
    name="dflash",
    architecture="DFlashDraftModel",
    label_offset=0,
    build_drafter=build_drafter,
    build_heads=build_heads,
    logits=logits,
    proposer=proposer,
    export_config=lambda options: {},
    options_from_export=lambda config: {},
    export_tensors=lambda heads: {},
    heads_from_export=no_heads_from_export,
    is_head_tensor=lambda name: False,
)
