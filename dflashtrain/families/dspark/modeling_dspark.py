"""modeling_dspark.py — a DSpark drafter exported by dflashtrain, loadable with torch and safetensors only.

This file is copied verbatim into an exported DSpark directory (it imports nothing from dflashtrain) so a user
or a serving integration can load the drafter without the trainer:

    model = Qwen3DSparkModel.from_pretrained("/path/to/export")          # config.json + model.safetensors
    embeds = target.get_input_embeddings()(block_ids)                    # block_ids = [anchor, MASK, …] [b, B]
    hidden = model(embeds, tapped, start)                                # tapped: target features of 0..start−1
    tokens, probs, confidences = model.draft(hidden[0], anchor, target.get_output_embeddings(), temperature=0.0)

The backbone is DFlash (config "dflash_config"): c = hidden_norm(fc(concat of tapped target layer outputs));
each Qwen3-style layer attends from the block to [K(c) ; K(block)] (KV injection, q/k RMSNorm, RoPE at absolute
positions, SwiGLU); the block [anchor, MASK, …] sits at positions start .. start+B−1 and sees every context
position before the anchor. DSpark (config "markov_rank", "enable_confidence_head") uses the next-token convention
— slot k proposes the token at position start+k+1 — and drafts left to right through a low-rank Markov head:

    z_k = lm_head(h_k) + W2·W1[prev_k],  prev_0 = anchor, prev_{k+1} = t_k       (markov_head.markov_w1 / _w2)
    c_k = σ(w·[h_k ; W1[prev_k]] + b)                                            (confidence_head.proj)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """x [b, heads, P, hd], positions [P] -> x rotated at those absolute positions (fp32 math)."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # [P, hd/2]
    angles = torch.cat((angles, angles), dim=-1)
    return (x.float() * angles.cos() + _rotate_half(x.float()) * angles.sin()).to(x.dtype)


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, hd = c["hidden_size"], c["head_dim"]
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], hd
        self.input_layernorm = nn.RMSNorm(d, eps=c["rms_norm_eps"])
        self.post_attention_layernorm = nn.RMSNorm(d, eps=c["rms_norm_eps"])
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.self_attn.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.self_attn.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.self_attn.o_proj = nn.Linear(self.heads * hd, d, bias=False)
        self.self_attn.q_norm = nn.RMSNorm(hd, eps=c["rms_norm_eps"])
        self.self_attn.k_norm = nn.RMSNorm(hd, eps=c["rms_norm_eps"])
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, c["intermediate_size"], bias=False)
        self.mlp.up_proj = nn.Linear(d, c["intermediate_size"], bias=False)
        self.mlp.down_proj = nn.Linear(c["intermediate_size"], d, bias=False)

    def _split(self, x: Tensor, heads: int) -> Tensor:
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)  # [b, heads, P, hd]

    def forward(self, x: Tensor, context: Tensor, positions: Tensor, inv_freq: Tensor,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        """x [b, B, d] block, context [b, T, d] (positions 0..T−1 < anchor), positions [T + B], attn_mask [B, T + B]
        bool (a sliding window) or None (every context key)."""
        a, h = self.self_attn, self.input_layernorm(x)
        block_len = x.shape[1]
        q = _rope(a.q_norm(self._split(a.q_proj(h), self.heads)), positions[-block_len:], inv_freq)
        keys_in = torch.cat([context, h], dim=1)  # KV injection: [c ; block]
        k = _rope(a.k_norm(self._split(a.k_proj(keys_in), self.kv_heads)), positions, inv_freq)
        v = self._split(a.v_proj(keys_in), self.kv_heads)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # block bidirectional
        x = x + a.o_proj(out.transpose(1, 2).reshape(x.shape[0], block_len, -1))
        m, h = self.mlp, self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


class Qwen3DSparkModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c, self.config = config, config
        d, taps = c["hidden_size"], len(c["dflash_config"]["target_layer_ids"])
        rank = c["markov_rank"]
        self.block_size, self.mask_token_id = c["block_size"], c["dflash_config"]["mask_token_id"]
        self.fc = nn.Linear(taps * d, d, bias=False)
        self.hidden_norm = nn.RMSNorm(d, eps=c["rms_norm_eps"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = nn.RMSNorm(d, eps=c["rms_norm_eps"])
        self.markov_head = nn.Module()
        self.markov_head.markov_w1 = nn.Embedding(c["vocab_size"], rank)  # W1
        self.markov_head.markov_w2 = nn.Linear(rank, c["vocab_size"], bias=False)  # W2
        self.confidence_head = None
        if c.get("enable_confidence_head"):
            self.confidence_head = nn.Module()
            self.confidence_head.proj = nn.Linear(d + rank, 1)
        theta = c.get("rope_theta") or c["rope_parameters"]["rope_theta"]
        hd = c["head_dim"]
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd)), persistent=False)

    @classmethod
    def from_pretrained(cls, directory: str, dtype: Optional[torch.dtype] = None) -> "Qwen3DSparkModel":
        config = json.loads(Path(directory, "config.json").read_text())
        state = load_file(str(Path(directory, "model.safetensors")))
        model = cls(config).to(dtype or next(iter(state.values())).dtype)
        model.load_state_dict(state, strict=True)
        return model.eval()

    @torch.no_grad()
    def forward(self, block_embeds: Tensor, tapped_states: Tensor, start: int) -> Tensor:
        """block_embeds [b, B, d] of [anchor, MASK, …] at positions start..start+B−1; tapped_states [b, start, n·d]
        (the target's tapped layer outputs of positions 0..start−1) -> final hidden h [b, B, d]."""
        context = self.hidden_norm(self.fc(tapped_states.to(self.fc.weight.dtype)))  # [b, T, d]
        positions = torch.cat([torch.arange(context.shape[1]), torch.arange(start, start + block_embeds.shape[1])])
        positions = positions.to(block_embeds.device)  # [T + B]: context 0..T−1, block start..start+B−1
        mask = None
        if "sliding_attention" in (self.config.get("layer_types") or []):  # context t iff (start + k) − t < W
            block_positions = positions[-block_embeds.shape[1]:, None]
            mask = (positions[None, :] >= start) | (block_positions - positions[None, :] < self.config["sliding_window"])
        x = block_embeds.to(self.fc.weight.dtype)
        for layer in self.layers:
            x = layer(x, context, positions, self.inv_freq, mask)
        return self.norm(x)

    @torch.no_grad()
    def draft(self, hidden: Tensor, anchor: int, lm_head: nn.Module, temperature: float = 0.0,
              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """hidden [B, d] of one block -> (tokens [B], q [B, V] (one-hot when greedy), confidences [B] or None)."""
        prev = torch.tensor(anchor, device=hidden.device)
        tokens, probs, confidences = [], [], []
        for k in range(hidden.shape[0]):
            e = self.markov_head.markov_w1(prev)  # W1[prev] [r]
            logits = (lm_head(hidden[k].to(lm_head.weight.dtype)).float()
                      + self.markov_head.markov_w2(e).float())  # z_k [V]
            if self.confidence_head is not None:
                proj = self.confidence_head.proj
                features = torch.cat([hidden[k], e.to(hidden.dtype)]).to(proj.weight.dtype)
                confidences.append(torch.sigmoid(proj(features).float())[0])
            if temperature == 0:
                token = logits.argmax()
                q = F.one_hot(token, logits.shape[-1]).float()
            else:
                q = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(q, 1, generator=generator)[0]
            tokens.append(token)
            probs.append(q)
            prev = token
        return torch.stack(tokens), torch.stack(probs), torch.stack(confidences) if confidences else None
