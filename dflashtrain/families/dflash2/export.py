"""What a DFlash2 export adds to the DFlash directory (docs/export.md, dflash2), in the names both engines load.

    config.json        "architectures": ["DFlash2DraftModel"] (never the DFlash name: an engine would serve the
                       backbone alone and ignore the new tensors); "dflash_config" gains conv_kernel_size,
                       conv_group_size, selector_rank, selector_top_k (required) and block_size
    model.safetensors  layers.{i}.{attention,mlp}_conv.{base_kernel, kernel_projection.weight} (part of the
                       drafter's own tensors), candidate_selector.{predecessor,successor}_codebook [V, r] (no
                       ".weight"), candidate_selector.hidden_projection.weight [r, d]

In a training checkpoint the selector is ``heads.*``; ``selector_stop_gradient`` only shaped training and is not
exported.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor

from dflashtrain.families.dflash2.selector import CandidateSelector

ARCHITECTURE = "DFlash2DraftModel"
PREFIX = "candidate_selector."
SERVED_OPTIONS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
TRAINING_OPTIONS = ("selector_stop_gradient",)


def export_config(options: Dict[str, Any]) -> Dict[str, Any]:
    return {"dflash_config": {name: options[name] for name in SERVED_OPTIONS}}


def options_from_export(config: Dict[str, Any]) -> Dict[str, Any]:
    dflash = config.get("dflash_config") or {}
    missing = [name for name in SERVED_OPTIONS if name not in dflash]
    if missing:
        raise ValueError(f"a {ARCHITECTURE} config.json needs dflash_config.{', '.join(missing)}")
    return {name: dflash[name] for name in SERVED_OPTIONS}


def export_tensors(heads: CandidateSelector) -> Dict[str, Tensor]:
    return {PREFIX + name: t.detach().contiguous() for name, t in heads.state_dict().items()}


def heads_from_export(tensors: Dict[str, Tensor], config: Dict[str, Any]) -> Optional[CandidateSelector]:
    options = options_from_export(config)
    state = {name[len(PREFIX):]: t for name, t in tensors.items() if name.startswith(PREFIX)}
    selector = CandidateSelector(config["vocab_size"], config["hidden_size"], options["selector_rank"],
                                 options["selector_top_k"], stop_gradient=False)
    selector.load_state_dict(state, strict=True)
    return selector.to(next(iter(state.values())).dtype).eval()


def is_head_tensor(exported_name: str) -> bool:
    return exported_name.startswith(PREFIX)
