"""Sliding-window drafter attention (docs/architecture.md, sliding window): the training mask rule and its vectors,
both attention paths, the same window in the decode loop's drafter context, the config check and the export fields."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch

from dflashtrain.families import get_family
from dflashtrain.inference.decode import DFlashProposer, Sampler, generate
from dflashtrain.models.dflash import ContextCache, DFlashDrafter, DrafterGeometry
from dflashtrain.models.masks import AnchorAttentionMask, anchor_mask_mod, attend, dense_visibility


def visible_columns(anchor: int, seq_len: int, block_size: int, window: int):
    rows = dense_visibility(torch.tensor([[anchor]]), torch.tensor([[True]]), seq_len, block_size, window)[0]
    return [torch.nonzero(row).flatten().tolist() for row in rows]


def naive_window_rule(anchors, keep, seq_len, block_size, window, q, kv):
    n, k = divmod(q, block_size)
    if not keep[n]:
        return False
    if kv < seq_len:
        return kv < anchors[n] and (anchors[n] + k) - kv < window
    return (kv - seq_len) // block_size == n  # the whole own block (non-causal, W >= B)


# ---------------------------------------------------------------------------------------------- the rule
def test_window_vector_anchor_6_block_4_window_4():
    """a = 6, S = 12, B = 4, W = 4: slot k sees context a + k − W + 1 .. a − 1 ([3, 4, 5], [4, 5], [5], none) and,
    being non-causal, its whole block (columns 12..15)."""
    rows = visible_columns(6, 12, 4, 4)
    block = [12, 13, 14, 15]
    assert rows == [[3, 4, 5] + block, [4, 5] + block, [5] + block, block]


def test_window_context_vectors_of_the_other_published_cases():
    """a = 6, S = 6, W = 3: context [4, 5], [5], none, none; a = 5, ctx 8, W = 3: (slot 0, t 4) visible, (slot 2,
    t 4) not (the window counts the query itself)."""
    rows = visible_columns(6, 6, 4, 3)
    assert [[c for c in row if c < 6] for row in rows] == [[4, 5], [5], [], []]
    rows = visible_columns(5, 8, 4, 3)
    assert 4 in rows[0] and 4 not in rows[2] and {8, 9, 10, 11} <= set(rows[2])


def test_no_window_is_the_plain_rule_and_a_wide_window_changes_nothing():
    anchors, keep = torch.tensor([[0, 3, 9, 0]]), torch.tensor([[True, True, True, False]])
    plain = dense_visibility(anchors, keep, 10, 4)
    assert torch.equal(dense_visibility(anchors, keep, 10, 4, 13), plain)  # 9 + 3 − 0 < 13: every key in reach
    assert not torch.equal(dense_visibility(anchors, keep, 10, 4, 12), plain)


def test_dense_and_flex_mask_mod_match_the_naive_rule():
    gen = torch.Generator().manual_seed(4)
    seq_len, block, blocks, window = 13, 3, 5, 4
    anchors = torch.randint(0, seq_len, (2, blocks), generator=gen).sort(dim=1).values
    keep = torch.rand(2, blocks, generator=gen) < 0.8
    num_q = blocks * block
    expected = torch.tensor([[[naive_window_rule(anchors[b].tolist(), keep[b].tolist(), seq_len, block, window, q, kv)
                               for kv in range(seq_len + num_q)] for q in range(num_q)] for b in range(2)])
    assert torch.equal(dense_visibility(anchors, keep, seq_len, block, window), expected)
    mask_mod = anchor_mask_mod(anchors, keep, seq_len, block, window)
    fn = torch.vmap(torch.vmap(torch.vmap(mask_mod, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None)),
                    in_dims=(0, None, None, None))
    got = fn(torch.arange(2), torch.tensor(0), torch.arange(num_q), torch.arange(seq_len + num_q))
    assert torch.equal(got, expected)


def test_flex_eager_matches_sdpa_with_a_window():
    anchors, keep = torch.tensor([[2, 7, 11]]), torch.tensor([[True, True, True]])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 12, 8, generator=gen)
    k, v = torch.randn(1, 2, 24, 8, generator=gen), torch.randn(1, 2, 24, 8, generator=gen)
    sdpa = AnchorAttentionMask.build(anchors, keep, 12, 4, use_flex=False, sliding_window=5)
    flex = AnchorAttentionMask.build(anchors, keep, 12, 4, use_flex=True, sliding_window=5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.testing.assert_close(attend(q, k, v, flex), attend(q, k, v, sdpa), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- drafter and decoding
def _geometry(window, block_size=4):
    return DrafterGeometry(hidden_size=32, intermediate_size=48, num_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                           target_layer_ids=[0, 1], block_size=block_size, mask_token_id=31, sliding_window=window)


def _one_block(anchor, seq_len, window):
    """float64 inputs of one kept block of B = 4 at `anchor` over `seq_len` context states, and its windowed mask."""
    tapped, embeds = torch.randn(1, seq_len, 64, dtype=torch.float64), torch.randn(1, 4, 32, dtype=torch.float64)
    positions = torch.arange(anchor, anchor + 4).unsqueeze(0)
    mask = AnchorAttentionMask.build(torch.tensor([[anchor]]), torch.tensor([[True]]), seq_len, 4, False,
                                     sliding_window=window)
    return tapped, embeds, positions, mask


@pytest.mark.parametrize("family", ["dflash", "dflash2"])
def test_cached_drafting_sees_the_training_window(family):
    """With a cache much longer than W, the decode loop's block equals the training forward under the window rule,
    and differs from the drafter without a window (old positions are really dropped)."""
    options = {"conv_kernel_size": 2, "conv_group_size": 8, "selector_rank": 4, "selector_top_k": 3,
               "selector_stop_gradient": False}
    torch.manual_seed(0)
    drafter = get_family(family).build_drafter(_geometry(6), options).double().eval()
    drafter.reset_parameters(std=0.3)
    anchor = 17
    tapped, embeds, positions, mask = _one_block(anchor, seq_len=20, window=6)
    with torch.no_grad():
        expected = drafter(embeds, tapped, positions, mask)
        cache = ContextCache(2)
        drafter.extend_context(cache, tapped[:, :anchor])
        torch.testing.assert_close(drafter.draft_cached(embeds, positions, cache), expected, rtol=1e-10, atol=1e-10)
        drafter.geometry = replace(drafter.geometry, sliding_window=None)
        assert (drafter.draft_cached(embeds, positions, cache) - expected).abs().max() > 1e-6


def test_training_forward_ignores_context_outside_every_slots_window():
    torch.manual_seed(0)
    drafter = DFlashDrafter(_geometry(5)).double().eval()
    anchor, seq_len = 9, 12
    tapped, embeds, positions, mask = _one_block(anchor, seq_len, window=5)
    with torch.no_grad():
        base = drafter(embeds, tapped, positions, mask)
        for t in range(seq_len):
            bumped = tapped.clone()
            bumped[:, t] += 1.0
            changed = (drafter(embeds, bumped, positions, mask) - base).abs().amax(dim=-1)[0]  # per slot [4]
            # slot k sees t iff t < 9 and 9 + k − t < 5; layer 2 then mixes the block, so a block changes iff any slot
            reached = [t < anchor and anchor + k - t < 5 for k in range(4)]
            assert (changed.max() > 1e-9) == any(reached), t


def test_greedy_decoding_with_a_windowed_drafter_is_lossless():
    from test_decode import plain, tiny_target

    target = tiny_target(vocab_size=32, init=0.2)
    torch.manual_seed(1)
    drafter = DFlashDrafter(_geometry(4)).eval()
    drafter.reset_parameters(std=0.3)
    prompt = [1, 7, 3, 9, 4, 8, 2, 6, 5]  # longer than the window from the first round on
    speculative = generate(target, DFlashProposer(drafter, target), prompt, 20, (), Sampler())
    assert speculative.tokens == plain(target, prompt, 20).tokens


# ---------------------------------------------------------------------------------------------- config and export
def test_window_below_the_block_size_is_refused_before_any_weight_loads(tmp_path):
    from hydra import compose, initialize_config_module

    from dflashtrain.config.checks import validate
    from dflashtrain.config.errors import ConfigError
    from dflashtrain.config.schema import register_configs

    register_configs()
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        for window, ok in ((None, True), (8, True), (7, False)):
            cfg = compose("train", overrides=[f"model.drafter.sliding_window={'null' if window is None else window}",
                                              f"paths.output_dir={tmp_path}"])
            if ok:
                validate(cfg)
            else:
                with pytest.raises(ConfigError, match=r"^model.drafter.sliding_window: must be null .* >= "
                                                      r"model.drafter.block_size = 8, got 7"):
                    validate(cfg)


def test_export_writes_the_window_both_engines_read_and_loads_it_back(tmp_path):
    from test_export import target_config, write_checkpoint

    from dflashtrain.export.hf import export, load_exported

    target_dir = tmp_path / "target"
    target_config().save_pretrained(target_dir)
    checkpoint = write_checkpoint(tmp_path / "run" / "last.ckpt", target_dir)
    state = torch.load(checkpoint, weights_only=True)
    state["dflashtrain"]["geometry"]["sliding_window"] = 2048
    torch.save(state, checkpoint)
    out = export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention"] * 2 and config["sliding_window"] == 2048
    assert config["use_sliding_window"] is True and config["is_causal"] is False and config["max_window_layers"] == 2
    assert config["dflash_config"]["use_swa"] is True and config["dflash_config"]["swa_window_size"] == 2048
    assert load_exported(out).drafter.geometry.sliding_window == 2048

    plain_out = export(write_checkpoint(tmp_path / "plain" / "last.ckpt", target_dir), tmp_path / "plain_drafter",
                       None, "float32", overwrite=False)
    config = json.loads((plain_out / "config.json").read_text())
    assert config["layer_types"] == ["full_attention"] * 2 and config["sliding_window"] is None
    assert "use_swa" not in config["dflash_config"] and config["is_causal"] is False
    assert load_exported(plain_out).drafter.geometry.sliding_window is None
