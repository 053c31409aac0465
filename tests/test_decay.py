"""Objective ``decay`` (docs/objectives.md, decay) and the shared per-slot pieces, against the decay vector and naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from factories import make_objective
from dflashtrain.config.losses import MaskMode, TargetKind
from dflashtrain.objectives.protocol import SlotChunk
from dflashtrain.objectives.slots import cumulative_mask, supervision_mask
from dflashtrain.objectives.weights import decay_weights, first_drafted_offsets
from reference import ref_ce, ref_decay_weight, ref_soft_ce, ref_softmax, ref_supervision

SPEC_VECTOR = [1.0, 0.778801, 0.606531, 0.472367, 0.367879, 0.286505, 0.223130]  # γ = 4, B = 8, k = 1..7


def _dflash_drafted(block_size: int, blocks: int = 1) -> torch.Tensor:
    return (torch.arange(block_size) >= 1).expand(blocks, block_size)


def test_spec_vector_gamma4_block8():
    weights = decay_weights(first_drafted_offsets(_dflash_drafted(8)), 4.0)[0]
    assert weights[0].item() == 0.0  # slot 0 (the anchor) weighs nothing
    torch.testing.assert_close(weights[1:], torch.tensor(SPEC_VECTOR), rtol=0, atol=1e-6)
    # The same vector from the int form (offsets 0..6).
    torch.testing.assert_close(decay_weights(7, 4.0), torch.tensor(SPEC_VECTOR), rtol=0, atol=1e-6)


def test_next_token_convention_weights():
    drafted = torch.ones(1, 6, dtype=torch.bool)  # every slot drafted: w_k = exp(-k / γ)
    weights = decay_weights(first_drafted_offsets(drafted), 7.0)[0]
    expected = torch.tensor([math.exp(-k / 7.0) for k in range(6)])
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)


def test_first_drafted_offsets_hand():
    drafted = torch.tensor([[False, True, True, True], [True, True, True, True],
                            [False, False, True, True], [False, False, False, False]])
    offsets = first_drafted_offsets(drafted)
    assert offsets[0].tolist() == [-1, 0, 1, 2]
    assert offsets[1].tolist() == [0, 1, 2, 3]
    assert offsets[2].tolist() == [-2, -1, 0, 1]
    assert (offsets[3] < 0).all()  # nothing drafted: every weight 0
    assert decay_weights(offsets, 3.0)[3].tolist() == [0.0] * 4


@pytest.mark.parametrize("gamma", [0, 0.0, None])
def test_gamma_zero_or_none_disables_decay(gamma):
    assert decay_weights(16, gamma).tolist() == [1.0] * 16
    weights = decay_weights(first_drafted_offsets(_dflash_drafted(16)), gamma)[0]
    assert weights.tolist() == [0.0] + [1.0] * 15


def test_default_block16_gamma7():
    weights = decay_weights(first_drafted_offsets(_dflash_drafted(16)), 7.0)[0]
    expected = [0.0] + [math.exp(-(k - 1) / 7.0) for k in range(1, 16)]
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=0, atol=1e-6)


def test_cumulative_mask_hand():
    drafted = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    valid = torch.tensor([[False, True, False, True, True], [True, True, True, False, True]])
    assert cumulative_mask(valid, drafted).tolist() == [
        [False, True, False, False, False],
        [True, True, True, False, False],
    ]
    assert supervision_mask(valid, drafted, MaskMode.independent).tolist() == valid.tolist()


# ------------------------------------------------------------------------------------------- random chunk vs loop
def _random_chunk(seed: int, with_teacher: bool = False, block_size: int = 6, vocab: int = 9):
    gen = torch.Generator().manual_seed(seed)
    b, c = 2, 4
    logits = torch.randn(b, c, block_size, vocab, generator=gen) * 2.0
    labels = torch.randint(0, vocab, (b, c, block_size), generator=gen)
    keep = torch.tensor([[True, True, True, False], [True, True, False, False]])
    drafted = (torch.arange(block_size) >= 1) & keep.unsqueeze(-1)
    valid = drafted & (torch.rand(b, c, block_size, generator=gen) < 0.75)
    valid[0, 0] = drafted[0, 0]  # one fully valid block
    teacher = torch.randn(b, c, block_size, vocab, generator=gen) * 2.0 if with_teacher else None
    return SlotChunk(logits=logits, labels=labels, valid=valid, drafted=drafted, teacher_logits=teacher)


def _naive(chunk: SlotChunk, gamma, mode: str, target: str):
    """Σ w·m·ℓ, Σ w·m, Σ m, per-slot Σ w·m, and d(Σ w·m·ℓ / Σ w·m)/d logits, all in float64 loops."""
    b, c, block_size, vocab = chunk.logits.shape
    logits, labels = chunk.logits.tolist(), chunk.labels.tolist()
    valid, drafted = chunk.valid.tolist(), chunk.drafted.tolist()
    teacher = chunk.teacher_logits.tolist() if chunk.teacher_logits is not None else None
    num = den = tokens = 0.0
    per_slot = [0.0] * block_size
    wm = [[[0.0] * block_size for _ in range(c)] for _ in range(b)]
    for i in range(b):
        for n in range(c):
            m = ref_supervision(valid[i][n], drafted[i][n], mode)
            first = next((k for k in range(block_size) if drafted[i][n][k]), None)
            for k in range(block_size):
                if not m[k]:
                    continue
                w = ref_decay_weight(k, first, gamma)
                if target == "hard":
                    loss = ref_ce(logits[i][n][k], labels[i][n][k])
                else:
                    loss = ref_soft_ce(logits[i][n][k], teacher[i][n][k])
                num += w * loss
                den += w
                tokens += 1
                per_slot[k] += w
                wm[i][n][k] = w
    grad = torch.zeros(b, c, block_size, vocab, dtype=torch.float64)
    for i in range(b):
        for n in range(c):
            for k in range(block_size):
                if wm[i][n][k] == 0.0:
                    continue
                p = ref_softmax(logits[i][n][k])
                if target == "hard":
                    q = [1.0 if v == labels[i][n][k] else 0.0 for v in range(vocab)]
                else:
                    q = ref_softmax(teacher[i][n][k])
                for v in range(vocab):
                    grad[i, n, k, v] = wm[i][n][k] * (p[v] - q[v]) / den
    return num, den, tokens, per_slot, grad


@pytest.mark.parametrize("target", ["hard", "kd"])
@pytest.mark.parametrize("mode", ["independent", "cumulative"])
@pytest.mark.parametrize("gamma", [4.0, None])
def test_decay_objective_matches_naive_loop(target, mode, gamma):
    seed = ["hard", "kd"].index(target) * 4 + ["independent", "cumulative"].index(mode) * 2 + (gamma is None)
    chunk = _random_chunk(seed=seed, with_teacher=target == "kd")
    chunk.logits.requires_grad_(True)
    objective = make_objective("decay", gamma=gamma, mask_mode=MaskMode(mode), target=TargetKind(target))
    assert objective.label_offset == 0
    assert objective.needs_teacher == (target == "kd")
    out = objective(chunk)
    num, den, tokens, per_slot, grad = _naive(chunk, gamma, mode, target)
    assert set(out.terms) == {"ce"}
    assert abs(out.terms["ce"].item() - num) < 1e-4 * max(1.0, abs(num))
    assert abs(out.weight_sum.item() - den) < 1e-5 * max(1.0, den)
    assert out.token_sum.item() == tokens
    torch.testing.assert_close(out.slot_weight_sum.double(), torch.tensor(per_slot, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    (out.terms["ce"] / out.weight_sum).backward()
    torch.testing.assert_close(chunk.logits.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_cumulative_differs_from_independent_on_holes():
    chunk = _random_chunk(seed=1)
    assert (cumulative_mask(chunk.valid, chunk.drafted) != chunk.valid).any()  # the case is not trivial
    ind = make_objective("decay", gamma=4.0, mask_mode=MaskMode.independent)(chunk)
    cum = make_objective("decay", gamma=4.0, mask_mode=MaskMode.cumulative)(chunk)
    assert cum.token_sum.item() < ind.token_sum.item()


def test_spec_vector_through_the_objective():
    """All slots valid: Σ w·m per slot over 3 blocks is 3 × the decay vector; the loss is the weighted mean."""
    block_size, vocab = 8, 5
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, block_size, vocab, generator=gen)
    labels = torch.randint(0, vocab, (1, 3, block_size), generator=gen)
    drafted = _dflash_drafted(block_size, 3).unsqueeze(0)
    chunk = SlotChunk(logits=logits, labels=labels, valid=drafted.clone(), drafted=drafted)
    out = make_objective("decay", gamma=4.0)(chunk)
    expected = torch.tensor([0.0] + [3 * w for w in SPEC_VECTOR])
    torch.testing.assert_close(out.slot_weight_sum, expected, rtol=0, atol=1e-5)
    assert abs(out.weight_sum.item() - 3 * sum(SPEC_VECTOR)) < 1e-5
    assert out.token_sum.item() == 21



def test_unsupervised_slots_with_nonfinite_loss_do_not_poison_the_sums():
    """Σ w·m·ℓ must leave masked slots out entirely (0·inf would be NaN), e.g. an out-of-range label's slot."""
    chunk = _random_chunk(seed=4)
    chunk.logits[~chunk.valid] = float("inf")  # CE there is NaN
    out = make_objective("decay", gamma=4.0)(chunk)
    assert torch.isfinite(out.terms["ce"]) and torch.isfinite(out.weight_sum)
    num, den, _, _, _ = _naive(
        SlotChunk(logits=chunk.logits.masked_fill(~chunk.valid.unsqueeze(-1), 0.0), labels=chunk.labels,
                  valid=chunk.valid, drafted=chunk.drafted), 4.0, "independent", "hard")
    assert abs(out.terms["ce"].item() - num) < 1e-4 * max(1.0, num)
