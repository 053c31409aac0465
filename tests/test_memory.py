"""The memory per rank in the README is computed by dflashtrain/train/memory.py: its parameter counts are those of
the real modules, its activation formula matches the tensors a real step saves for its backward, and the README's
table is its output for the Qwen3-8B recipe."""

from __future__ import annotations

import weakref

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dflashtrain.train import memory

README = Path(__file__).resolve().parents[1] / "README.md"


class FlexStandIn(torch.autograd.Function):
    """Attention that keeps what flex attention keeps for its backward: q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value, dense):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense,
                                                               enable_gqa=query.shape[1] != key.shape[1])
        ctx.save_for_backward(query, key, value, out, torch.zeros(query.shape[:3]))
        return out


def flex_like_attend(query, key, value, mask):
    out = FlexStandIn.apply(query, key, value, mask.dense)
    return out * mask.query_keep.to(out.dtype)


def saved_bytes(module, batch, mixed: bool) -> int:
    """Bytes of the distinct storages the step's forward saves for backward and still holds when it returns
    (a loss chunk's own graph is freed inside the forward once its gradient is taken), parameters excluded; plus
    the chunk gradients the loss holds for the backward (objectives/chunked.py)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in module.target.model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = (storage.nbytes(), weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            total, _, _ = module.forward_loss(batch, module.chunk_blocks)
    held = sum(size for size, alive in storages.values() if alive() is not None)
    node = next(iter(total.terms.values())).grad_fn  # the unbind of PrecomputedGradient's output
    (precomputed, _), = node.next_functions
    return held + sum(g.numel() * g.element_size() for g in precomputed.grads)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seq_len,num_anchors,num_layers", [(48, 6, 2), (80, 3, 3)])
def test_the_activation_formula_matches_the_tensors_a_step_saves(monkeypatch, seq_len, num_anchors, num_layers,
                                                                  mixed):
    import dflashtrain.models.dflash as dflash
    from dflashtrain.assets import TINY_TARGET_DIR
    from dflashtrain.config.schema import DrafterConfig
    from dflashtrain.models.target import FrozenTarget, drafter_geometry, load_target_config, load_tokenizer
    from factories import make_module, make_objective

    monkeypatch.setattr(dflash, "attend", flex_like_attend)
    path = str(TINY_TARGET_DIR)
    target_config = load_target_config(path)
    drafter_cfg = OmegaConf.structured(DrafterConfig(num_layers=num_layers, block_size=8, target_layer_ids=[1, 3, 5],
                                                     num_taps=3, logits_chunk_blocks=2))
    geometry = drafter_geometry(target_config, drafter_cfg, load_tokenizer(path).mask_token_id)
    drafter = dflash.DFlashDrafter(geometry)
    target = FrozenTarget.load(path, "float32", geometry.target_layer_ids)
    module = make_module(drafter, target, make_objective("decay", gamma=4.0), num_anchors=num_anchors,
                         chunk_blocks=2)
    batch_size = 2
    ones = torch.ones(batch_size, seq_len, dtype=torch.long)
    batch = {"input_ids": torch.randint(0, 300, (batch_size, seq_len)), "loss_mask": ones, "attention_mask": ones,
             "row_keys": list(range(batch_size)), "sample_ids": torch.arange(batch_size)}
    weight_copies = sum(m.weight.numel() for m in drafter.modules() if isinstance(m, torch.nn.Linear)) * 2

    measured = saved_bytes(module, batch, mixed) - (weight_copies if mixed else 0)
    cfg = OmegaConf.create({"model": {"drafter": drafter_cfg},
                            "data": {"batch_size": batch_size, "max_length": seq_len, "num_anchors": num_anchors}})
    computed = memory.drafter_activation_bytes(memory.step_shapes(target_config, cfg), mixed)
    assert computed == pytest.approx(measured, rel=0.06)  # the rest: RMSNorm's per-row statistics, RoPE tables


def test_parameter_counts_are_those_of_the_modules_a_run_builds():
    from transformers import Qwen3Config

    cfg = memory.recipe_config()
    counts = memory.parameter_counts(Qwen3Config(**memory.QWEN3_8B), cfg)
    assert counts["target"] == pytest.approx(8.19e9, rel=0.005)  # Qwen3-8B: 8.2 B parameters
    d, inner, kv = 4096, 12288, 1024
    layer = 2 * d * d + 2 * d * kv + 3 * d * inner + 2 * d + 2 * 128  # attention, MLP, two norms, q/k norms
    assert counts["largest_layer"] == layer
    assert counts["drafter"] == 5 * layer + 5 * d * d + 2 * d  # + fc (5 taps) + hidden_norm + norm
    assert counts["linear"] == counts["drafter"] - 5 * (2 * d + 256) - 2 * d


def test_the_readme_table_is_the_computed_one():
    from transformers import Qwen3Config

    text = README.read_text()
    table = memory.memory_table(Qwen3Config(**memory.QWEN3_8B), memory.recipe_config(), world_size=8)
    assert table in text, "README's memory table is stale: paste `python -m dflashtrain.train.memory`"
    assert re.search(r"python -m dflashtrain\.train\.memory", text)
