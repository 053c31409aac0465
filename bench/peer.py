"""SpecForge's own DFlash training step (specforge 0.2.0, installed by bench/env.sh) at a bench geometry.

The step is SpecForge's OnlineDFlashModel.forward (anchors, noise embedding, its dense-SDPA or flex mask, its
DFlashDraftModel, checkpointed chunked lm_head + loss), backward, and SpecForge's BF16Optimizer (global grad norm,
clipping, AdamW over fp32 master copies). The drafter starts from dflashtrain's weights (same parameter names). At
a bf16 point it trains as SpecForge does: bf16 weights and target states (dflashtrain: fp32 weights, bf16 autocast).
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict, Optional

import torch

from geometry import Geometry, Inputs
from dflashtrain.config.losses import default_gamma


def available() -> Optional[str]:
    """None if SpecForge's DFlash modules import, else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import specforge.algorithms.common.dflash_family_model  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means: no peer in this environment
        return f"{type(error).__name__}: {error}"
    return None


class PeerStep:
    def __init__(self, g: Geometry, inputs: Inputs, drafter_state: Dict[str, torch.Tensor], loss_type: str = "dflash",
                 seed: int = 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from specforge.algorithms.common.dflash_family_model import OnlineDFlashModel
            from specforge.modeling.draft.dflash import DFlashDraftModel
            from specforge.optimizer import BF16Optimizer
            from transformers import Qwen3Config

        torch.manual_seed(seed)
        self.g, self.inputs = g, inputs
        config = Qwen3Config(
            hidden_size=g.hidden, intermediate_size=g.intermediate, num_hidden_layers=g.layers,
            num_attention_heads=g.heads, num_key_value_heads=g.kv_heads, head_dim=g.head_dim, vocab_size=g.vocab,
            rms_norm_eps=1e-6, max_position_embeddings=g.seq_len + 2 * g.block, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": g.rope_theta}, attention_bias=False,
        )
        config.block_size = g.block
        config.num_target_layers = max(inputs.target_layer_ids) + 4
        config.dflash_config = {"target_layer_ids": inputs.target_layer_ids, "mask_token_id": inputs.mask_token_id}
        config._attn_implementation = "flex_attention" if g.attention == "flex" else "sdpa"
        draft = DFlashDraftModel(config)
        missing, unexpected = draft.load_state_dict(drafter_state, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise RuntimeError(f"peer weights do not match: missing {missing}, unexpected {unexpected}")
        device = inputs.input_ids.device
        lm_head, embed, self.tapped = inputs.lm_head, inputs.embed, inputs.tapped
        if g.bf16:  # SpecForge's own bf16 training: bf16 weights and target states, fp32 masters in BF16Optimizer
            draft = draft.to(torch.bfloat16)
            lm_head, embed = (copy.deepcopy(m).to(torch.bfloat16) for m in (lm_head, embed))
            self.tapped = inputs.tapped.to(torch.bfloat16)
        self.model = OnlineDFlashModel(
            draft_model=draft.to(device), target_lm_head=lm_head, target_embed_tokens=embed,
            mask_token_id=inputs.mask_token_id, block_size=g.block,
            attention_backend="flex_attention" if g.attention == "flex" else "sdpa", num_anchors=g.anchors,
            loss_decay_gamma=default_gamma(g.block), objective_chunk_blocks=g.chunk, loss_type=loss_type,
        )
        self.optimizer = BF16Optimizer(draft, lr=6e-4, max_grad_norm=1.0, total_steps=1000, warmup_ratio=0.04)

    def __call__(self) -> torch.Tensor:
        loss, _, _ = self.model(self.inputs.input_ids, self.tapped, self.inputs.loss_mask)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def loss_with_anchors(self, anchors: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """SpecForge's loss for given anchors (its sampler replaced once), for the agreement check."""
        original = self.model._sample_anchor_positions
        self.model._sample_anchor_positions = lambda seq_len, loss_mask, device: (anchors, keep)
        try:
            with torch.no_grad():
                loss, _, _ = self.model(self.inputs.input_ids, self.tapped, self.inputs.loss_mask)
        finally:
            self.model._sample_anchor_positions = original
        return loss
