"""The geometries bench/step.py measures, the shared inputs both trainers see, and the FLOP count of a step."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Geometry:
    """One drafter training step: drafter shapes, the target's vocabulary, the batch, anchors and chunking."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    seq_len: int  # S
    anchors: int  # N per sequence
    block: int  # B
    chunk: int  # blocks per lm_head + loss chunk
    taps: int = 5  # tapped target layers (fc: taps·hidden -> hidden)
    batch: int = 1
    bf16: bool = False  # autocast bf16 (fp32 weights), else fp32
    attention: str = "sdpa"  # sdpa (dense mask) | flex (BlockMask)
    markov_rank: int = 32  # DSpark heads
    rope_theta: float = 1e6

    def with_(self, **changes) -> "Geometry":
        return replace(self, **changes)

    def describe(self) -> str:
        return (f"hidden {self.hidden}, {self.heads}/{self.kv_heads} heads × {self.head_dim}, intermediate "
                f"{self.intermediate}, {self.layers} layers, vocab {self.vocab}, b {self.batch}, S {self.seq_len}, "
                f"{self.anchors} anchors, B {self.block}, chunk {self.chunk}, {self.taps} taps, "
                f"{'bf16 autocast' if self.bf16 else 'fp32'}, {self.attention}")


# The CPU geometry of issue 19 (hidden 512, 2 layers, S 1024, 64 anchors, B 16, lm_head chunk 32); the heads,
# intermediate size and taps are Qwen3-8B's ratios scaled down.
CPU = Geometry(hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536, layers=2, vocab=8192, seq_len=1024,
               anchors=64, block=16, chunk=32)
# The default job (`make run`): the embedded tiny target's geometry and conf/model/tiny.yaml, conf/data/tiny_chat.yaml.
TINY = Geometry(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=384, layers=2, vocab=384, seq_len=128,
                anchors=32, block=8, chunk=8, taps=3, batch=8, rope_theta=1e4)
# The Qwen3-8B drafter (recipes/dflash_qwen3_8b.yaml), random weights; GPU only.
QWEN3_8B = Geometry(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288, layers=5, vocab=151936,
                    seq_len=3072, anchors=512, block=16, chunk=32, bf16=True, attention="flex", markov_rank=256)


def step_flops(g: Geometry) -> float:
    """Matmul FLOPs of one step (forward + backward + nothing for the frozen head's weight), issue 19's formula.

    Tq = N·B, Tkv = S + Tq; per layer forward 2·(2·Tq·H·q_out) + 2·(2·Tkv·H·kv_out) + 3·(2·Tq·H·I) +
    4·Tq·(S + B)·hd·heads, ×3 for forward + backward; fc 2·(2·S·n·H·H); lm_head 2·(2·N·(B − 1)·H·V). Per sequence,
    times the batch. 74.56 TFLOP at the Qwen3-8B point.
    """
    tq, tkv, h = g.anchors * g.block, g.seq_len + g.anchors * g.block, g.hidden
    q_out, kv_out = g.heads * g.head_dim, g.kv_heads * g.head_dim
    layer = (2 * (2 * tq * h * q_out) + 2 * (2 * tkv * h * kv_out) + 3 * (2 * tq * h * g.intermediate)
             + 4 * tq * (g.seq_len + g.block) * g.head_dim * g.heads)
    fc = 2 * (2 * g.seq_len * g.taps * h * h)
    head = 2 * (2 * g.anchors * (g.block - 1) * h * g.vocab)
    return float(g.batch * (3 * g.layers * layer + fc + head))


@dataclass
class Inputs:
    """What both trainers get: token ids and loss mask, precomputed target states, the frozen embedding and head."""

    input_ids: Tensor  # [b, S]
    loss_mask: Tensor  # [b, S] long: the first eighth of each row is the (unsupervised) prompt
    tapped: Tensor  # [b, S, taps·d] concatenated target layer outputs
    final_hidden: Tensor  # [b, S, d] the target's last (post-norm) hidden state, for DSpark's teacher
    embed: nn.Embedding  # frozen
    lm_head: nn.Linear  # frozen
    mask_token_id: int
    target_layer_ids: list

    def batch(self) -> Dict[str, object]:
        """The batch dict DraftModule's step reads."""
        b, s = self.input_ids.shape
        return {"input_ids": self.input_ids, "loss_mask": self.loss_mask,
                "attention_mask": torch.ones_like(self.input_ids), "row_keys": list(range(b)),
                "sample_ids": torch.arange(1, b + 1)}


def make_inputs(g: Geometry, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    b, s, d = g.batch, g.seq_len, g.hidden
    mask_id = g.vocab - 1
    input_ids = torch.randint(0, mask_id, (b, s), generator=gen)
    loss_mask = torch.ones(b, s, dtype=torch.long)
    loss_mask[:, : s // 8] = 0
    embed = nn.Embedding(g.vocab, d)
    lm_head = nn.Linear(d, g.vocab, bias=False)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(g.vocab, d, generator=gen))
        lm_head.weight.copy_(torch.randn(g.vocab, d, generator=gen) / d ** 0.5)
    return Inputs(
        input_ids=input_ids.to(device), loss_mask=loss_mask.to(device),
        tapped=torch.randn(b, s, g.taps * d, generator=gen).to(device),
        final_hidden=torch.randn(b, s, d, generator=gen).to(device),
        embed=embed.requires_grad_(False).to(device), lm_head=lm_head.requires_grad_(False).to(device),
        mask_token_id=mask_id, target_layer_ids=list(range(1, 1 + 4 * g.taps, 4)),
    )
