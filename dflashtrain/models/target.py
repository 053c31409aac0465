"""The frozen target: loading, tapped hidden states, and the drafter geometry derived from it.

The target is deliberately *not* a registered submodule of the LightningModule: it stays out of the optimizer,
out of every checkpoint and out of FSDP units by construction (docs/fsdp.md), and is moved to the device
by the module itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dflashtrain.config.errors import ConfigError
from dflashtrain.models.dflash import DrafterGeometry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # DType names


def default_layer_ids(num_target_layers: int, num_taps: int) -> List[int]:
    """The tap formula (docs/architecture.md): n = 1 -> [L // 2]; else round(1 + i·(L − 4)/(n − 1)). Qwen3-8B (36, 5) -> [1, 9, 17, 25, 33]."""
    if num_taps == 1:
        return [num_target_layers // 2]
    return [round(1 + i * (num_target_layers - 4) / (num_taps - 1)) for i in range(num_taps)]


def resolve_mask_token_id(explicit: Optional[int], tokenizer, vocab_size: int) -> int:
    """Explicit value, else the tokenizer's mask token, else the first unused embedding row; never pad/eos."""
    if explicit is not None:
        mask_id, key = explicit, "model.drafter.mask_token_id"
    elif getattr(tokenizer, "mask_token_id", None) is not None:
        mask_id, key = tokenizer.mask_token_id, "tokenizer.mask_token"
    elif len(tokenizer) < vocab_size:
        mask_id, key = len(tokenizer), "model.drafter.mask_token_id (first unused embedding row)"
    else:
        raise ConfigError(
            "model.drafter.mask_token_id",
            f"cannot be resolved: the tokenizer has no mask token and all {vocab_size} embedding rows are used; set it",
        )
    if not 0 <= mask_id < vocab_size:
        raise ConfigError(key, f"{mask_id} is not a row of the target embedding [0, {vocab_size - 1}]")
    return int(mask_id)


def load_target_config(path: str):
    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def drafter_geometry(target_config, drafter_cfg, mask_token_id: int) -> DrafterGeometry:
    """Drafter shapes: hidden size, heads and RoPE from the target; depth, block and taps from the config."""
    layer_ids = list(drafter_cfg.target_layer_ids or default_layer_ids(target_config.num_hidden_layers, drafter_cfg.num_taps))
    head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // target_config.num_attention_heads
    rope_theta = getattr(target_config, "rope_theta", None)
    if rope_theta is None:  # transformers >= 5 keeps it under rope_parameters
        rope_theta = (getattr(target_config, "rope_parameters", None) or {}).get("rope_theta")
    if rope_theta is None:  # a guess would silently train a drafter at the wrong positions
        raise ConfigError("model.target.path", "the target's config.json gives no rope_theta (nor rope_parameters."
                                               "rope_theta): the drafter's RoPE must equal the target's")
    return DrafterGeometry(
        hidden_size=target_config.hidden_size,
        intermediate_size=drafter_cfg.intermediate_size or target_config.intermediate_size,
        num_layers=drafter_cfg.num_layers,
        num_attention_heads=target_config.num_attention_heads,
        num_key_value_heads=target_config.num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=target_config.rms_norm_eps,
        rope_theta=float(rope_theta),
        target_layer_ids=layer_ids,
        block_size=drafter_cfg.block_size,
        mask_token_id=mask_token_id,
        sliding_window=drafter_cfg.sliding_window,
    )


def head_logits(hidden: Tensor, lm_head: nn.Module) -> Tensor:
    """lm_head over the flattened rows: hidden [..., d] -> [..., V].

    A slice [b, c, B, d] of the [b, N, B, d] states is not one matrix to ATen, which would run a batched matmul of
    b·c tiny B-row matrices; one [b·c·B, d] matmul gives the same numbers at full speed.
    """
    return lm_head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)


@dataclass
class TargetStates:
    tapped: Tensor  # [b, S, n·d] outputs of the tapped layers, concatenated (raw residual stream)
    final_hidden: Tensor  # [b, S, d] post-norm last hidden state (for KD / DSpark teacher logits)


class FrozenTarget:
    """A frozen causal LM used for its tapped states, its embedding and its LM head."""

    def __init__(self, model: PreTrainedModel, layer_ids: List[int]):
        self.model = model.eval().requires_grad_(False)
        self.layer_ids = list(layer_ids)

    @classmethod
    def load(cls, path: str, dtype: str, layer_ids: List[int]) -> "FrozenTarget":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                     local_files_only=True)
        return cls(model, layer_ids)

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def to(self, device) -> "FrozenTarget":
        self.model.to(device)
        return self

    def batch_states(self, batch) -> TargetStates:
        """The states of a batch of rows: one forward over its input_ids (a feature cache reads them instead)."""
        return self.states(batch["input_ids"], batch["attention_mask"])

    @torch.no_grad()
    def states(self, input_ids: Tensor, attention_mask: Tensor) -> TargetStates:
        """One forward of the backbone (no LM head: the V-sized logits are never materialized here).

        Batches are right-padded (data/datamodule.py), so under causal attention no real position sees a pad and
        ``attention_mask`` changes nothing the drafter reads; it is not passed, which spares transformers a host
        read of the mask (a GPU synchronisation) and the materialized [S, S] mask. Pad positions are never
        context nor label positions (their loss_mask is 0)."""
        del attention_mask
        out = self.model.model(input_ids=input_ids, output_hidden_states=True)
        # hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1].
        tapped = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)
        return TargetStates(tapped=tapped, final_hidden=out.last_hidden_state)
