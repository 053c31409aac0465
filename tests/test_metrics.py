"""Training metrics (docs/conventions.md) on hand-made tensors: acc, acc_k, tau_est, tau_cumprod."""

from __future__ import annotations

import pytest
import torch

from dflashtrain.objectives.metrics import SlotCounts, count_slots, summarize
from reference import ref_tau_block

T, F = True, False


def _t(rows):
    return torch.tensor(rows, dtype=torch.bool)


# DFlash convention, B = 5: slot 0 is the anchor (not drafted); the last block is a dummy.
DFLASH_CORRECT = _t([[[T, T, T, F, T], [F, T, T, T, T], [F, F, T, T, T], [T, T, T, T, T]]])
DFLASH_VALID = _t([[[F, T, T, T, T], [F, T, F, T, T], [F, T, T, T, T], [F, F, F, F, F]]])
DFLASH_DRAFTED = _t([[[F, T, T, T, T], [F, T, T, T, T], [F, T, T, T, T], [F, F, F, F, F]]])
DFLASH_KEEP = _t([[T, T, T, F]])


def test_count_slots_hand_dflash():
    counts = count_slots(DFLASH_CORRECT, DFLASH_VALID, DFLASH_DRAFTED, DFLASH_KEEP)
    assert counts.correct.tolist() == [0, 2, 2, 2, 3]  # correct AND valid, per slot
    assert counts.valid.tolist() == [0, 3, 2, 3, 3]
    # Leading correct drafted slots: block 0 -> 2 (slot 3 wrong), block 1 -> 1 (invalid slot 2 stops the run),
    # block 2 -> 0, the dummy block is not counted even though its "correct" is all True.
    assert counts.accepted.item() == 3
    assert counts.blocks.item() == 3


def test_summarize_hand_dflash():
    metrics = summarize(count_slots(DFLASH_CORRECT, DFLASH_VALID, DFLASH_DRAFTED, DFLASH_KEEP))
    assert metrics["acc"].item() == pytest.approx(9 / 11)
    assert "acc_k/0" not in metrics  # the anchor slot is never scored
    assert metrics["acc_k/1"].item() == pytest.approx(2 / 3)
    assert metrics["acc_k/2"].item() == pytest.approx(1.0)
    assert metrics["acc_k/3"].item() == pytest.approx(2 / 3)
    assert metrics["acc_k/4"].item() == pytest.approx(1.0)
    assert metrics["tau_est"].item() == pytest.approx(1 + 3 / 3)
    # 1 + 2/3 + 2/3·1 + 2/3·1·2/3 + 2/3·1·2/3·1
    assert metrics["tau_cumprod"].item() == pytest.approx(29 / 9)


def test_next_token_convention_hand():
    correct = _t([[[T, T, T], [F, T, T]]])
    valid = _t([[[T, T, F], [T, T, T]]])
    drafted = _t([[[T, T, T], [T, T, T]]])
    keep = _t([[T, T]])
    counts = count_slots(correct, valid, drafted, keep)
    assert counts.correct.tolist() == [1, 2, 1]
    assert counts.valid.tolist() == [2, 2, 1]
    assert counts.accepted.item() == 2  # block 0: slots 0, 1 then invalid slot 2; block 1: slot 0 wrong
    metrics = summarize(counts)
    assert metrics["acc"].item() == pytest.approx(4 / 5)
    assert metrics["acc_k/0"].item() == pytest.approx(0.5)
    assert metrics["tau_est"].item() == pytest.approx(2.0)
    assert metrics["tau_cumprod"].item() == pytest.approx(1 + 0.5 + 0.5 + 0.5)


def test_undrafted_prefix_slots_pass_through_the_run():
    # A visible prefix (VP drafter): slots before the first drafted one are skipped, not counted as misses.
    correct = _t([[[F, F, T, F], [F, F, F, T], [T, T, F, F]]])
    valid = _t([[[F, F, T, T], [F, F, F, T], [F, F, T, T]]])
    drafted = _t([[[F, F, T, T], [F, F, F, T], [F, F, T, T]]])
    keep = _t([[T, T, T]])
    counts = count_slots(correct, valid, drafted, keep)
    assert counts.accepted.item() == 1 + 1 + 0
    assert summarize(counts)["tau_est"].item() == pytest.approx(1 + 2 / 3)


def test_counts_add_up_over_chunks():
    whole = count_slots(DFLASH_CORRECT, DFLASH_VALID, DFLASH_DRAFTED, DFLASH_KEEP)
    parts = [count_slots(DFLASH_CORRECT[:, s], DFLASH_VALID[:, s], DFLASH_DRAFTED[:, s], DFLASH_KEEP[:, s])
             for s in (slice(0, 1), slice(1, 3), slice(3, 4))]
    total = parts[0] + parts[1] + parts[2]
    assert isinstance(total, SlotCounts)
    for field in ("correct", "valid", "accepted", "blocks"):
        assert torch.equal(getattr(total, field), getattr(whole, field)), field


def test_nothing_valid_gives_neutral_metrics():
    off = torch.zeros(1, 2, 4, dtype=torch.bool)
    metrics = summarize(count_slots(off, off, off, torch.zeros(1, 2, dtype=torch.bool)))
    assert metrics["acc"].item() == 0.0
    assert metrics["tau_est"].item() == 1.0
    assert metrics["tau_cumprod"].item() == 1.0
    assert not any(name.startswith("acc_k/") for name in metrics)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_counts_match_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    b, c, block = 3, 6, 7
    keep = torch.rand(b, c, generator=gen) < 0.8
    drafted = (torch.arange(block) >= 1) & keep.unsqueeze(-1)
    valid = drafted & (torch.rand(b, c, block, generator=gen) < 0.85)
    correct = torch.rand(b, c, block, generator=gen) < 0.7
    counts = count_slots(correct, valid, drafted, keep)
    metrics = summarize(counts)

    hits, totals = [0] * block, [0] * block
    taus = []
    for i in range(b):
        for n in range(c):
            for k in range(block):
                if valid[i, n, k]:
                    totals[k] += 1
                    hits[k] += bool(correct[i, n, k])
            if keep[i, n]:
                taus.append(ref_tau_block(correct[i, n].tolist(), valid[i, n].tolist(), drafted[i, n].tolist()))
    assert counts.correct.tolist() == hits and counts.valid.tolist() == totals
    assert metrics["acc"].item() == pytest.approx(sum(hits) / sum(totals))
    assert metrics["tau_est"].item() == pytest.approx(sum(taus) / len(taus))
    tau_cumprod, prod = 1.0, 1.0
    for k in range(block):
        if totals[k]:
            assert metrics[f"acc_k/{k}"].item() == pytest.approx(hits[k] / totals[k])
            prod *= hits[k] / totals[k]
            tau_cumprod += prod
    assert metrics["tau_cumprod"].item() == pytest.approx(tau_cumprod)
