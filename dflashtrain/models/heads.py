"""DSpark's two small heads (SPEC §6), composed beside the DFlash drafter (not a subclass of it).

    Markov head (low-rank bigram):  e_k = W1[prev_k]                    W1 = Embedding(V, r)
                                    z_k = lm_head(h_k) + W2·e_k          W2 = Linear(r, V, no bias)
    Confidence head:                u_k = w_c·[h_k ; e_k] + b_c          Linear(d + r, 1), with bias

``prev_k`` is the token *before* slot k's label: in the next-token convention slot k predicts ``x[a+k+1]``, so
``prev_k = x[a+k]`` — the token at the slot's own position. Training teacher-forces it
(:func:`teacher_forced_prev`); inference feeds back each drafted token (``dflashtrain.dspark_drafting``).
The confidence head shares W1 and reads h undetached, so its loss also trains the backbone and W1.

Parameter names: a training checkpoint holds them under ``heads.`` (``heads.markov.embed.weight`` [V, r],
``heads.markov.proj.weight`` [V, r], ``heads.confidence.weight`` [1, d + r], ``heads.confidence.bias`` [1]);
an export renames them to ``markov_head.*`` / ``confidence_head.*`` (:func:`export_tensors`) and adds the
``dspark_config`` fields of :func:`export_config` to config.json; ``modeling_dspark.py`` (shipped with it) loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from dflashtrain.data.blocks import DraftBlocks


class MarkovHead(nn.Module):
    """Low-rank bigram bias W2·W1[prev].

    W1 starts as a standard embedding (N(0, 1), the scale of the post-norm h it is concatenated with in the
    confidence head); W2 starts at zero, so a fresh head leaves the logits unchanged and learns at a useful rate.
    """

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, rank)  # W1
        self.proj = nn.Linear(rank, vocab_size, bias=False)  # W2
        nn.init.normal_(self.embed.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.proj.weight)

    def forward(self, prev: Tensor) -> Tuple[Tensor, Tensor]:
        """prev [...] long -> (bias [..., V], e = W1[prev] [..., r])."""
        e = self.embed(prev)
        return self.proj(e), e


class DSparkHeads(nn.Module):
    """The Markov head and (optionally) the confidence head, applied to drafter hidden states."""

    def __init__(self, vocab_size: int, hidden_size: int, markov_rank: int, confidence: bool):
        super().__init__()
        if markov_rank <= 0:
            raise ValueError(f"DSpark heads need markov_rank > 0 (the confidence head reads W1), got {markov_rank}")
        self.markov = MarkovHead(vocab_size, markov_rank)
        self.confidence: Optional[nn.Linear] = nn.Linear(hidden_size + markov_rank, 1) if confidence else None
        if self.confidence is not None:
            nn.init.normal_(self.confidence.weight, mean=0.0, std=0.02)
            nn.init.zeros_(self.confidence.bias)

    @property
    def markov_rank(self) -> int:
        return self.markov.embed.embedding_dim

    def forward(self, hidden: Tensor, prev: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """hidden [..., d], prev [...] long -> (Markov bias [..., V], confidence logits u [...] or None)."""
        bias, e = self.markov(prev)
        if self.confidence is None:
            return bias, None
        features = torch.cat([hidden, e.to(hidden.dtype)], dim=-1)  # [..., d + r]
        return bias, self.confidence(features.to(self.confidence.weight.dtype)).squeeze(-1)


def slot_logits(hidden: Tensor, prev: Tensor, lm_head: nn.Module, heads: Optional[DSparkHeads]
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """z = lm_head(h) + W2·W1[prev] and u (the one definition training and drafting share).

    hidden [..., d], prev [...] -> (logits [..., V], confidence logits [...] or None).
    """
    logits = lm_head(hidden)
    if heads is None:
        return logits, None
    bias, confidence = heads(hidden, prev)
    return logits + bias.to(logits.dtype), confidence


def teacher_forced_prev(blocks: DraftBlocks) -> Tensor:
    """prev = [x_a, x_{a+1}, …, x_{a+B−1}]: the data token at each slot's position id. [b, c, B] long.

    Needs the next-token convention (label_pos = a + k + 1), where the label of slot k − 1 is x[a + k]; slot 0
    reads the anchor token from the block input. Out-of-range positions hold label id 0: those slots are
    invalid (their own label is out of range too), so any id is fine there.
    """
    anchor = blocks.input_ids[..., :1]  # [b, c, 1]: x_a (MASK in a dummy block, which is never supervised)
    return torch.cat([anchor, blocks.label_ids[..., :-1]], dim=-1)


EXPORT_NAMES = {"markov.": "markov_head.", "confidence.": "confidence_head."}  # module name -> exported name
MODELING_FILE = Path(__file__).with_name("modeling_dspark.py")  # self-contained loader shipped with an export
EXPORT_ARCHITECTURE = "DSparkDraftModel"  # the class in MODELING_FILE


def export_config(markov_rank: int, confidence_head: bool) -> Dict[str, Any]:
    """The config.json fields an exported DSpark drafter adds to DFlash's (read by modeling_dspark.py)."""
    return {
        "architectures": [EXPORT_ARCHITECTURE],
        "dspark_config": {
            "markov_rank": markov_rank,
            "confidence_head": confidence_head,
            "label_offset": 1,  # next-token convention: all B slots draft (x[a+k+1]); a round verifies B + 1
        },
    }


def _renamed(tensors: Dict[str, Tensor], prefixes: Dict[str, str]) -> Dict[str, Tensor]:
    """The tensors whose name starts with a key of ``prefixes``, that prefix replaced by its value; others dropped."""
    out = {}
    for name, tensor in tensors.items():
        old = next((p for p in prefixes if name.startswith(p)), None)
        if old is not None:
            out[prefixes[old] + name[len(old):]] = tensor
    return out


def export_tensors(heads: DSparkHeads) -> Dict[str, Tensor]:
    """Head weights under their export names: markov_head.{embed,proj}.weight, confidence_head.{weight,bias}."""
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


def check_exported_heads(tensors: Dict[str, Tensor], config: Dict[str, Any], heads: Optional[DSparkHeads],
                         markov_rank: int, confidence_head: bool) -> List[str]:
    """Load-back problems of an export's DSpark part: its config fields, and head tensors read back bit-identical."""
    expected_config = export_config(markov_rank, confidence_head)
    problems = [f"{key} is {config.get(key)!r}, checkpoint has {value!r}"
                for key, value in expected_config.items() if config.get(key) != value]
    if heads is not None and not problems:
        expected = export_tensors(heads)
        loaded = export_tensors(heads_from_export(tensors, config))
        changed = [name for name, tensor in expected.items() if not torch.equal(loaded[name], tensor)]
        if changed:
            problems.append(f"head tensors differ after the round trip: {changed}")
    return problems


def heads_from_checkpoint(checkpoint: Dict[str, Any]) -> Optional[DSparkHeads]:
    """Rebuild the heads of a training checkpoint (a ``torch.load``-ed .ckpt); None when it has none."""
    rank = checkpoint["dflashtrain"].get("heads", {}).get("markov_rank", 0)
    if not rank:
        return None
    state = _renamed(checkpoint["state_dict"], {"heads.": ""})
    vocab_size = state["markov.embed.weight"].shape[0]
    hidden_size = checkpoint["dflashtrain"]["geometry"]["hidden_size"]
    heads = DSparkHeads(vocab_size, hidden_size, rank, confidence="confidence.weight" in state)
    heads.load_state_dict(state)
    return heads
