"""Anchors, block inputs, positions and labels (docs/architecture.md, docs/conventions.md) against naive references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dflashtrain.data.blocks import anchor_candidates, make_blocks, sample_anchors
from reference import ref_blocks, ref_candidates

MASK = 99
FIELDS = ("input_ids", "position_ids", "label_ids", "label_positions", "drafted", "slot_valid")


def _as_lists(blocks):
    return {name: getattr(blocks, name).tolist() for name in FIELDS}


def _check_against_reference(input_ids, loss_mask, anchors, keep, block_size, label_offset):
    blocks = make_blocks(
        torch.tensor(input_ids), torch.tensor(loss_mask), torch.tensor(anchors), torch.tensor(keep),
        block_size, MASK, label_offset,
    )
    expected = ref_blocks(input_ids, loss_mask, anchors, keep, block_size, MASK, label_offset)
    got = _as_lists(blocks)
    assert blocks.anchor_positions.tolist() == anchors
    assert blocks.block_keep.tolist() == keep
    for name in FIELDS:
        assert getattr(blocks, name).shape == (len(anchors), len(anchors[0]), block_size), name
    for b in range(len(anchors)):
        for n in range(len(anchors[0])):
            # Every field of a kept block; a dummy block only has to be all MASK and supervise nothing.
            names = FIELDS if keep[b][n] else ("input_ids", "drafted", "slot_valid")
            for name in names:
                assert got[name][b][n] == expected[name][b][n], (name, b, n, anchors[b][n])
    return blocks


# ------------------------------------------------------------------------------------------- hand-computed case
HAND_IDS = [[10, 11, 12, 13, 14, 15, 16]]
HAND_MASK = [[0, 1, 1, 1, 0, 1, 1]]  # a hole at 4
HAND_ANCHORS = [[1, 5, 0]]  # block 1 runs past S = 7; block 2 is a dummy
HAND_KEEP = [[True, True, False]]


def test_make_blocks_hand_dflash_convention():
    blocks = make_blocks(
        torch.tensor(HAND_IDS), torch.tensor(HAND_MASK), torch.tensor(HAND_ANCHORS), torch.tensor(HAND_KEEP),
        4, MASK, 0,
    )
    assert blocks.input_ids.tolist() == [[[11, MASK, MASK, MASK], [15, MASK, MASK, MASK], [MASK] * 4]]
    assert blocks.position_ids[0, :2].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    # slot k predicts x[a + k]; slot 0 is the given anchor.
    assert blocks.label_positions[0, :2].tolist() == [[1, 2, 3, 4], [5, 6, 6, 6]]
    assert blocks.label_ids[0, :2].tolist() == [[11, 12, 13, 14], [15, 16, 0, 0]]
    assert blocks.drafted.tolist() == [[[False, True, True, True], [False, True, True, True], [False] * 4]]
    assert blocks.slot_valid.tolist() == [[[False, True, True, False], [False, True, False, False], [False] * 4]]


def test_make_blocks_hand_next_token_convention():
    blocks = make_blocks(
        torch.tensor(HAND_IDS), torch.tensor(HAND_MASK), torch.tensor(HAND_ANCHORS), torch.tensor(HAND_KEEP),
        4, MASK, 1,
    )
    assert blocks.input_ids.tolist() == [[[11, MASK, MASK, MASK], [15, MASK, MASK, MASK], [MASK] * 4]]
    assert blocks.position_ids[0, :2].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    # slot k predicts x[a + k + 1]; every slot drafted.
    assert blocks.label_positions[0, :2].tolist() == [[2, 3, 4, 5], [6, 6, 6, 6]]
    assert blocks.label_ids[0, :2].tolist() == [[12, 13, 14, 15], [16, 0, 0, 0]]
    assert blocks.drafted.tolist() == [[[True] * 4, [True] * 4, [False] * 4]]
    assert blocks.slot_valid.tolist() == [[[True, True, False, True], [True, False, False, False], [False] * 4]]


def test_make_blocks_rejects_unknown_label_offset():
    with pytest.raises(ValueError):
        make_blocks(torch.tensor(HAND_IDS), torch.tensor(HAND_MASK), torch.tensor(HAND_ANCHORS),
                    torch.tensor(HAND_KEEP), 4, MASK, 2)


# ------------------------------------------------------------------------------------------- random vs reference
def _random_batch(rng: random.Random, seq_len: int, lengths, vocab: int = 50):
    """Right-padded batch: pad id 0 and loss 0 after each row's length; loss-mask holes inside."""
    ids, mask = [], []
    for length in lengths:
        row_ids = [rng.randrange(1, vocab) for _ in range(length)] + [0] * (seq_len - length)
        row_mask = [1 if rng.random() < 0.7 else 0 for _ in range(length)] + [0] * (seq_len - length)
        ids.append(row_ids)
        mask.append(row_mask)
    return ids, mask


@pytest.mark.parametrize("label_offset", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_make_blocks_matches_naive_reference(label_offset, seed):
    rng = random.Random(seed)
    seq_len, block_size, num_anchors = 24, 5, 6
    ids, mask = _random_batch(rng, seq_len, [24, 17, 11])
    anchors, keep = [], []
    # row 0: tail blocks that run past S (anchors S - 1, S - 2, S - 4) plus random ones
    tail = [seq_len - 1, seq_len - 2, seq_len - 4]
    rest = rng.sample([a for a in range(seq_len - 4)], num_anchors - len(tail))
    anchors.append(sorted(rest + tail))
    keep.append([True] * num_anchors)
    # row 1: random anchors inside the padded row (some land on padding / holes)
    anchors.append(sorted(rng.sample(range(seq_len), num_anchors)))
    keep.append([True] * num_anchors)
    # row 2: three real anchors then three dummies
    anchors.append(sorted(rng.sample(range(11), 3)) + [0, 0, 0])
    keep.append([True] * 3 + [False] * 3)
    _check_against_reference(ids, mask, anchors, keep, block_size, label_offset)


@pytest.mark.parametrize("label_offset", [0, 1])
def test_make_blocks_from_sampled_anchors_matches_reference(label_offset):
    rng = random.Random(7)
    seq_len, block_size, num_anchors = 32, 8, 9
    ids, mask = _random_batch(rng, seq_len, [32, 20, 9, 32])
    gen = torch.Generator().manual_seed(11)
    anchors, keep = sample_anchors(torch.tensor(mask), num_anchors, generator=gen)
    _check_against_reference(ids, mask, anchors.tolist(), keep.tolist(), block_size, label_offset)


def test_dummy_blocks_are_all_mask_and_supervise_nothing():
    ids = [[5, 6, 7, 8, 9, 10]]
    mask = [[1] * 6]
    for offset in (0, 1):
        blocks = make_blocks(torch.tensor(ids), torch.tensor(mask), torch.tensor([[2, 0, 0]]),
                             torch.tensor([[True, False, False]]), 3, MASK, offset)
        assert (blocks.input_ids[0, 1:] == MASK).all()
        assert not blocks.drafted[0, 1:].any()
        assert not blocks.slot_valid[0, 1:].any()
        assert blocks.input_ids[0, 0, 0].item() == 7
        assert blocks.slot_valid[0, 0].tolist() == ([False, True, True] if offset == 0 else [True, True, True])


def test_chunk_slices_blocks():
    blocks = make_blocks(torch.tensor(HAND_IDS), torch.tensor(HAND_MASK), torch.tensor(HAND_ANCHORS),
                         torch.tensor(HAND_KEEP), 4, MASK, 0)
    sub = blocks.chunk(1, 3)
    assert sub.anchor_positions.tolist() == [[5, 0]]
    assert sub.block_keep.tolist() == [[True, False]]
    assert sub.slot_valid.tolist() == [[[False, True, False, False], [False] * 4]]
    assert sub.block_size == 4


# ------------------------------------------------------------------------------------------------ sample_anchors
def test_anchor_candidates_hand():
    lm = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    assert anchor_candidates(lm).tolist() == [
        [True, False, False, True, True, False, False],
        [False, False, False, False, False, False, True],
    ]


def _check_anchor_properties(mask_rows, anchors, keep, num_anchors):
    assert anchors.shape == (len(mask_rows), num_anchors)
    assert keep.shape == (len(mask_rows), num_anchors)
    assert anchors.dtype == torch.long and keep.dtype == torch.bool
    for row, a_row, k_row in zip(mask_rows, anchors.tolist(), keep.tolist()):
        candidates = ref_candidates(row)
        real = [a for a, k in zip(a_row, k_row) if k]
        n_real = min(num_anchors, len(candidates))
        assert k_row == [True] * n_real + [False] * (num_anchors - n_real)  # real anchors first, then dummies
        assert all(a in candidates for a in real)  # only candidates (a <= S - 2, both supervised)
        assert real == sorted(set(real))  # sorted, no duplicates
        if len(candidates) <= num_anchors:
            assert real == candidates  # all taken when there are not more than N
        assert all(a == 0 for a, k in zip(a_row, k_row) if not k)  # dummies hold 0


@pytest.mark.parametrize("num_anchors", [1, 4, 12, 29, 40])
def test_sample_anchors_properties(num_anchors):
    rng = random.Random(num_anchors)
    seq_len = 30
    rows = []
    for density in (0.0, 0.2, 0.5, 0.8, 1.0, 0.9):
        rows.append([1 if rng.random() < density else 0 for _ in range(seq_len)])
    rows.append([0] * 28 + [1, 1])  # the only candidate is S - 2
    rows.append([1] + [0] * 29)  # a lone supervised token: no candidate
    gen = torch.Generator().manual_seed(num_anchors)
    anchors, keep = sample_anchors(torch.tensor(rows), num_anchors, generator=gen)
    _check_anchor_properties(rows, anchors, keep, num_anchors)
    assert keep[6].sum().item() == 1 and anchors[6, 0].item() == seq_len - 2
    assert not keep[7].any()


def test_sample_anchors_last_position_never_an_anchor():
    rows = [[0] * 9 + [1], [1] * 10]
    anchors, keep = sample_anchors(torch.tensor(rows), 10, generator=torch.Generator().manual_seed(0))
    assert not keep[0].any()
    assert anchors[1][keep[1]].tolist() == list(range(9))  # 0..S-2, never S-1


def test_sample_anchors_deterministic_with_seed():
    rows = torch.tensor([[1 if (i * 7) % 5 else 0 for i in range(40)]] * 3)
    a1, k1 = sample_anchors(rows, 6, generator=torch.Generator().manual_seed(123))
    a2, k2 = sample_anchors(rows, 6, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a1, a2) and torch.equal(k1, k2)


def test_sample_anchors_uniform_over_candidates():
    """Each candidate is chosen with probability N / C per row: count ~ Binomial(T, N / C)."""
    row = [1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1]
    candidates = ref_candidates(row)
    num_candidates, num_anchors, trials = len(candidates), 4, 4000
    assert num_candidates == 10
    anchors, keep = sample_anchors(
        torch.tensor([row] * trials), num_anchors, generator=torch.Generator().manual_seed(2024)
    )
    assert keep.all()  # C > N: every column is a real anchor
    counts = torch.bincount(anchors.flatten(), minlength=len(row)).tolist()
    p = num_anchors / num_candidates
    mean, std = trials * p, math.sqrt(trials * p * (1 - p))
    for pos in range(len(row)):
        if pos in candidates:
            assert abs(counts[pos] - mean) < 5 * std, (pos, counts[pos], mean, std)
        else:
            assert counts[pos] == 0, pos
    # No duplicates in any row (without replacement).
    assert (anchors.sort(dim=1).values.diff(dim=1) > 0).all()
