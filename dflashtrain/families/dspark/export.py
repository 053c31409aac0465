"""What a DSpark export adds to the DFlash directory (docs/export.md, dspark), in the names vLLM's and SGLang's
Qwen3 DSpark loaders read.

    config.json        "architectures": ["Qwen3DSparkModel"] (vLLM maps "DSparkDraftModel" to its DeepSeek-V4
                       drafter, and one declaring the DFlash name is loaded without its heads), "markov_rank",
                       "enable_confidence_head", "confidence_head_with_markov": true (the confidence head reads
                       [h ; W1[prev]]); the block_size B drafts B tokens per round (num_speculative_tokens = B)
    model.safetensors  markov_head.markov_w1.weight [V, r], markov_head.markov_w2.weight [V, r],
                       confidence_head.proj.weight [1, d + r], confidence_head.proj.bias [1]   (beside the drafter's)
    modeling_dspark.py a self-contained loader (no dflashtrain needed to load the directory)

In a training checkpoint the heads are ``heads.markov.*`` / ``heads.confidence.*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from torch import Tensor

from dflashtrain.families.dspark.heads import DSparkHeads

# module name prefix -> exported name prefix
EXPORT_NAMES = {"markov.embed.": "markov_head.markov_w1.", "markov.proj.": "markov_head.markov_w2.",
                "confidence.": "confidence_head.proj."}
MODELING_FILE = Path(__file__).with_name("modeling_dspark.py")
ARCHITECTURE = "Qwen3DSparkModel"  # the engines' Qwen3 DSpark class, and the class in MODELING_FILE


def export_config(options: Dict[str, Any]) -> Dict[str, Any]:
    """The config.json fields an exported DSpark drafter adds to DFlash's (read by the engines and modeling_dspark.py)."""
    return {
        "markov_rank": options["markov_rank"],
        "enable_confidence_head": options["confidence_head"],
        "confidence_head_with_markov": True,
    }


def options_from_export(config: Dict[str, Any]) -> Dict[str, Any]:
    return {"markov_rank": config.get("markov_rank", 0), "confidence_head": bool(config.get("enable_confidence_head"))}


def _renamed(tensors: Dict[str, Tensor], prefixes: Dict[str, str]) -> Dict[str, Tensor]:
    """The tensors whose name starts with a key of ``prefixes``, that prefix replaced by its value; others dropped."""
    out = {}
    for name, tensor in tensors.items():
        old = next((p for p in prefixes if name.startswith(p)), None)
        if old is not None:
            out[prefixes[old] + name[len(old):]] = tensor
    return out


def export_tensors(heads: Optional[DSparkHeads]) -> Dict[str, Tensor]:
    """Head weights under their export names: markov_head.markov_w{1,2}.weight, confidence_head.proj.{weight,bias}."""
    if heads is None:
        return {}
    return {name: t.detach().contiguous() for name, t in _renamed(heads.state_dict(), EXPORT_NAMES).items()}


def heads_from_export(tensors: Dict[str, Tensor], config: Dict[str, Any]) -> Optional[DSparkHeads]:
    """Rebuild the heads of an exported directory (its model.safetensors tensors and config.json); None if none."""
    options = options_from_export(config)
    if not options["markov_rank"]:
        return None
    heads = DSparkHeads(config["vocab_size"], config["hidden_size"], options["markov_rank"], options["confidence_head"])
    state = _renamed(tensors, {exported: module for module, exported in EXPORT_NAMES.items()})
    heads.load_state_dict(state, strict=True)
    return heads.to(next(iter(state.values())).dtype).eval()


def is_head_tensor(exported_name: str) -> bool:
    return exported_name.startswith(tuple(EXPORT_NAMES.values()))
