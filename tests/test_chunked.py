"""Chunked LM head + objective equals unchunked: loss terms, sums, counts and gradients (docs/architecture.md, memory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factories import make_objective
from dflashtrain.config.losses import MaskMode, TargetKind
from dflashtrain.data.blocks import make_blocks, sample_anchors
from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
from dflashtrain.models.masks import AnchorAttentionMask
from dflashtrain.objectives.chunked import chunked_objective, teacher_logits
from dflashtrain.objectives.protocol import SlotChunk
from reference import ref_tau_block

VOCAB, HIDDEN, BLOCK, SEQ_LEN, NUM_ANCHORS = 40, 32, 4, 18, 5


def _geometry() -> DrafterGeometry:
    return DrafterGeometry(
        hidden_size=HIDDEN, intermediate_size=48, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, target_layer_ids=[0, 2], block_size=BLOCK,
        mask_token_id=VOCAB - 1,
    )


class Setup:
    def __init__(self, label_offset: int = 0):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(42)
        g = self.geometry = _geometry()
        self.drafter = DFlashDrafter(g)
        self.drafter.reset_parameters(std=0.2)  # larger weights: gradients well above float noise
        self.embed = nn.Embedding(VOCAB, HIDDEN).requires_grad_(False)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
        self.input_ids = torch.randint(0, VOCAB - 1, (2, SEQ_LEN), generator=gen)
        loss_mask = (torch.rand(2, SEQ_LEN, generator=gen) < 0.8).long()
        # Row 1: a hole and right padding -> candidates 2, 3, 6 only -> two dummy blocks.
        loss_mask[1] = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1] + [0] * (SEQ_LEN - 8))
        self.loss_mask = loss_mask
        self.tapped = torch.randn(2, SEQ_LEN, len(g.target_layer_ids) * HIDDEN, generator=gen)
        self.final_hidden = torch.randn(2, SEQ_LEN, HIDDEN, generator=gen)
        anchors, keep = sample_anchors(loss_mask, NUM_ANCHORS, generator=gen)
        assert keep[0].all() and keep[1].tolist() == [True, True, True, False, False]
        self.blocks = make_blocks(self.input_ids, loss_mask, anchors, keep, BLOCK, g.mask_token_id, label_offset)

    def hidden(self) -> torch.Tensor:
        blocks, batch = self.blocks, 2
        mask = AnchorAttentionMask.build(blocks.anchor_positions, blocks.block_keep, SEQ_LEN, BLOCK, use_flex=False)
        embeds = self.embed(blocks.input_ids.view(batch, -1))
        h = self.drafter(embeds, self.tapped, blocks.position_ids.view(batch, -1), mask)
        return h.view(batch, NUM_ANCHORS, BLOCK, HIDDEN)

    def logits_fn(self, h, sub):
        return self.lm_head(h), {}

    def teacher(self, positions):
        return teacher_logits(self.final_hidden, positions, self.lm_head)


def _run(setup: Setup, objective, chunk_blocks: int, use_checkpoint: bool, kd: bool):
    setup.drafter.zero_grad(set_to_none=True)
    hidden = setup.hidden()
    hidden.retain_grad()
    total, counts = chunked_objective(
        hidden, setup.blocks, objective, setup.logits_fn, chunk_blocks,
        teacher=setup.teacher if kd else None, use_checkpoint=use_checkpoint,
    )
    (total.terms["ce"] / total.weight_sum).backward()
    grads = {name: p.grad.clone() for name, p in setup.drafter.named_parameters()}
    return total, counts, hidden.grad.clone(), grads, hidden.detach()


CASES = [("hard", "independent"), ("hard", "cumulative"), ("kd", "independent")]


@pytest.mark.parametrize("target,mode", CASES)
def test_chunked_equals_unchunked(target, mode):
    setup = Setup()
    objective = make_objective("decay", gamma=4.0, mask_mode=MaskMode(mode), target=TargetKind(target))
    kd = target == "kd"
    base_total, base_counts, base_hgrad, base_grads, hidden = _run(setup, objective, NUM_ANCHORS, False, kd)

    # The unchunked run equals the objective applied directly to the full logits (no chunking code involved).
    logits = setup.lm_head(hidden)
    direct = objective(SlotChunk(
        logits=logits, labels=setup.blocks.label_ids, valid=setup.blocks.slot_valid, drafted=setup.blocks.drafted,
        teacher_logits=setup.teacher(setup.blocks.label_positions) if kd else None,
    ))
    torch.testing.assert_close(base_total.terms["ce"], direct.terms["ce"])
    torch.testing.assert_close(base_total.weight_sum, direct.weight_sum)
    assert base_total.weight_sum > 0 and base_hgrad.abs().sum() > 0
    assert all(g.abs().sum() > 0 for g in base_grads.values())

    # Counts against a naive loop over the argmax.
    correct = (logits.argmax(-1) == setup.blocks.label_ids).tolist()
    valid, drafted = setup.blocks.slot_valid.tolist(), setup.blocks.drafted.tolist()
    keep = setup.blocks.block_keep.tolist()
    exp_correct = [0.0] * BLOCK
    exp_valid = [0.0] * BLOCK
    accepted = 0
    for b in range(2):
        for n in range(NUM_ANCHORS):
            for k in range(BLOCK):
                exp_valid[k] += valid[b][n][k]
                exp_correct[k] += valid[b][n][k] and correct[b][n][k]
            if keep[b][n]:
                accepted += ref_tau_block(correct[b][n], valid[b][n], drafted[b][n]) - 1
    assert base_counts.correct.tolist() == exp_correct
    assert base_counts.valid.tolist() == exp_valid
    assert base_counts.accepted.item() == accepted
    assert base_counts.blocks.item() == sum(map(sum, keep))

    for chunk_blocks in (1, 3, NUM_ANCHORS):
        for use_checkpoint in (False, True):
            total, counts, hgrad, grads, _ = _run(setup, objective, chunk_blocks, use_checkpoint, kd)
            where = (chunk_blocks, use_checkpoint)
            torch.testing.assert_close(total.terms["ce"], base_total.terms["ce"], rtol=1e-5, atol=1e-6, msg=str(where))
            torch.testing.assert_close(total.weight_sum, base_total.weight_sum, rtol=1e-6, atol=1e-6)
            assert total.token_sum.item() == base_total.token_sum.item()
            torch.testing.assert_close(total.slot_weight_sum, base_total.slot_weight_sum, rtol=1e-6, atol=1e-6)
            for field in ("correct", "valid", "accepted", "blocks"):
                assert torch.equal(getattr(counts, field), getattr(base_counts, field)), (field, where)
            torch.testing.assert_close(hgrad, base_hgrad, rtol=1e-4, atol=1e-7, msg=str(where))
            for name, grad in grads.items():
                torch.testing.assert_close(grad, base_grads[name], rtol=1e-4, atol=1e-7, msg=f"{name} {where}")


def test_chunked_gradient_wrt_leaf_hidden():
    """With a leaf hidden tensor (no drafter), chunked + checkpointed gradients equal the unchunked ones."""
    setup = Setup(label_offset=1)
    objective = make_objective("decay", gamma=7.0)
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(2, NUM_ANCHORS, BLOCK, HIDDEN, generator=gen)
    results = []
    for chunk_blocks, use_checkpoint in ((NUM_ANCHORS, False), (1, True), (3, True), (2, False)):
        hidden = base.clone().requires_grad_(True)
        total, counts = chunked_objective(hidden, setup.blocks, objective, setup.logits_fn, chunk_blocks,
                                          use_checkpoint=use_checkpoint)
        (total.terms["ce"] / total.weight_sum).backward()
        results.append((total.terms["ce"].detach(), total.weight_sum, hidden.grad, counts.accepted))
    for terms, weight_sum, grad, accepted in results[1:]:
        torch.testing.assert_close(terms, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight_sum, results[0][1])
        torch.testing.assert_close(grad, results[0][2], rtol=1e-4, atol=1e-8)
        assert accepted == results[0][3]
    assert results[0][2].abs().sum() > 0


def test_teacher_logits_are_the_head_at_label_pos_minus_one():
    setup = Setup()
    positions = setup.blocks.label_positions
    got = teacher_logits(setup.final_hidden, positions, setup.lm_head)
    assert got.shape == (*positions.shape, VOCAB) and got.dtype == torch.float32 and not got.requires_grad
    for b in range(2):
        for n in range(NUM_ANCHORS):
            for k in range(BLOCK):
                source = max(positions[b, n, k].item() - 1, 0)
                expected = setup.lm_head(setup.final_hidden[b, source])
                torch.testing.assert_close(got[b, n, k], expected)


# ------------------------------------------------------------------------ the gradient taken in the forward pass
def _dspark_case():
    """DSpark with heads (trainable tensors the chunk reads besides hidden) over SEQ-like random data."""
    from dflashtrain.families import get_family
    from dflashtrain.families.dspark.heads import DSparkHeads

    setup = Setup(label_offset=1)
    torch.manual_seed(4)
    heads = DSparkHeads(VOCAB, HIDDEN, 4, confidence=True)
    nn.init.normal_(heads.markov.proj.weight, std=1.0)
    family = get_family("dspark")
    objective = make_objective("dspark")
    return setup, heads, objective, (lambda h, sub: family.logits(h, sub, setup.lm_head, heads))


def test_dspark_heads_and_hidden_gradients_equal_the_unchunked_ones():
    setup, heads, objective, logits_fn = _dspark_case()
    base = torch.randn(2, NUM_ANCHORS, BLOCK, HIDDEN, generator=torch.Generator().manual_seed(2))
    results = []
    for chunk_blocks, bounded in ((NUM_ANCHORS, False), (2, True), (1, True)):
        heads.zero_grad(set_to_none=True)
        hidden = base.clone().requires_grad_(True)
        total, _ = chunked_objective(hidden, setup.blocks, objective, logits_fn, chunk_blocks, teacher=setup.teacher,
                                     use_checkpoint=bounded)
        loss = sum(alpha * total.terms[name] for name, alpha in objective.coefficients.items()) / total.weight_sum
        (3.0 * loss).backward()
        results.append((hidden.grad, {n: p.grad.clone() for n, p in heads.named_parameters()}, total))
    for hgrad, grads, total in results[1:]:
        torch.testing.assert_close(hgrad, results[0][0], rtol=1e-4, atol=1e-7)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=1e-4, atol=1e-7, msg=name)
        for name in objective.coefficients:
            torch.testing.assert_close(total.terms[name], results[0][2].terms[name], rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in results[0][1].values())


def test_the_head_and_the_teacher_run_once_per_chunk(monkeypatch):
    """No recompute: 3 chunks -> 3 drafter head GEMMs and 3 teacher ones in the forward, none in the backward."""
    import dflashtrain.families.dspark.heads as dspark_heads

    setup, heads, objective, logits_fn = _dspark_case()
    drafter_calls, teacher_calls = [], []
    original = dspark_heads.biased_head_logits
    monkeypatch.setattr(dspark_heads, "biased_head_logits", lambda *a: drafter_calls.append(1) or original(*a))
    setup.lm_head.register_forward_hook(lambda module, args, out: teacher_calls.append(1))  # the teacher's logits
    hidden = torch.randn(2, NUM_ANCHORS, BLOCK, HIDDEN, requires_grad=True)
    total, _ = chunked_objective(hidden, setup.blocks, objective, logits_fn, 2, teacher=setup.teacher)
    assert (len(drafter_calls), len(teacher_calls)) == (3, 3)  # ⌈5 / 2⌉ chunks
    (total.terms["ce"] * 0.1 + total.terms["l1"] * 0.9 + total.terms["bce"]).backward()
    assert (len(drafter_calls), len(teacher_calls)) == (3, 3) and hidden.grad.abs().sum() > 0


def test_terms_are_differentiable_along_the_coefficients_only():
    setup, heads, objective, logits_fn = _dspark_case()
    hidden = torch.randn(2, NUM_ANCHORS, BLOCK, HIDDEN, requires_grad=True)
    total, _ = chunked_objective(hidden, setup.blocks, objective, logits_fn, 2, teacher=setup.teacher)
    with pytest.raises(RuntimeError, match="differentiable along the coefficients"):
        total.terms["l1"].backward()  # one term of three: not a multiple of Σ α_t·term_t
