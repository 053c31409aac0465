"""What a DSpark export adds to the DFlash directory (docs/export.md, dspark).

    config.json        "architectures": ["DSparkDraftModel"], "dspark_config": {markov_rank, confidence_head,
                       label_offset: 1}
    model.safetensors  markov_head.embed.weight [V, r], markov_head.proj.weight [V, r],
                       confidence_head.weight [1, d + r], confidence_head.bias [1]   (beside the drafter's tensors)
    modeling_dspark.py a self-contained loader (no dflashtrain needed to load the directory)

In a training checkpoint the heads are ``heads.markov.*`` / ``heads.confidence.*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from torch import Tensor

from dflashtrain.families.dspark.heads import DSparkHeads

EXPORT_NAMES = {"markov.": "markov_head.", "confidence.": "confidence_head."}  # module name -> exported name
MODELING_FILE = Path(__file__).with_name("modeling_dspark.py")
ARCHITECTURE = "DSparkDraftModel"  # the class in MODELING_FILE


def export_config(options: Dict[str, Any]) -> Dict[str, Any]:
    """The config.json fields an exported DSpark drafter adds to DFlash's (read by modeling_dspark.py)."""
    return {
        "dspark_config": {
            "markov_rank": options["markov_rank"],
            "confidence_head": options["confidence_head"],
            "label_offset": 1,  # next-token convention: all B slots draft (x[a+k+1]); a round verifies B + 1
        },
    }


def options_from_export(config: Dict[str, Any]) -> Dict[str, Any]:
    dspark = config.get("dspark_config") or {}
    return {"markov_rank": dspark.get("markov_rank", 0), "confidence_head": bool(dspark.get("confidence_head"))}


def _renamed(tensors: Dict[str, Tensor], prefixes: Dict[str, str]) -> Dict[str, Tensor]:
    """The tensors whose name starts with a key of ``prefixes``, that prefix replaced by its value; others dropped."""
    out = {}
    for name, tensor in tensors.items():
        old = next((p for p in prefixes if name.startswith(p)), None)
        if old is not None:
            out[prefixes[old] + name[len(old):]] = tensor
    return out


def export_tensors(heads: Optional[DSparkHeads]) -> Dict[str, Tensor]:
    """Head weights under their export names: markov_head.{embed,proj}.weight, confidence_head.{weight,bias}."""
    if heads is None:
        return {}
    return {name: t.detach().contiguous() for name, t in _renamed(heads.state_dict(), EXPORT_NAMES).items()}


def heads_from_export(tensors: Dict[str, Tensor], config: Dict[str, Any]) -> Optional[DSparkHeads]:
    """Rebuild the heads of an exported directory (its model.safetensors tensors and config.json); None if none."""
    dspark = config.get("dspark_config") or {}
    if not dspark.get("markov_rank"):
        return None
    heads = DSparkHeads(config["vocab_size"], config["hidden_size"], dspark["markov_rank"], dspark["confidence_head"])
    state = _renamed(tensors, {exported: module for module, exported in EXPORT_NAMES.items()})
    heads.load_state_dict(state, strict=True)
    return heads.to(next(iter(state.values())).dtype).eval()


def is_head_tensor(exported_name: str) -> bool:
    return exported_name.startswith(tuple(EXPORT_NAMES.values()))
