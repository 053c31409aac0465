"""The dspark family: the DFlash backbone in the next-token convention, plus the Markov and confidence heads
(docs/objectives.md, dspark). Training teacher-forces ``prev``; inference drafts left to right through the
Markov head after one backbone pass (:mod:`dflashtrain.families.dspark.drafting`)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import Tensor, nn

from dflashtrain.data.blocks import DraftBlocks
from dflashtrain.families import DraftingFamily
from dflashtrain.families.dflash.family import build_drafter
from dflashtrain.families.dspark import export
from dflashtrain.families.dspark.drafting import DSparkProposer
from dflashtrain.families.dspark.heads import DSparkHeads, slot_logits, teacher_forced_prev
from dflashtrain.objectives.dspark import CONFIDENCE_LOGITS


def build_heads(vocab_size: int, hidden_size: int, options: Dict[str, Any]) -> Optional[DSparkHeads]:
    if options["markov_rank"] == 0:
        return None
    return DSparkHeads(vocab_size, hidden_size, options["markov_rank"], options["confidence_head"])


def logits(hidden: Tensor, blocks: DraftBlocks, lm_head: nn.Module, heads: Optional[DSparkHeads]
           ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """z = lm_head(h) + W2·W1[prev] with teacher-forced prev; extras: the confidence logits u [b, c, B]."""
    z, confidence = slot_logits(hidden, teacher_forced_prev(blocks), lm_head, heads)
    return z, {} if confidence is None else {CONFIDENCE_LOGITS: confidence}


def proposer(drafter: nn.Module, heads: Optional[DSparkHeads], target: Any) -> DSparkProposer:
    return DSparkProposer(drafter, target, heads)


FAMILY = DraftingFamily(
    name="dspark",
    architecture=export.ARCHITECTURE,
    label_offset=1,
    build_drafter=build_drafter,
    build_heads=build_heads,
    logits=logits,
    proposer=proposer,
    export_config=export.export_config,
    options_from_export=export.options_from_export,
    export_tensors=export.export_tensors,
    heads_from_export=export.heads_from_export,
    is_head_tensor=export.is_head_tensor,
    export_files=(export.MODELING_FILE,),
)
