"""The anchor-block attention rule (docs/architecture.md, attention rule): dense mask, flex mask_mod, both attention paths, drafter."""

from __future__ import annotations

import warnings

import pytest
import torch

from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
from dflashtrain.models.masks import AnchorAttentionMask, anchor_mask_mod, attend, dense_visibility
from reference import ref_attention, ref_visibility

# Anchors with an anchor at 0 (sees no context), one at S - 1, and dummy blocks (keep False, anchor 0).
SEQ_LEN, BLOCK = 7, 3
ANCHORS = [[0, 2, 6, 0], [1, 4, 0, 0]]
KEEP = [[True, True, True, False], [True, True, False, False]]


def _rule_inputs():
    return torch.tensor(ANCHORS), torch.tensor(KEEP)


def test_dense_visibility_hand():
    # S = 3, B = 2; anchors [2, 0, 1], the last block a dummy.
    got = dense_visibility(torch.tensor([[2, 0, 1]]), torch.tensor([[True, True, False]]), 3, 2)
    block0 = [1, 1, 0] + [1, 1, 0, 0, 0, 0]  # context t < 2, own block
    block1 = [0, 0, 0] + [0, 0, 1, 1, 0, 0]  # anchor 0: no context at all, own block
    dummy = [0] * 9
    expected = torch.tensor([[block0, block0, block1, block1, dummy, dummy]], dtype=torch.bool)
    assert got.dtype == torch.bool
    assert torch.equal(got, expected)


def test_dense_visibility_matches_naive_rule():
    anchors, keep = _rule_inputs()
    got = dense_visibility(anchors, keep, SEQ_LEN, BLOCK)
    assert torch.equal(got, ref_visibility(ANCHORS, KEEP, SEQ_LEN, BLOCK))


def test_dense_visibility_random_matches_naive_rule():
    gen = torch.Generator().manual_seed(3)
    seq_len, block, blocks = 11, 4, 5
    anchors = torch.randint(0, seq_len, (3, blocks), generator=gen).sort(dim=1).values
    keep = torch.rand(3, blocks, generator=gen) < 0.7
    got = dense_visibility(anchors, keep, seq_len, block)
    assert torch.equal(got, ref_visibility(anchors.tolist(), keep.tolist(), seq_len, block))


def _grid_expected():
    return ref_visibility(ANCHORS, KEEP, SEQ_LEN, BLOCK)


def test_mask_mod_on_full_grid_broadcast():
    anchors, keep = _rule_inputs()
    mask_mod = anchor_mask_mod(anchors, keep, SEQ_LEN, BLOCK)
    batch, num_q = len(ANCHORS), len(ANCHORS[0]) * BLOCK
    b = torch.arange(batch).view(-1, 1, 1)
    q = torch.arange(num_q).view(1, -1, 1)
    kv = torch.arange(SEQ_LEN + num_q).view(1, 1, -1)
    got = mask_mod(b, torch.zeros_like(b), q, kv)
    assert torch.equal(got.expand(batch, num_q, SEQ_LEN + num_q), _grid_expected())


def test_mask_mod_on_full_grid_vmap():
    """The way create_block_mask evaluates it: scalar indices under nested vmap."""
    anchors, keep = _rule_inputs()
    mask_mod = anchor_mask_mod(anchors, keep, SEQ_LEN, BLOCK)
    batch, num_q = len(ANCHORS), len(ANCHORS[0]) * BLOCK
    fn = mask_mod
    fn = torch.vmap(fn, in_dims=(None, None, None, 0))
    fn = torch.vmap(fn, in_dims=(None, None, 0, None))
    fn = torch.vmap(fn, in_dims=(0, None, None, None))
    got = fn(torch.arange(batch), torch.tensor(0), torch.arange(num_q), torch.arange(SEQ_LEN + num_q))
    assert torch.equal(got, _grid_expected())


def test_build_sdpa_mask_and_query_keep():
    anchors, keep = _rule_inputs()
    mask = AnchorAttentionMask.build(anchors, keep, SEQ_LEN, BLOCK, use_flex=False)
    num_q = len(ANCHORS[0]) * BLOCK
    assert mask.dense.shape == (2, 1, num_q, SEQ_LEN + num_q)
    expected = _grid_expected()
    keep_q = torch.tensor(KEEP).repeat_interleave(BLOCK, dim=1)  # [b, Q]
    # Kept queries follow the rule exactly; every SDPA row has at least one visible key (no NaN).
    assert torch.equal(mask.dense[:, 0][keep_q], expected[keep_q])
    assert mask.dense.any(dim=-1).all()
    assert torch.equal(mask.query_keep.view(2, num_q), keep_q.float())


def _qkv(seed: int, heads: int, kv_heads: int, head_dim: int = 8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    num_q = len(ANCHORS[0]) * BLOCK
    q = torch.randn(2, heads, num_q, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(2, kv_heads, SEQ_LEN + num_q, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(2, kv_heads, SEQ_LEN + num_q, head_dim, generator=gen, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_attend_sdpa_matches_naive_float64_attention(heads, kv_heads):
    anchors, keep = _rule_inputs()
    q, k, v = _qkv(heads * 10 + kv_heads, heads, kv_heads, dtype=torch.float64)
    mask = AnchorAttentionMask.build(anchors, keep, SEQ_LEN, BLOCK, use_flex=False)
    got = attend(q, k, v, mask)
    expected = ref_attention(q, k, v, ANCHORS, KEEP, SEQ_LEN, BLOCK)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # Dummy blocks produce exactly zero.
    assert (got[0, :, 3 * BLOCK:] == 0).all() and (got[1, :, 2 * BLOCK:] == 0).all()


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])
def test_flex_eager_matches_sdpa(heads, kv_heads):
    anchors, keep = _rule_inputs()
    q, k, v = _qkv(heads + kv_heads, heads, kv_heads)
    sdpa = AnchorAttentionMask.build(anchors, keep, SEQ_LEN, BLOCK, use_flex=False)
    flex = AnchorAttentionMask.build(anchors, keep, SEQ_LEN, BLOCK, use_flex=True)
    assert flex.block_mask is not None and flex.dense is None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex warns that it is unfused
        out_flex = attend(q, k, v, flex)
        out_sdpa = attend(q, k, v, sdpa)
    assert torch.isfinite(out_flex).all()
    torch.testing.assert_close(out_flex, out_sdpa, rtol=1e-5, atol=1e-5)
    assert (out_flex[0, :, 3 * BLOCK:] == 0).all() and (out_flex[1, :, 2 * BLOCK:] == 0).all()
    expected = ref_attention(q, k, v, ANCHORS, KEEP, SEQ_LEN, BLOCK).float()
    torch.testing.assert_close(out_flex, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ full drafter
def _geometry(block_size: int = BLOCK) -> DrafterGeometry:
    return DrafterGeometry(
        hidden_size=32, intermediate_size=48, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, target_layer_ids=[0, 2], block_size=block_size,
        mask_token_id=0,
    )


def _drafter_inputs(g: DrafterGeometry, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batch, num_q = len(ANCHORS), len(ANCHORS[0]) * g.block_size
    embeds = torch.randn(batch, num_q, g.hidden_size, generator=gen, dtype=dtype)
    tapped = torch.randn(batch, SEQ_LEN, len(g.target_layer_ids) * g.hidden_size, generator=gen, dtype=dtype)
    positions = (torch.tensor(ANCHORS).unsqueeze(-1) + torch.arange(g.block_size)).view(batch, num_q)
    return embeds, tapped, positions


def test_drafter_forward_backward_no_nan_with_dummies_and_anchor_zero():
    torch.manual_seed(0)
    g = _geometry()
    drafter = DFlashDrafter(g)
    embeds, tapped, positions = _drafter_inputs(g, torch.float32)
    embeds.requires_grad_(True)
    tapped.requires_grad_(True)
    anchors, keep = _rule_inputs()
    mask = AnchorAttentionMask.build(anchors, keep, SEQ_LEN, BLOCK, use_flex=False)
    hidden = drafter(embeds, tapped, positions, mask)
    assert hidden.shape == (2, len(ANCHORS[0]) * BLOCK, g.hidden_size)
    assert torch.isfinite(hidden).all()
    head = torch.randn(g.hidden_size, 11, generator=torch.Generator().manual_seed(1))
    loss = torch.log_softmax(hidden @ head, dim=-1)[..., 3].sum()
    loss.backward()
    for name, param in drafter.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert torch.isfinite(embeds.grad).all() and torch.isfinite(tapped.grad).all()
    assert drafter.fc.weight.grad.abs().sum() > 0
    assert drafter.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    # Context position t only reaches blocks with anchor > t: row 0's anchors are 0, 2, 6, so t = 6 is unseen.
    assert (tapped.grad[0, 6] == 0).all() and (tapped.grad[0, 5] != 0).any()
    assert (tapped.grad[1, 4:] == 0).all() and (tapped.grad[1, 3] != 0).any()


def test_drafter_dependencies_follow_the_rule():
    """Perturbing context t changes block b iff t < a_b; perturbing a block's input changes only that block."""
    torch.manual_seed(0)
    g = _geometry()
    drafter = DFlashDrafter(g).double()
    embeds, tapped, positions = _drafter_inputs(g, torch.float64, seed=5)
    anchors, keep = _rule_inputs()
    mask = AnchorAttentionMask.build(anchors, keep, SEQ_LEN, BLOCK, use_flex=False)
    with torch.no_grad():
        base = drafter(embeds, tapped, positions, mask).view(2, len(ANCHORS[0]), BLOCK, -1)
        for t in range(SEQ_LEN):
            bumped = tapped.clone()
            bumped[:, t] += 1.0
            out = drafter(embeds, bumped, positions, mask).view_as(base)
            for b in range(2):
                for n, (a, kept) in enumerate(zip(ANCHORS[b], KEEP[b])):
                    changed = (out[b, n] - base[b, n]).abs().max().item()
                    if kept and t < a:
                        assert changed > 1e-6, (b, n, t)
                    else:
                        assert changed < 1e-12, (b, n, t)
        for n_bump in range(len(ANCHORS[0])):
            bumped = embeds.clone().view(2, len(ANCHORS[0]), BLOCK, -1)
            bumped[:, n_bump, BLOCK - 1] += 1.0
            out = drafter(bumped.view_as(embeds), tapped, positions, mask).view_as(base)
            for b in range(2):
                for n in range(len(ANCHORS[0])):
                    changed = (out[b, n] - base[b, n]).abs().max().item()
                    if n == n_bump:
                        assert changed > 1e-6  # own block, bidirectional: even slot 0 sees the last slot
                        assert (out[b, n, 0] - base[b, n, 0]).abs().max().item() > 1e-6 or not KEEP[b][n]
                    else:
                        assert changed < 1e-12, (b, n, n_bump)


# ------------------------------------------------------------------------------------------ how the rule is built
def _random_anchors(seed: int, batch: int, seq_len: int, num_blocks: int, dummies: bool):
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.stack([torch.randperm(seq_len - 1, generator=gen)[:num_blocks].sort().values
                           for _ in range(batch)])
    keep = torch.ones(batch, num_blocks, dtype=torch.bool)
    if dummies:  # dummy blocks come last, with anchor 0
        for row, kept in enumerate(torch.randint(1, num_blocks, (batch,), generator=gen).tolist()):
            keep[row, kept:], anchors[row, kept:] = False, 0
    return anchors, keep


def _full_tiles(block_mask) -> torch.Tensor:
    counts, indices = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    out = torch.zeros(*counts.shape, indices.shape[-1], dtype=torch.bool)
    for index in torch.nonzero(counts).tolist():
        out[(*index, indices[(*index,)][: counts[(*index,)]].long())] = True
    return out


@pytest.mark.parametrize("seq_len,num_blocks,block,batch", [(300, 40, 16, 2), (129, 20, 7, 3), (64, 5, 3, 2),
                                                             (256, 16, 16, 1)])
@pytest.mark.parametrize("dummies", [False, True])
def test_block_mask_from_the_anchors_equals_the_evaluated_mask_mod(seq_len, num_blocks, block, batch, dummies):
    """anchor_block_mask (no mask evaluation) has exactly the partial and full tiles create_block_mask finds."""
    from torch.nn.attention.flex_attention import create_block_mask

    from dflashtrain.models.masks import anchor_block_mask

    anchors, keep = _random_anchors(seq_len + num_blocks, batch, seq_len, num_blocks, dummies)
    got = anchor_block_mask(anchors, keep, seq_len, block)
    num_q = num_blocks * block
    expected = create_block_mask(anchor_mask_mod(anchors, keep, seq_len, block), batch, None, num_q, seq_len + num_q,
                                 device="cpu", _compile=False)
    assert torch.equal(got.to_dense(), expected.to_dense())
    assert torch.equal(_full_tiles(got), _full_tiles(expected))


def test_cpu_key_groups_attend_exactly_as_the_whole_dense_mask():
    """The CPU path attends group by group to the keys its rows can see: same values and gradients (fp64)."""
    from dflashtrain.models.masks import key_groups

    seq_len, num_blocks, block = 150, 24, 7  # 168 queries: two groups of 18 blocks and 6 blocks
    anchors, keep = _random_anchors(1, 2, seq_len, num_blocks, dummies=True)
    mask = AnchorAttentionMask.build(anchors, keep, seq_len, block, use_flex=False)
    assert mask.groups is not None and len(mask.groups) == 2
    assert mask.groups[0].context < seq_len  # keys past the group's largest anchor are skipped
    whole = AnchorAttentionMask(query_keep=mask.query_keep, dense=mask.dense)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, num_blocks * block, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, seq_len + num_blocks * block, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    outputs = []
    for m in (mask, whole):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attend(*inputs, m)
        out.square().sum().backward()
        outputs.append((out, *(t.grad for t in inputs)))
    for got, expected in zip(*outputs):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert key_groups(mask.dense, anchors, keep, seq_len, block)[1].queries == slice(126, 168)
