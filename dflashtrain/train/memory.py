"""Memory per rank of one training step, computed (not measured) from the parameter counts of the real modules and
the shapes of the tensors the step keeps (docs/fsdp.md, memory per rank). ``python -m dflashtrain.train.memory``
prints it for the Qwen3-8B recipe; the README's table is that output.

Notation: b sequences of length S per rank, N anchors, block size B, so q = b·N·B block slots, c = b·S context
positions and k = c + q keys per layer; d hidden, I the MLP width, Hq = heads·head_dim, Hk = kv_heads·head_dim, L
drafter layers, n taps, V vocabulary, W ranks, P the drafter's parameters (P_lin of them in linear layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

GIB = 2**30
FP32, BF16 = 4, 2


@dataclass(frozen=True)
class StepShapes:
    batch: int  # b, per rank and micro-batch
    seq_len: int  # S (data.max_length: the padded worst case)
    num_anchors: int  # N
    block_size: int  # B
    chunk_blocks: int  # model.drafter.logits_chunk_blocks
    hidden: int  # d
    intermediate: int  # I
    q_width: int  # Hq
    kv_width: int  # Hk
    layers: int  # L (drafter)
    taps: int  # n
    vocab: int  # V
    target_layers: int

    @property
    def slots(self) -> int:  # q
        return self.batch * self.num_anchors * self.block_size

    @property
    def context(self) -> int:  # c
        return self.batch * self.seq_len


def drafter_activation_bytes(s: StepShapes, mixed: bool) -> int:
    """What the drafter's forward keeps for its backward (the saved tensors, without parameters).

    Per layer, fp32:   q·(7d + 4I + 4Hq)·4 + k·(d + 4Hk)·4
    Per layer, mixed:  q·(4d·4 + 4d·2 + 4I·2 + Hq·(2·4 + 2·2)) + k·(2d·2 + Hk·(2·4 + 2·2))
    (under autocast the linear layers keep bf16 copies of their inputs, norms and RoPE keep fp32 tensors);
    once: the fc input c·n·d (bf16 under autocast), the context c·2d·4 and the final norm's input q·d·4.
    The counts are those of the CPU op set; tests/test_memory.py checks them against the saved tensors of a step.
    """
    q, k, c, d = s.slots, s.context + s.slots, s.context, s.hidden
    if mixed:
        per_layer = (q * (4 * d * FP32 + 4 * d * BF16 + 4 * s.intermediate * BF16 + s.q_width * (2 * FP32 + 2 * BF16))
                     + k * (2 * d * BF16 + s.kv_width * (2 * FP32 + 2 * BF16)))
        once = c * s.taps * d * BF16
    else:
        per_layer = (q * (7 * d + 4 * s.intermediate + 4 * s.q_width) + k * (d + 4 * s.kv_width)) * FP32
        once = c * s.taps * d * FP32
    return s.layers * per_layer + once + (2 * c * d + q * d) * FP32


def logits_chunk_bytes(s: StepShapes, mixed: bool) -> int:
    """One chunk of logits while its loss and gradient are taken (in the forward pass), r = b·chunk_blocks·B rows:
    fp32 logits, log-softmax and their gradient, 3·r·V·4 (+ the bf16 matmul output r·V·2 under autocast)."""
    rows = s.batch * min(s.chunk_blocks, s.num_anchors) * s.block_size
    return rows * s.vocab * (3 * FP32 + (BF16 if mixed else 0))


def target_forward_bytes(s: StepShapes, value_bytes: int) -> int:
    """The frozen target's forward (no grad): every hidden state (L_t + 1)·c·d, which output_hidden_states returns,
    plus one layer's MLP intermediates 3·c·I, in the target's dtype."""
    return ((s.target_layers + 1) * s.context * s.hidden + 3 * s.context * s.intermediate) * value_bytes


def memory_per_rank(shapes: StepShapes, strategy: str, world_size: int, target_params: int, drafter_params: int,
                    drafter_linear_params: int, largest_layer_params: int, target_bytes: int, mixed: bool
                    ) -> Dict[str, int]:
    """Bytes per rank, by component, for strategy ddp, fsdp or fsdp2 (FULL_SHARD) or single (world_size 1).

    Weights, gradients and the two AdamW moments are fp32: P·4 each, divided by W when sharded. Sharded strategies
    also hold the gathered parameters (and, in the backward pass, gradients) of the layer in flight and of the one
    prefetched; ddp's gradients are views into its all-reduce buckets. Under autocast every linear weight gets a
    bf16 copy that the backward keeps (P_lin·2), except under fsdp, which gathers bf16 parameters itself.
    The peak adds the larger transient: the target's forward, or the drafter's saved tensors plus one logits chunk.
    """
    sharded = strategy in ("fsdp", "fsdp2")
    shard = world_size if sharded else 1
    gathered_bytes = BF16 if strategy == "fsdp" and mixed else FP32
    parts = {
        "target weights": target_params * target_bytes,
        "drafter weights": drafter_params * FP32 // shard,
        "gradients": drafter_params * FP32 // shard,
        "AdamW state": 2 * drafter_params * FP32 // shard,
        "gathered layers": (2 * gathered_bytes + FP32) * largest_layer_params if sharded else 0,
        "autocast weight copies": drafter_linear_params * BF16 if mixed and strategy != "fsdp" else 0,
        "saved activations": drafter_activation_bytes(shapes, mixed),
        "logits chunk": logits_chunk_bytes(shapes, mixed),
        "target forward": target_forward_bytes(shapes, target_bytes),
    }
    static = sum(v for k, v in parts.items() if k not in ("saved activations", "logits chunk", "target forward"))
    parts["peak"] = static + max(parts["target forward"],
                                 parts["saved activations"] + parts["logits chunk"])
    return parts


# Qwen3-8B's published architecture (its config.json), so that the table needs no download.
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
STRATEGIES = ("single", "ddp", "fsdp", "fsdp2")
DTYPE_BYTES = {"float32": FP32, "bfloat16": BF16, "float16": BF16}


def parameter_counts(target_config, cfg) -> Dict[str, int]:
    """Parameters of the target and of the drafter (with the family's heads) the config builds, counted on the
    meta device (nothing is allocated)."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from dflashtrain.families import family_checks, get_family
    from dflashtrain.models.target import drafter_geometry
    from dflashtrain.objectives import objective_class

    family = get_family(objective_class(OmegaConf.get_type(cfg.loss)).family)
    options = family_checks(family.name).head_options(cfg)
    geometry = drafter_geometry(target_config, cfg.model.drafter, cfg.model.drafter.mask_token_id or 0)
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(target_config)
        drafter = family.build_drafter(geometry, options)
        heads = family.build_heads(target_config.vocab_size, geometry.hidden_size, options)
    trainable = [drafter] + ([heads] if heads is not None else [])
    linears = [m for module in trainable for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return {
        "target": sum(p.numel() for p in target.parameters()),
        "drafter": sum(p.numel() for module in trainable for p in module.parameters()),
        "linear": sum(m.weight.numel() for m in linears),
        "largest_layer": max(sum(p.numel() for p in layer.parameters()) for layer in drafter.layers),
    }


def step_shapes(target_config, cfg) -> StepShapes:
    drafter = cfg.model.drafter
    head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // target_config.num_attention_heads
    taps = len(drafter.target_layer_ids) if drafter.target_layer_ids is not None else drafter.num_taps
    return StepShapes(
        batch=cfg.data.batch_size, seq_len=cfg.data.max_length, num_anchors=cfg.data.num_anchors,
        block_size=drafter.block_size, chunk_blocks=drafter.logits_chunk_blocks, hidden=target_config.hidden_size,
        intermediate=drafter.intermediate_size or target_config.intermediate_size,
        q_width=target_config.num_attention_heads * head_dim, kv_width=target_config.num_key_value_heads * head_dim,
        layers=drafter.num_layers, taps=taps, vocab=target_config.vocab_size,
        target_layers=target_config.num_hidden_layers,
    )


def memory_table(target_config, cfg, world_size: int) -> str:
    """A Markdown table: GiB per rank for each strategy (single: one device), components then the peak."""
    counts = parameter_counts(target_config, cfg)
    shapes = step_shapes(target_config, cfg)
    mixed = cfg.trainer.precision in ("bf16-mixed", "16-mixed")
    columns = {name: memory_per_rank(shapes, name, 1 if name == "single" else world_size, counts["target"],
                                     counts["drafter"], counts["linear"], counts["largest_layer"],
                                     DTYPE_BYTES[cfg.model.target.dtype], mixed) for name in STRATEGIES}
    header = ["GiB per rank"] + [name if name == "single" else f"{name} (W = {world_size})" for name in STRATEGIES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for part in columns["single"]:
        label = f"**{part}**" if part == "peak" else part
        lines.append("| " + " | ".join([label] + [f"{columns[name][part] / GIB:.1f}" for name in STRATEGIES]) + " |")
    return "\n".join(lines)


def recipe_config(name: str = "dflash_qwen3_8b"):
    """A checked-in recipe, composed as the CLI composes it (``--config-dir recipes --config-name NAME``)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dflashtrain.config.schema import register_configs

    register_configs()
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    with initialize_config_dir(config_dir=str(recipes), version_base=None):
        return compose(name, overrides=["hydra.searchpath=[pkg://dflashtrain.conf]"])


if __name__ == "__main__":
    from transformers import Qwen3Config

    print(memory_table(Qwen3Config(**QWEN3_8B), recipe_config(), world_size=8))
