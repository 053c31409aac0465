"""The DFlash drafter (docs/architecture.md, drafter): a few non-causal Qwen3-style layers conditioned on tapped target states.

    c_t   = hidden_norm(fc(concat(H_l1,t, ..., H_ln,t)))          context features, shared by every layer
    layer : x <- x + o_proj(attn(q(x), [K(c); K(x)], [V(c); V(x)]))   (KV injection, q/k RMSNorm, RoPE)
            x <- x + down(silu(gate(x)) * up(x))                    (pre-norm, SwiGLU)
    h     = norm(x)                                                  -> frozen target lm_head

The drafter owns no embedding and no LM head: block tokens are embedded, and logits taken, by the frozen target.
Parameter names are the ones serving engines load (``fc.weight``, ``layers.{i}.self_attn.q_proj.weight``, ...).
A drafting family may build the drafter with its own decoder layer (``make_layer``; DFlash2 wraps every sublayer
in dynamic convolutions) around the same attention, MLP, context features and caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dflashtrain.models.masks import AnchorAttentionMask, attend, dense_visibility


@dataclass(frozen=True)
class DrafterGeometry:
    """Shapes of a drafter; hidden size, heads and RoPE come from the target's config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    target_layer_ids: List[int]
    block_size: int
    mask_token_id: int
    sliding_window: Optional[int] = None  # W (HF semantics, >= block_size) or None: every earlier context position


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Absolute RoPE: cos/sin for integer positions, computed in fp32."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [b, P] -> cos, sin [b, 1, P, head_dim]."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [b, P, hd/2]
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [b, 1, P, hd]
        return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x·cos + rotate_half(x)·sin in x's dtype (cos/sin are computed in fp32, then cast): fp32 is computed as
    before bit for bit, and bf16 q/k are no longer copied to fp32 and back (as the serving engines do it)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class DFlashAttention(nn.Module):
    def __init__(self, g: DrafterGeometry):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = g.num_attention_heads, g.num_key_value_heads, g.head_dim
        self.q_proj = nn.Linear(g.hidden_size, g.num_attention_heads * g.head_dim, bias=False)
        self.k_proj = nn.Linear(g.hidden_size, g.num_key_value_heads * g.head_dim, bias=False)
        self.v_proj = nn.Linear(g.hidden_size, g.num_key_value_heads * g.head_dim, bias=False)
        self.o_proj = nn.Linear(g.num_attention_heads * g.head_dim, g.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(g.head_dim, eps=g.rms_norm_eps)
        self.k_norm = nn.RMSNorm(g.head_dim, eps=g.rms_norm_eps)

    def _heads(self, x: Tensor, num_heads: int) -> Tensor:
        return x.view(x.shape[0], x.shape[1], num_heads, self.head_dim).transpose(1, 2)  # [b, heads, P, hd]

    def forward(self, x: Tensor, context: Tensor, rope_q: tuple, rope_k: tuple, mask: AnchorAttentionMask) -> Tensor:
        """x [b, Q, d] block slots, context [b, S, d] -> [b, Q, d]."""
        query = self.q_norm(self._heads(self.q_proj(x), self.num_heads))  # [b, H, Q, hd]
        keys_in = torch.cat([context, x], dim=1)  # [b, S + Q, d]: the KV injection
        key = self.k_norm(self._heads(self.k_proj(keys_in), self.num_kv_heads))  # [b, Hkv, S + Q, hd]
        value = self._heads(self.v_proj(keys_in), self.num_kv_heads)
        query, key = apply_rope(query, *rope_q), apply_rope(key, *rope_k)
        out = attend(query, key, value, mask)  # [b, H, Q, hd]
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def context_kv(self, context: Tensor, rope: tuple) -> tuple[Tensor, Tensor]:
        """Inference: keys/values of context features, ready to cache. context [b, T, d] -> 2 × [b, Hkv, T, hd]."""
        key = apply_rope(self.k_norm(self._heads(self.k_proj(context), self.num_kv_heads)), *rope)
        return key, self._heads(self.v_proj(context), self.num_kv_heads)

    def forward_cached(self, x: Tensor, context_key: Tensor, context_value: Tensor, rope_q: tuple,
                       window_mask: Optional[Tensor] = None) -> Tensor:
        """Inference for one block: x [b, B, d] attends to the cached context keys given and to its whole block.

        The same KV injection as :meth:`forward`, with the context K/V precomputed: keys [K(c) ; K(x)]. The cache
        holds exactly the positions before the anchor, so without a sliding window no mask is needed (the rule
        t < a holds by construction); with one, ``window_mask`` [B, T + B] bool is the same rule as training's.
        """
        query = apply_rope(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), *rope_q)  # [b, H, B, hd]
        block_key, block_value = self.context_kv(x, rope_q)  # the block's own keys, same RoPE positions as q
        key = torch.cat([context_key, block_key], dim=2)  # [b, Hkv, T + B, hd]
        value = torch.cat([context_value, block_value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=window_mask,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class DFlashMLP(nn.Module):
    def __init__(self, g: DrafterGeometry):
        super().__init__()
        self.gate_proj = nn.Linear(g.hidden_size, g.intermediate_size, bias=False)
        self.up_proj = nn.Linear(g.hidden_size, g.intermediate_size, bias=False)
        self.down_proj = nn.Linear(g.intermediate_size, g.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    """Its own class (not Qwen3DecoderLayer) so an FSDP wrap policy by class never wraps target layers."""

    def __init__(self, g: DrafterGeometry):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(g.hidden_size, eps=g.rms_norm_eps)
        self.self_attn = DFlashAttention(g)
        self.post_attention_layernorm = nn.RMSNorm(g.hidden_size, eps=g.rms_norm_eps)
        self.mlp = DFlashMLP(g)

    def forward(self, x: Tensor, context: Tensor, rope_q: tuple, rope_k: tuple, mask: AnchorAttentionMask) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), context, rope_q, rope_k, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x: Tensor, context_key: Tensor, context_value: Tensor, rope_q: tuple,
                       window_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), context_key, context_value, rope_q,
                                              window_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    """``make_layer(geometry)`` builds each decoder layer: :class:`DFlashDecoderLayer`, or a family's own with the
    same ``forward``/``forward_cached`` signatures and a ``self_attn`` of :class:`DFlashAttention`."""

    def __init__(self, geometry: DrafterGeometry,
                 make_layer: Callable[[DrafterGeometry], nn.Module] = DFlashDecoderLayer):
        super().__init__()
        g = self.geometry = geometry
        self.fc = nn.Linear(len(g.target_layer_ids) * g.hidden_size, g.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(g.hidden_size, eps=g.rms_norm_eps)
        self.layers = nn.ModuleList(make_layer(g) for _ in range(g.num_layers))
        self.norm = nn.RMSNorm(g.hidden_size, eps=g.rms_norm_eps)
        self.rotary = RotaryEmbedding(g.head_dim, g.rope_theta)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def context_features(self, tapped_states: Tensor) -> Tensor:
        """tapped_states [b, S, n·d] (concatenated target layer outputs) -> c [b, S, d]."""
        return self.hidden_norm(self.fc(tapped_states.to(self.fc.weight.dtype)))

    def forward(
        self,
        block_embeds: Tensor,
        tapped_states: Tensor,
        block_positions: Tensor,
        mask: AnchorAttentionMask,
    ) -> Tensor:
        """block_embeds [b, Q, d] (Q = N·B slots), tapped_states [b, S, n·d], block_positions [b, Q]
        -> final hidden h [b, Q, d] (after `norm`), ready for the target's lm_head."""
        context = self.context_features(tapped_states)  # [b, S, d]
        batch, seq_len = context.shape[:2]
        context_positions = torch.arange(seq_len, device=context.device).expand(batch, seq_len)
        rope_q = self.rotary(block_positions)
        rope_k = self.rotary(torch.cat([context_positions, block_positions], dim=1))
        x = block_embeds.to(self.fc.weight.dtype)
        for layer in self.layers:
            x = layer(x, context, rope_q, rope_k, mask)
        return self.norm(x)

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def extend_context(self, cache: "ContextCache", tapped_states: Tensor) -> None:
        """Append committed tokens to the drafter's context cache.

        tapped_states [b, T_new, n·d]: target features of the next T_new committed positions (cache.length ...).
        Per layer, K(c)/V(c) are computed once (k_proj, k_norm, RoPE at their absolute positions) and cached.
        """
        context = self.context_features(tapped_states)  # [b, T_new, d]
        batch, new = context.shape[:2]
        positions = torch.arange(cache.length, cache.length + new, device=context.device).expand(batch, new)
        rope = self.rotary(positions)
        for index, layer in enumerate(self.layers):
            cache.append(index, *layer.self_attn.context_kv(context, rope))
        cache.length += new

    @torch.no_grad()
    def draft_cached(self, block_embeds: Tensor, block_positions: Tensor, cache: "ContextCache") -> Tensor:
        """One block at inference: block_embeds [b, B, d] at block_positions [b, B] (anchor first), attending to
        every cached context position (all strictly before the anchor; with a sliding window W only those inside
        each slot's window) -> final hidden h [b, B, d].

        Equal to :meth:`forward` for one kept block whose anchor is ``cache.length``.
        """
        start = int(block_positions[0, 0])
        if cache.length == 0 or start != cache.length:
            raise ValueError(f"block at {start} needs the context before it; cache: {cache.length}")
        first, window_mask = 0, None
        window = self.geometry.sliding_window
        if window is not None:  # the training rule for one block at anchor `start`; older keys are never read
            first = max(0, start - window + 1)
            anchor = block_positions[:1, :1]
            visible = dense_visibility(anchor, torch.ones_like(anchor, dtype=torch.bool), start,
                                       block_embeds.shape[1], window)
            window_mask = visible[0, :, first:]  # [B, (start - first) + B]
        rope_q = self.rotary(block_positions)
        x = block_embeds.to(self.fc.weight.dtype)
        for index, layer in enumerate(self.layers):
            x = layer.forward_cached(x, cache.keys[index][:, :, first:], cache.values[index][:, :, first:], rope_q,
                                     window_mask)
        return self.norm(x)


def compile_layers(drafter: DFlashDrafter) -> DFlashDrafter:
    """``torch.compile`` every decoder layer in place (``model.drafter.compile``): parameter names, checkpoints and
    exports are unchanged. Shapes that change between batches (the padded length) are compiled dynamic after the
    first change."""
    for layer in drafter.layers:
        layer.compile()
    return drafter


class ContextCache:
    """The drafter's per-layer context K/V for committed tokens (positions 0 .. length−1), at inference.

    Only verified tokens' features are ever appended (the block's own K/V are never stored), so after a round the
    cache holds exactly the context strictly before the next anchor. :meth:`crop` rolls it back.
    """

    def __init__(self, num_layers: int):
        self.keys: List[Optional[Tensor]] = [None] * num_layers  # each [b, Hkv, length, hd]
        self.values: List[Optional[Tensor]] = [None] * num_layers
        self.length = 0

    def append(self, layer: int, key: Tensor, value: Tensor) -> None:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = key, value
        else:
            self.keys[layer] = torch.cat([self.keys[layer], key], dim=2)
            self.values[layer] = torch.cat([self.values[layer], value], dim=2)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a context cache of {self.length} positions to {length}")
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]
        self.length = length
