"""DFlash2's decoder layer (docs/dflash2.md, architecture): the DFlash layer with a grouped dynamic depthwise
convolution around each sublayer, over the block slots only.

    u = input_layernorm(x);            D = attention_conv.kernel_projection(u) -> [L, 2, T, n_g]
    x = x + Conv(attn(Conv(u; b[0], D[:, 0])); b[1], D[:, 1])      q and the block's own K/V come from Conv(u)
    u = post_attention_layernorm(x);   D = mlp_conv.kernel_projection(u)
    x = x + Conv(mlp(Conv(u; b[0], D[:, 0])); b[1], D[:, 1])

The context features (K/V of the target's states) are never convolved. The output-side kernel is predicted from the
sublayer's normalised input u, not from its output. Both sides start as the identity (b[:, 0] = 1, b[:, 1:] = 0,
kernel_projection = 0), so a fresh DFlash2 layer computes exactly what a DFlash layer with the same weights does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dflashtrain.models.dflash import DFlashAttention, DFlashMLP, DrafterGeometry
from dflashtrain.models.masks import AnchorAttentionMask


def dynamic_conv(z: Tensor, base: Tensor, delta: Tensor, block_size: int, group_size: int) -> Tensor:
    """Grouped dynamic depthwise causal convolution along the slots of each block.

        out[t, c] = Σ_{τ < T} 1[t mod B ≥ τ] · (base[τ, c] + delta[t, τ, ⌊c / G⌋]) · z[t − τ, c]

    z [b, L, H] with L = n·B (n blocks of B slots side by side), base [T, H], delta [b, L, T, H / G] (predicted at
    the output slot t) -> [b, L, H]. Slot 0 of every block reads zeros for τ ≥ 1: nothing crosses a block boundary.
    """
    batch, length, hidden = z.shape
    blocks = z.view(batch, length // block_size, block_size, hidden)  # [b, n, B, H]
    deltas = delta.view(batch, length // block_size, block_size, delta.shape[-2], delta.shape[-1])
    out = torch.zeros_like(blocks)
    for tau in range(base.shape[0]):
        shifted = F.pad(blocks[:, :, : block_size - tau], (0, 0, tau, 0))  # z[t − τ] inside the block, 0 before
        coefficient = base[tau] + deltas[..., tau, :].repeat_interleave(group_size, dim=-1)  # [b, n, B, H]
        out = out + coefficient * shifted
    return out.view(batch, length, hidden)


class DeltaProjection(nn.Module):
    """kernel_projection: u [..., H] -> the dynamic deltas [..., 2·T·n_g] (no bias), zero at initialisation.

    Not an nn.Linear, so the drafter's random re-initialisation of its linear layers never touches it."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, hidden_size))

    def forward(self, u: Tensor) -> Tensor:
        return F.linear(u, self.weight)


class DynamicConv(nn.Module):
    """One sublayer's pair of convolutions: ``base_kernel`` [2, T, H] (side 0 input, 1 output) and
    ``kernel_projection.weight`` [2·T·n_g, H], its output viewed as [2, T, n_g] (side-major, then tap, group)."""

    def __init__(self, hidden_size: int, kernel_size: int, group_size: int):
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"conv_group_size {group_size} does not divide the hidden size {hidden_size}")
        self.kernel_size, self.group_size = kernel_size, group_size
        self.num_groups = hidden_size // group_size
        self.base_kernel = nn.Parameter(torch.zeros(2, kernel_size, hidden_size))
        self.kernel_projection = DeltaProjection(hidden_size, 2 * kernel_size * self.num_groups)
        with torch.no_grad():
            self.base_kernel[:, 0] = 1.0  # identity: the current slot, unchanged

    def deltas(self, u: Tensor) -> Tensor:
        """u [b, L, H] -> [b, L, 2, T, n_g]."""
        return self.kernel_projection(u).view(*u.shape[:-1], 2, self.kernel_size, self.num_groups)

    def forward(self, z: Tensor, deltas: Tensor, side: int, block_size: int) -> Tensor:
        return dynamic_conv(z, self.base_kernel[side].to(z.dtype), deltas[..., side, :, :], block_size,
                            self.group_size)


class DFlash2DecoderLayer(nn.Module):
    """A DFlash decoder layer (the same attention, MLP and norms, same parameter names) with ``attention_conv`` and
    ``mlp_conv`` around its sublayers. ``forward`` takes n blocks of ``geometry.block_size`` slots side by side;
    ``forward_cached`` one block (its length is the block size)."""

    def __init__(self, g: DrafterGeometry, kernel_size: int, group_size: int):
        super().__init__()
        self.block_size = g.block_size
        self.input_layernorm = nn.RMSNorm(g.hidden_size, eps=g.rms_norm_eps)
        self.self_attn = DFlashAttention(g)
        self.post_attention_layernorm = nn.RMSNorm(g.hidden_size, eps=g.rms_norm_eps)
        self.mlp = DFlashMLP(g)
        self.attention_conv = DynamicConv(g.hidden_size, kernel_size, group_size)
        self.mlp_conv = DynamicConv(g.hidden_size, kernel_size, group_size)

    @staticmethod
    def _branch(conv: DynamicConv, sublayer: Callable[[Tensor], Tensor], u: Tensor, block_size: int) -> Tensor:
        deltas = conv.deltas(u)  # one projection of u gives both sides' kernels
        return conv(sublayer(conv(u, deltas, 0, block_size)), deltas, 1, block_size)

    def _forward(self, x: Tensor, attention: Callable[[Tensor], Tensor], block_size: int) -> Tensor:
        x = x + self._branch(self.attention_conv, attention, self.input_layernorm(x), block_size)
        return x + self._branch(self.mlp_conv, self.mlp, self.post_attention_layernorm(x), block_size)

    def forward(self, x: Tensor, context: Tensor, rope_q: tuple, rope_k: tuple, mask: AnchorAttentionMask) -> Tensor:
        return self._forward(x, lambda h: self.self_attn(h, context, rope_q, rope_k, mask), self.block_size)

    def forward_cached(self, x: Tensor, context_key: Tensor, context_value: Tensor, rope_q: tuple,
                       window_mask: Optional[Tensor] = None) -> Tensor:
        attention = lambda h: self.self_attn.forward_cached(h, context_key, context_value, rope_q,  # noqa: E731
                                                            window_mask)
        return self._forward(x, attention, x.shape[1])
