"""Rows per rank and per step, reproducible from the seed: global batches, resume positions, per-row draws."""

from __future__ import annotations

import pytest
import torch

from dflashtrain.data.blocks import sample_anchors
from dflashtrain.data.sampling import GlobalBatchSampler, RowGenerators


def batches(num_rows, batch_size, world_size, rank, shuffle=True, seed=0, epoch=0):
    sampler = GlobalBatchSampler(num_rows, batch_size, shuffle, seed, rank, world_size)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("num_rows", [24, 23, 5])
def test_ranks_split_exactly_the_global_batches_of_one_process(num_rows):
    one = batches(num_rows, 6, 1, 0)
    per_rank = [batches(num_rows, 3, 2, rank) for rank in range(2)]
    assert len(one) == len(per_rank[0]) == len(per_rank[1]) == -(-num_rows // 6)
    for g, batch in enumerate(one):
        assert per_rank[0][g] + per_rank[1][g] == batch  # rank r holds the r-th slice of global batch g
        assert len(batch) == 6  # the last global batch is completed by wrapping around
    seen = [i for batch in one for i in batch]
    assert sorted(set(seen)) == list(range(num_rows))  # every row in every epoch


def test_order_depends_on_seed_and_epoch_only():
    assert batches(50, 4, 1, 0, epoch=1) == batches(50, 4, 1, 0, epoch=1)
    assert batches(50, 4, 1, 0, epoch=1) != batches(50, 4, 1, 0, epoch=2)
    assert batches(50, 4, 1, 0, seed=1) != batches(50, 4, 1, 0, seed=2)
    assert batches(12, 4, 1, 0, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_a_resume_position_skips_exactly_the_batches_done_once():
    sampler = GlobalBatchSampler(40, 4, True, 0, 0, 1)
    full = list(sampler)
    sampler.set_position(epoch=0, batches_done=3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # the next iteration (epoch) starts at the beginning
    sampler.set_position(epoch=2, batches_done=1)
    sampler.set_epoch(2)  # Lightning announces the same epoch: the position stays
    assert list(sampler) == batches(40, 4, 1, 0, epoch=2)[1:]


def test_row_draws_do_not_depend_on_the_batch_or_its_padding():
    together = RowGenerators(0, 1, [7, 3, 9], torch.device("cpu")).uniform(16)
    alone = RowGenerators(0, 1, [3], torch.device("cpu")).uniform(16)
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(RowGenerators(0, 2, [3], torch.device("cpu")).uniform(16), alone)  # a new epoch
    loss_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    short, long = loss_mask[:, :9], loss_mask  # the same row padded to 9 or to 12 positions
    uniforms = RowGenerators(0, 0, [5], torch.device("cpu")).uniform(12)
    assert torch.equal(sample_anchors(short, 3, uniforms=uniforms)[0], sample_anchors(long, 3, uniforms=uniforms)[0])
