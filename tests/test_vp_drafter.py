"""Objective ``vp_drafter`` (docs/objectives.md, vp_drafter): prefix sampling, block inputs, weights, masks, loss, config and CLI.

Expectations are the vectors of docs/objectives.md, hand-computed tensors, or the float64 loop :func:`_naive_vp` written from docs/objectives.md
without the code under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from dflashtrain.data.sampling import RowGenerators
from dflashtrain.objectives import build_objective
from omegaconf import OmegaConf

from factories import make_objective
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.losses import DEFAULT_PREFIX_WEIGHT_BASE, MaskMode, TargetKind
from dflashtrain.config.schema import register_configs
from dflashtrain.config.checks import validate
from dflashtrain.data.blocks import make_blocks
from dflashtrain.objectives.protocol import SlotChunk
from dflashtrain.objectives.vp import (
    VPDrafterObjective,
    apply_visible_prefix,
    prefix_length_probs,
    sample_prefix_lengths,
    vp_supervision_mask,
)
from dflashtrain.objectives.weights import decay_weights, first_drafted_offsets
from reference import ref_ce, ref_soft_ce, ref_softmax

MASK = 99
P_B16 = [.129663, .116696, .105027, .094524, .085072, .076565, .068908, .062017,
         .055816, .050234, .045211, .040690, .036621, .032959]  # p = 2..15, base 0.9
P_B8 = [.213420, .192078, .172870, .155583, .140025, .126023]  # p = 2..7, base 0.9

register_configs()


# ------------------------------------------------------------------------------------------- prefix sampling
@pytest.mark.parametrize("block_size,expected", [(16, P_B16), (8, P_B8)])
def test_spec_prefix_probabilities(block_size, expected):
    lengths, probs = prefix_length_probs(block_size, 0.9)
    assert lengths.tolist() == list(range(2, block_size))
    torch.testing.assert_close(probs, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=6e-7)


def test_spec_expected_prefix_length_block16():
    lengths, probs = prefix_length_probs(16, 0.9)
    assert abs((lengths.double() * probs).sum().item() - 6.847228) < 1e-6


def test_base_half_and_uniform():
    lengths, probs = prefix_length_probs(4, 0.5)
    assert lengths.tolist() == [2, 3]
    torch.testing.assert_close(probs, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), rtol=0, atol=1e-12)
    for block_size in (4, 16):
        _, probs = prefix_length_probs(block_size, 1.0)
        torch.testing.assert_close(probs, torch.full_like(probs, 1 / (block_size - 2)), rtol=0, atol=1e-12)


def test_include_anchor_only_starts_at_one():
    lengths, probs = prefix_length_probs(4, 0.5, include_anchor_only=True)
    assert lengths.tolist() == [1, 2, 3]
    torch.testing.assert_close(probs, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_size,anchor_only,only", [(3, False, 2), (2, False, 1), (2, True, 1)])
def test_degenerate_block_sizes(block_size, anchor_only, only):
    lengths, probs = prefix_length_probs(block_size, 0.9, anchor_only)
    assert lengths.tolist() == [only] and probs.tolist() == [1.0]
    draws = sample_prefix_lengths(4, 5, block_size, 0.9, anchor_only, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4, 5) and (draws == only).all()


def test_extreme_bases_do_not_overflow():
    for base in (1e-30, 1e30):
        _, probs = prefix_length_probs(16, base)
        assert torch.isfinite(probs).all() and abs(probs.sum().item() - 1) < 1e-12


@pytest.mark.parametrize("block_size,base", [(16, 0.9), (8, 0.9), (4, 0.5)])
def test_sampler_frequencies_match_probabilities(block_size, base):
    """Empirical frequencies of the real sampler within 5 binomial standard deviations of P(p)."""
    batch, num_blocks = 50, 2000  # n = 100 000 draws
    n = batch * num_blocks
    draws = sample_prefix_lengths(batch, num_blocks, block_size, base, generator=torch.Generator().manual_seed(7))
    assert draws.shape == (batch, num_blocks) and draws.dtype == torch.long
    lengths, probs = prefix_length_probs(block_size, base)
    assert set(draws.unique().tolist()) <= set(lengths.tolist())
    for p, prob in zip(lengths.tolist(), probs.tolist()):
        freq = (draws == p).double().mean().item()
        assert abs(freq - prob) < 5 * math.sqrt(prob * (1 - prob) / n), (p, freq, prob)
    mean = (lengths.double() * probs).sum().item()
    std = math.sqrt(((lengths.double() - mean) ** 2 * probs).sum().item())
    assert abs(draws.double().mean().item() - mean) < 5 * std / math.sqrt(n)


def test_sampler_is_row_major_over_sequences_and_blocks():
    """[batch, N] is the flat draw reshaped: block n of sequence i is draw i·N + n."""
    flat = sample_prefix_lengths(1, 15, 16, 0.9, generator=torch.Generator().manual_seed(3))
    grid = sample_prefix_lengths(3, 5, 16, 0.9, generator=torch.Generator().manual_seed(3))
    assert grid.tolist() == flat.view(3, 5).tolist()
    assert len(set(grid.flatten().tolist())) > 1  # p varies per block


# ------------------------------------------------------------------------------------------- blocks
def _blocks(input_ids, anchors, keep, block_size, loss_mask=None):
    ids = torch.tensor(input_ids)
    mask = torch.ones_like(ids) if loss_mask is None else torch.tensor(loss_mask)
    return ids, make_blocks(ids, mask, torch.tensor(anchors), torch.tensor(keep), block_size, MASK, 0)


def test_spec_block_input():
    ids, blocks = _blocks([[10 + t for t in range(12)]], [[2]], [[True]], 6)
    vp = apply_visible_prefix(blocks, ids, torch.tensor([[3]]))
    assert vp.input_ids.tolist() == [[[12, 13, 14, 99, 99, 99]]]
    assert vp.drafted.tolist() == [[[False, False, False, True, True, True]]]
    assert vp.label_ids[vp.slot_valid].tolist() == [15, 16, 17]
    assert vp.position_ids.tolist() == blocks.position_ids.tolist()  # positions a + k, unchanged


def test_spec_tail_block_input():
    """anchor 8, S = 10, B = 6, p = 3: slot 2 (position 10) is out of range, so MASK; nothing supervised."""
    ids, blocks = _blocks([[10 + t for t in range(10)]], [[8]], [[True]], 6)
    vp = apply_visible_prefix(blocks, ids, torch.tensor([[3]]))
    assert vp.input_ids.tolist() == [[[18, 19, 99, 99, 99, 99]]]
    assert not vp.slot_valid.any()


def test_dummy_blocks_stay_masked_and_loss_mask_holes_are_unsupervised():
    ids = [[10 + t for t in range(12)]]
    loss_mask = [[1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]]  # a hole at position 6
    ids_t, blocks = _blocks(ids, [[1, 0]], [[True, False]], 6, loss_mask)
    vp = apply_visible_prefix(blocks, ids_t, torch.tensor([[2, 4]]))
    assert vp.input_ids.tolist() == [[[11, 12, 99, 99, 99, 99], [99] * 6]]
    assert vp.drafted.tolist() == [[[False, False, True, True, True, True], [False] * 6]]
    assert vp.slot_valid.tolist() == [[[False, False, True, True, True, False], [False] * 6]]


def test_prepare_blocks_samples_and_applies_the_prefix():
    torch.manual_seed(11)
    ids, blocks = _blocks([[10 + t for t in range(40)]] * 2, [[0, 9, 20, 0], [3, 30, 0, 0]],
                          [[True, True, True, False], [True, True, False, False]], 8)
    rng = RowGenerators(seed=11, epoch=0, row_keys=[0, 1], device=torch.device("cpu"))
    vp = make_objective("vp_drafter", prefix_weight_base=0.9, gamma=4.0).prepare_blocks(blocks, ids, rng)
    first = vp.drafted.float().argmax(dim=-1)  # p of every kept block
    keep = blocks.block_keep
    assert ((first >= 2) & (first <= 7))[keep].all()
    assert not vp.drafted[~keep].any() and (vp.input_ids[~keep] == MASK).all()
    expected = apply_visible_prefix(blocks, ids, torch.where(keep, first, torch.ones_like(first)))
    assert vp.input_ids.tolist() == expected.input_ids.tolist()
    assert vp.slot_valid.tolist() == expected.slot_valid.tolist()


# ------------------------------------------------------------------------------------------- weights, masks, loss
def _suffix_drafted(block_size: int, p: int) -> torch.Tensor:
    return (torch.arange(block_size) >= p).unsqueeze(0)


def test_spec_weights_block6_p3_gamma7():
    weights = decay_weights(first_drafted_offsets(_suffix_drafted(6, 3)), 7.0)[0]
    torch.testing.assert_close(weights, torch.tensor([0, 0, 0, 1, .866878, .751477]), rtol=0, atol=1e-6)


def _chunk_from_ce(ce, p):
    """One block whose per-slot hard CE is exactly ``ce`` (V = 2, label 0): logits = [−CE, ln(1 − e^−CE)]."""
    ce = torch.tensor(ce, dtype=torch.float64)
    logits = torch.stack([-ce, torch.log1p(-torch.exp(-ce))], dim=-1).float().view(1, 1, len(ce), 2)
    drafted = _suffix_drafted(len(ce), p).view(1, 1, -1)
    labels = torch.zeros(1, 1, len(ce), dtype=torch.long)
    return SlotChunk(logits=logits.requires_grad_(True), labels=labels, valid=drafted.clone(), drafted=drafted)


def test_spec_loss_vector():
    chunk = _chunk_from_ce([9, 9, 0.5, 1, 2], p=2)
    out = make_objective("vp_drafter", gamma=4.0)(chunk)
    torch.testing.assert_close(out.slot_weight_sum, torch.tensor([0, 0, 1, .778801, .606531]), rtol=0, atol=1e-6)
    assert abs((out.terms["ce"] / out.weight_sum).item() - 1.044660) < 1e-6


def test_prefix_ce_changes_neither_loss_nor_gradient():
    """Huge prefix CEs (and labels valid there) must not reach the loss or the gradient."""
    objective = make_objective("vp_drafter", gamma=4.0)
    small, huge = _chunk_from_ce([0.1, 0.1, 0.5, 1, 2], p=2), _chunk_from_ce([1e4, 3e4, 0.5, 1, 2], p=2)
    huge.valid = torch.ones_like(huge.valid)  # raw validity at the prefix must not leak in either
    losses = []
    for chunk in (small, huge):
        out = objective(chunk)
        loss = out.terms["ce"] / out.weight_sum
        loss.backward()
        losses.append(loss.item())
        assert torch.isfinite(chunk.logits.grad).all()
        assert (chunk.logits.grad[..., :2, :] == 0).all()
    assert losses[0] == losses[1]
    assert torch.equal(small.logits.grad, huge.logits.grad)


@pytest.mark.parametrize("mode,expected", [("cumulative", [0, 0, 1, 0, 0, 0]), ("independent", [0, 0, 1, 0, 1, 1])])
def test_spec_mask_modes(mode, expected):
    valid = torch.tensor([[1, 1, 1, 0, 1, 1]]).bool()
    mask = vp_supervision_mask(valid, _suffix_drafted(6, 2), MaskMode(mode))
    assert mask.long().tolist() == [expected]


def test_cumulative_prefix_passes_through_whatever_its_validity():
    valid = torch.tensor([[0, 0, 0, 1, 1, 0]]).bool()  # prefix (p = 3) all invalid: the suffix still counts
    mask = vp_supervision_mask(valid, _suffix_drafted(6, 3), MaskMode.cumulative)
    assert mask.long().tolist() == [[0, 0, 0, 1, 1, 0]]


def test_tail_block_adds_nothing():
    """A block with nothing supervised (the tail vector) leaves numerator and denominator as they were."""
    ids = torch.tensor([[10 + t for t in range(10)]])
    blocks = make_blocks(ids, torch.ones_like(ids), torch.tensor([[2, 8]]), torch.tensor([[True, True]]), 6, MASK, 0)
    vp = apply_visible_prefix(blocks, ids, torch.tensor([[3, 3]]))
    logits = torch.randn(1, 2, 6, 20, generator=torch.Generator().manual_seed(0))
    both = make_objective("vp_drafter", gamma=7.0)(SlotChunk(logits, vp.label_ids, vp.slot_valid, vp.drafted))

    def block_sums(n):
        sub = vp.chunk(n, n + 1)
        return make_objective("vp_drafter", gamma=7.0)(SlotChunk(logits[:, n:n + 1], sub.label_ids, sub.slot_valid, sub.drafted))

    first, tail = block_sums(0), block_sums(1)
    assert tail.terms["ce"].item() == tail.weight_sum.item() == tail.token_sum.item() == 0.0
    assert both.terms["ce"].item() == pytest.approx(first.terms["ce"].item(), rel=1e-6)
    assert both.weight_sum.item() == pytest.approx(first.weight_sum.item(), rel=1e-6)
    assert both.weight_sum.item() == pytest.approx(1 + .866878 + .751477, abs=1e-6)
    assert both.token_sum.item() == 3


# ------------------------------------------------------------------------------------------- naive reference
def _naive_vp(ids, loss_mask, anchors, keep, prefix, block_size, logits, teacher, gamma, mode, target):
    """Σ w·m·ℓ, Σ w·m and d(Σ w·m·ℓ / Σ w·m)/d logits in float64 loops, from docs/objectives.md alone."""
    num = den = 0.0
    entries = []  # (i, n, k, w)
    for i, row in enumerate(ids):
        seq_len = len(row)
        for n, a in enumerate(anchors[i]):
            if not keep[i][n]:
                continue
            p = prefix[i][n]
            alive = True  # cumulative: every earlier suffix slot supervised
            for k in range(p, block_size):
                supervised = a + k < seq_len and loss_mask[i][a + k] == 1
                alive = alive and supervised
                if not (supervised and (alive or mode == "independent")):
                    continue
                w = math.exp(-(k - p) / gamma) if gamma else 1.0
                row_logits = logits[i][n][k]
                if target == "hard":
                    loss = ref_ce(row_logits, row[a + k])
                else:
                    loss = ref_soft_ce(row_logits, teacher[i][n][k])
                num, den = num + w * loss, den + w
                entries.append((i, n, k, w))
    grad = torch.zeros(len(logits), len(logits[0]), block_size, len(logits[0][0][0]), dtype=torch.float64)
    for i, n, k, w in entries:
        q = ref_softmax(logits[i][n][k])
        if target == "hard":
            t = [1.0 if v == ids[i][anchors[i][n] + k] else 0.0 for v in range(len(q))]
        else:
            t = ref_softmax(teacher[i][n][k])
        grad[i, n, k] = torch.tensor([w * (qv - tv) / den for qv, tv in zip(q, t)], dtype=torch.float64)
    return num, den, grad


@pytest.mark.parametrize("target", ["hard", "kd"])
@pytest.mark.parametrize("mode", ["independent", "cumulative"])
def test_objective_matches_naive_loop(target, mode):
    gen = torch.Generator().manual_seed(["hard", "kd"].index(target) * 2 + ["independent", "cumulative"].index(mode))
    block_size, vocab, seq_len = 6, 7, 16
    ids = torch.randint(0, vocab, (2, seq_len), generator=gen)
    loss_mask = (torch.rand(2, seq_len, generator=gen) < 0.8).long()
    anchors = torch.tensor([[1, 5, 12, 0], [0, 7, 13, 0]])
    keep = torch.tensor([[True, True, True, False], [True, True, True, False]])
    prefix = sample_prefix_lengths(2, 4, block_size, 0.9, generator=gen)
    vp = apply_visible_prefix(make_blocks(ids, loss_mask, anchors, keep, block_size, MASK, 0), ids, prefix)
    logits = (torch.randn(2, 4, block_size, vocab, generator=gen) * 2).requires_grad_(True)
    teacher = torch.randn(2, 4, block_size, vocab, generator=gen) * 2
    chunk = SlotChunk(logits, vp.label_ids, vp.slot_valid, vp.drafted, teacher if target == "kd" else None)
    objective = make_objective("vp_drafter", gamma=4.0, mask_mode=MaskMode(mode), target=TargetKind(target))
    assert objective.needs_teacher == (target == "kd") and objective.label_offset == 0
    out = objective(chunk)
    num, den, grad = _naive_vp(ids.tolist(), loss_mask.tolist(), anchors.tolist(), keep.tolist(), prefix.tolist(),
                               block_size, logits.tolist(), teacher.tolist(), 4.0, mode, target)
    assert den > 0
    assert abs(out.terms["ce"].item() - num) < 1e-4 * max(1.0, num)
    assert abs(out.weight_sum.item() - den) < 1e-5 * max(1.0, den)
    (out.terms["ce"] / out.weight_sum).backward()
    torch.testing.assert_close(logits.grad.double(), grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- config and CLI
def _compose(overrides=()):
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("train", overrides=["loss=vp_drafter", *overrides])
    cfg.paths.output_dir = "/tmp/unused"
    return cfg


@pytest.mark.parametrize("block_size,gamma", [(8, 4.0), (16, 7.0)])
def test_config_composes_with_decay_gamma_default(block_size, gamma):
    cfg = _compose([f"model.drafter.block_size={block_size}"])
    assert cfg.loss.gamma == gamma and cfg.loss.prefix_weight_base == DEFAULT_PREFIX_WEIGHT_BASE
    objective = build_objective(OmegaConf.to_object(cfg.loss))
    assert isinstance(objective, VPDrafterObjective) and objective.name == "vp_drafter"
    assert objective.mask_mode == MaskMode.independent and not objective.include_anchor_only


def test_null_base_means_default():
    cfg = _compose(["loss.prefix_weight_base=null"])
    OmegaConf.to_object(cfg.loss).validate()
    assert build_objective(OmegaConf.to_object(cfg.loss)).prefix_weight_base == 0.9


@pytest.mark.parametrize("base", ["0", "-1"])
def test_non_positive_base_fails_validation_naming_the_key(base, tmp_path):
    cfg = _compose([f"loss.prefix_weight_base={base}"])
    with pytest.raises(ConfigError) as info:
        OmegaConf.to_object(cfg.loss).validate()
    assert info.value.key == "loss.prefix_weight_base"
    (tmp_path / "config.json").write_text("{}")  # validate() needs a target dir and a data file, not weights
    (tmp_path / "train.jsonl").write_text("")
    cfg.model.target.path, cfg.data.path = str(tmp_path), str(tmp_path / "train.jsonl")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == "loss.prefix_weight_base"


def test_unknown_objective_lists_valid_ones():
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        with pytest.raises(ConfigCompositionException) as info:
            compose("train", overrides=["loss=vp"])
    message = str(info.value)
    assert "loss/vp" in message and "vp_drafter" in message and "decay" in message


def test_cli_rejects_zero_base_before_loading_weights(tmp_path):
    """The target dir holds only a config.json: reaching any weight load would fail differently."""
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text("")
    cli = Path(sys.executable).with_name("dflashtrain")
    result = subprocess.run(
        [str(cli), "loss=vp_drafter", "loss.prefix_weight_base=0", f"model.target.path={tmp_path / 'target'}",
         f"data.path={tmp_path / 'train.jsonl'}", f"paths.output_dir={tmp_path / 'out'}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    assert result.returncode == 2, result.stderr
    assert "loss.prefix_weight_base" in result.stderr
    assert not (tmp_path / "out").exists()  # failed before writing anything
