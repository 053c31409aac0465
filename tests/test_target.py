"""The frozen target: tap formula and indexing, mask-token resolution, drafter geometry, loading from a directory."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import DrafterConfig
from dflashtrain.models.target import (
    FrozenTarget,
    default_layer_ids,
    drafter_geometry,
    load_target_config,
    load_tokenizer,
    resolve_mask_token_id,
)


@pytest.mark.parametrize(
    "layers,taps,expected",
    [(36, 5, [1, 9, 17, 25, 33]), (8, 3, [1, 3, 5]), (28, 1, [14]), (36, 1, [18]), (10, 4, [1, 3, 5, 7])],
)
def test_default_layer_ids(layers, taps, expected):
    assert default_layer_ids(layers, taps) == expected


class FakeTokenizer:
    def __init__(self, size, mask_token_id=None):
        self.size, self.mask_token_id = size, mask_token_id

    def __len__(self):
        return self.size


def test_mask_token_resolution_order():
    assert resolve_mask_token_id(7, FakeTokenizer(10, mask_token_id=3), 16) == 7  # explicit wins
    assert resolve_mask_token_id(None, FakeTokenizer(10, mask_token_id=3), 16) == 3  # then the tokenizer's
    assert resolve_mask_token_id(None, FakeTokenizer(10), 16) == 10  # then the first unused row
    with pytest.raises(ConfigError, match="model.drafter.mask_token_id"):
        resolve_mask_token_id(None, FakeTokenizer(16), 16)  # never pad/eos silently
    with pytest.raises(ConfigError, match="model.drafter.mask_token_id"):
        resolve_mask_token_id(16, FakeTokenizer(10), 16)  # out of the embedding


def test_geometry_from_target_config(random_target_dir):
    config = load_target_config(str(random_target_dir))
    drafter_cfg = OmegaConf.structured(DrafterConfig(num_layers=2, block_size=4, num_taps=2))  # every key, defaults
    g = drafter_geometry(config, drafter_cfg, mask_token_id=5)
    assert (g.hidden_size, g.num_attention_heads, g.num_key_value_heads, g.head_dim) == (64, 4, 2, 16)
    assert g.intermediate_size == 128 and g.target_layer_ids == default_layer_ids(4, 2)


def test_tapped_states_are_layer_outputs(random_target_dir):
    """hidden_states[i + 1] is layer i's output (raw residual stream); the final state is post-norm."""
    config = load_target_config(str(random_target_dir))
    target = FrozenTarget.load(str(random_target_dir), "float32", [0, 2])
    captured = {}
    for i in (0, 2):
        target.model.model.layers[i].register_forward_hook(
            lambda module, args, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
    ids = torch.randint(0, config.vocab_size, (2, 9))
    states = target.states(ids, torch.ones_like(ids))
    d = config.hidden_size
    torch.testing.assert_close(states.tapped[..., :d], captured[0])
    torch.testing.assert_close(states.tapped[..., d:], captured[2])
    logits = target.model(input_ids=ids).logits
    torch.testing.assert_close(target.lm_head(states.final_hidden), logits, rtol=1e-5, atol=1e-5)


def test_right_padding_leaves_the_real_positions_unchanged(random_target_dir):
    """states() ignores attention_mask (no host read of it): right pads never reach real tokens."""
    config = load_target_config(str(random_target_dir))
    target = FrozenTarget.load(str(random_target_dir), "float32", [0, 2])
    ids = torch.randint(0, config.vocab_size, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    alone, with_pads = target.states(ids, torch.ones_like(ids)), target.states(padded, mask)
    torch.testing.assert_close(with_pads.tapped[:, :6], alone.tapped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_pads.final_hidden[:, :6], alone.final_hidden, rtol=1e-5, atol=1e-6)
    reference = target.model.model(input_ids=padded, attention_mask=mask).last_hidden_state  # HF's own masking
    torch.testing.assert_close(with_pads.final_hidden[:, :6], reference[:, :6], rtol=1e-5, atol=1e-6)


def test_target_is_frozen(random_target_dir):
    target = FrozenTarget.load(str(random_target_dir), "float32", [1])
    assert not target.model.training
    assert all(not p.requires_grad for p in target.model.parameters())


def test_tiny_tokenizer_has_a_mask_token():
    from dflashtrain.assets import TINY_TARGET_DIR

    tokenizer = load_tokenizer(str(TINY_TARGET_DIR))
    config = load_target_config(str(TINY_TARGET_DIR))
    mask_id = resolve_mask_token_id(None, tokenizer, config.vocab_size)
    assert mask_id == tokenizer.mask_token_id and mask_id not in (tokenizer.pad_token_id, tokenizer.eos_token_id)
