"""Every shipped Qwen3-8B recipe passes the validation a run does, against the target it names (a Qwen3-8B
config.json built here, no weights), and builds the drafter it promises: at full size, on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dflashtrain.config.checks import validate, validate_against_target
from dflashtrain.config.schema import register_configs
from dflashtrain.families import family_checks, get_family
from dflashtrain.models.target import drafter_geometry, load_target_config, resolve_mask_token_id
from dflashtrain.objectives import build_objective

register_configs()
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*_qwen3_8b.yaml"))  # tiny_ablation: test_report
QWEN3_8B = {  # the published Qwen3-8B config.json, the fields the trainer reads
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6,
    "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
# Drafter parameters (fc + 5 layers + norms), and what each family adds beside it.
DRAFTER_PARAMETERS = 5 * 4096 * 4096 + 5 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128) \
    + 2 * 4096
DSPARK_HEADS = 2 * 151936 * 256 + (4096 + 256) + 1  # W1, W2, confidence Linear(d + r, 1)
DFLASH2_CONVS = 5 * 2 * (2 * 2 * 4096 + 2 * 2 * (4096 // 16) * 4096)  # per layer and sublayer: base + projection
DFLASH2_SELECTOR = 2 * 151936 * 256 + 256 * 4096  # the two codebooks and the hidden projection


@pytest.fixture(scope="module")
def qwen3_8b(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_8b")
    (root / "config.json").write_text(json.dumps(QWEN3_8B))
    (root / "train.jsonl").write_text("")
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_validates_and_builds_the_drafter_it_promises(recipe, qwen3_8b, tmp_path):
    overrides = ["hydra.searchpath=[pkg://dflashtrain.conf]", f"model.target.path={qwen3_8b}",
                 f"data.path={qwen3_8b / 'train.jsonl'}", f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(recipe.parent), version_base=None):
        cfg = compose(recipe.stem, overrides=overrides)
    validate(cfg)
    target_config = load_target_config(str(qwen3_8b))
    validate_against_target(cfg, target_config)

    mask_id = resolve_mask_token_id(cfg.model.drafter.mask_token_id, None, target_config.vocab_size)
    geometry = drafter_geometry(target_config, cfg.model.drafter, mask_id)
    assert geometry.target_layer_ids == [1, 9, 17, 25, 33] and geometry.mask_token_id == 151669
    assert geometry.rope_theta == 1e6 and geometry.num_layers == 5
    assert (cfg.data.max_length, cfg.data.num_anchors, cfg.data.batch_size) == (3072, 512, 4)
    assert cfg.optim.lr == 6e-4 and cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    objective = build_objective(OmegaConf.to_object(cfg.loss))
    family = get_family(objective.family)
    options = family_checks(family.name).head_options(cfg)
    with torch.device("meta"):
        drafter = family.build_drafter(geometry, options)
        heads = family.build_heads(target_config.vocab_size, geometry.hidden_size, options)
    drafter_parameters = sum(p.numel() for p in drafter.parameters())
    head_parameters = sum(p.numel() for p in heads.parameters()) if heads is not None else 0
    if family.name == "dflash2":
        assert drafter_parameters == DRAFTER_PARAMETERS + DFLASH2_CONVS and head_parameters == DFLASH2_SELECTOR
        assert (geometry.block_size, objective.base.gamma, geometry.sliding_window) == (8, 4.0, 2048)
        assert options == {"conv_kernel_size": 2, "conv_group_size": 16, "selector_rank": 256, "selector_top_k": 16,
                           "selector_stop_gradient": False}
        assert objective.coefficients == {"ce": 1.0, "selector_ce": 1.0}
        return
    assert geometry.sliding_window is None
    assert drafter_parameters == DRAFTER_PARAMETERS  # ≈ 1.05 B
    assert 1.04e9 < drafter_parameters < 1.06e9
    if family.name == "dspark":
        assert (geometry.block_size, objective.gamma) == (7, 4.0) and head_parameters == DSPARK_HEADS
    else:
        assert geometry.block_size == 16 and head_parameters == 0
        if objective.name in ("decay", "vp_drafter"):
            assert objective.gamma == 7.0
