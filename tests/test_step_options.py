"""Step options that change how fast the step runs, not what it computes: fused AdamW and model.drafter.compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import write_count_up_chats
from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.config.schema import register_configs
from dflashtrain.train.recipe import optimizer_factory, run

register_configs()


@pytest.fixture
def data(tmp_path) -> Path:
    return write_count_up_chats(tmp_path / "train.jsonl", 24)


def _cfg(data: Path, out: Path, *extra: str):
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("train", overrides=[
            f"model.target.path={TINY_TARGET_DIR}", f"data.path={data}", f"paths.output_dir={out}", "data.batch_size=4",
            "checkpoint.every_n_train_steps=100", "logger=none", "eval.every_n_steps=0",
            "trainer.enable_progress_bar=false", *extra])


def test_the_run_builds_fused_adamw_except_under_16_mixed(data, tmp_path):
    params = [torch.nn.Parameter(torch.randn(3))]
    assert optimizer_factory(_cfg(data, tmp_path))(params).defaults["fused"]
    assert not optimizer_factory(_cfg(data, tmp_path, "trainer.precision=16-mixed"))(params).defaults["fused"]


def test_model_drafter_compile_compiles_every_layer_and_keeps_the_names(data, tmp_path, monkeypatch):
    """The flag reaches the drafter (the compiled run itself is measured in bench/RESULTS.md: it takes minutes)."""
    from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry, compile_layers

    g = DrafterGeometry(hidden_size=16, intermediate_size=32, num_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, target_layer_ids=[0],
                        block_size=4, mask_token_id=19)
    drafter = DFlashDrafter(g)
    names = list(drafter.state_dict())
    compile_layers(drafter)
    assert list(drafter.state_dict()) == names
    assert all(layer._compiled_call_impl is not None for layer in drafter.layers)

    compiled = []
    monkeypatch.setattr("dflashtrain.train.recipe.compile_layers", lambda d: compiled.append(d) or d)
    run(_cfg(data, tmp_path / "a", "trainer.max_steps=1"))
    assert compiled == []
    run(_cfg(data, tmp_path / "b", "trainer.max_steps=1", "model.drafter.compile=true"))
    assert len(compiled) == 1 and isinstance(compiled[0], DFlashDrafter)
