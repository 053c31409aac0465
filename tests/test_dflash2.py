"""DFlash2 (docs/dflash2.md): the dynamic convolution (formula, identity, shift, block boundaries), a fresh DFlash2
drafter equal to DFlash, the selector's scores, loss rules and hand vectors, the objective and its schedule, the
walk and lossless verification against the selector's distribution."""

from __future__ import annotations

import math

import pytest
import torch

from dflashtrain.data.blocks import make_blocks
from dflashtrain.families import get_family
from dflashtrain.families.dflash2.drafting import walk_selector
from dflashtrain.families.dflash2.family import teacher_forced_prev
from dflashtrain.families.dflash2.layers import DFlash2DecoderLayer, dynamic_conv
from dflashtrain.families.dflash2.selector import CandidateSelector, edge_scores
from dflashtrain.inference.decode import Proposal, Sampler, verify
from dflashtrain.models.dflash import ContextCache, DFlashDrafter, DrafterGeometry
from dflashtrain.models.masks import AnchorAttentionMask
from dflashtrain.objectives.dflash2 import selector_alpha_at, selector_cross_entropy
from dflashtrain.objectives.protocol import SlotChunk
from factories import make_objective

FAMILY = get_family("dflash2")
OPTIONS = {"conv_kernel_size": 2, "conv_group_size": 8, "selector_rank": 4, "selector_top_k": 3,
           "selector_stop_gradient": False}


def geometry(block_size=4, sliding_window=None) -> DrafterGeometry:
    return DrafterGeometry(hidden_size=32, intermediate_size=48, num_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                           target_layer_ids=[0, 2], block_size=block_size, mask_token_id=0,
                           sliding_window=sliding_window)


def naive_conv(z, base, delta, block_size, group_size):
    """The formula of docs/dflash2.md element by element."""
    batch, length, hidden = z.shape
    out = torch.zeros_like(z)
    for b in range(batch):
        for t in range(length):
            for c in range(hidden):
                for tau in range(base.shape[0]):
                    if t % block_size >= tau:
                        out[b, t, c] += (base[tau, c] + delta[b, t, tau, c // group_size]) * z[b, t - tau, c]
    return out


# ---------------------------------------------------------------------------------------------- convolution
def test_dynamic_conv_matches_the_formula_element_by_element():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 12, 8, generator=gen, dtype=torch.float64)  # 3 blocks of 4 slots side by side
    base = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    delta = torch.randn(2, 12, 3, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(dynamic_conv(z, base, delta, 4, 4), naive_conv(z, base, delta, 4, 4))


def test_predecessor_tap_is_an_in_block_right_shift_and_never_crosses_a_block():
    z = torch.arange(1.0, 9.0).view(1, 8, 1).expand(1, 8, 2).contiguous()  # two blocks of B = 4
    shift = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # base[1] = 1 only
    out = dynamic_conv(z, shift, torch.zeros(1, 8, 2, 1), 4, 2)
    assert out[0, :, 0].tolist() == [0, 1, 2, 3, 0, 5, 6, 7]  # slot 0 of each block reads zero padding
    hidden = torch.zeros(1, 8, 2)
    hidden[:, 3] = 7.0  # the last slot of block 0
    assert (dynamic_conv(hidden, shift, torch.zeros(1, 8, 2, 1), 4, 2) == 0).all()  # slot 4 must not read slot 3


def test_fresh_convolutions_are_the_identity_bit_for_bit():
    layer = DFlash2DecoderLayer(geometry(), kernel_size=2, group_size=8)
    z = torch.randn(2, 8, 32)
    for conv in (layer.attention_conv, layer.mlp_conv):
        deltas = conv.deltas(z)
        assert (deltas == 0).all() and conv.base_kernel[:, 0].eq(1).all() and conv.base_kernel[:, 1].eq(0).all()
        for side in (0, 1):
            assert torch.equal(conv(z, deltas, side, 4), z)


def _drafter_inputs(g, anchors, seq_len=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, blocks = anchors.shape
    embeds = torch.randn(batch, blocks * g.block_size, g.hidden_size, generator=gen)
    tapped = torch.randn(batch, seq_len, 2 * g.hidden_size, generator=gen)
    positions = (anchors.unsqueeze(-1) + torch.arange(g.block_size)).view(batch, -1)
    mask = AnchorAttentionMask.build(anchors, torch.ones_like(anchors, dtype=torch.bool), seq_len, g.block_size,
                                     False, sliding_window=g.sliding_window)
    return embeds, tapped, positions, mask


def test_a_fresh_dflash2_drafter_gives_exactly_the_dflash_drafters_outputs():
    g = geometry()
    torch.manual_seed(0)
    dflash = DFlashDrafter(g).eval()
    dflash2 = FAMILY.build_drafter(g, OPTIONS).eval()
    result = dflash2.load_state_dict(dflash.state_dict(), strict=False)
    assert not result.unexpected_keys and all("_conv." in k for k in result.missing_keys) and result.missing_keys
    anchors = torch.tensor([[2, 5, 9]])
    embeds, tapped, positions, mask = _drafter_inputs(g, anchors)
    with torch.no_grad():
        assert torch.equal(dflash2(embeds, tapped, positions, mask), dflash(embeds, tapped, positions, mask))
        caches = [ContextCache(2), ContextCache(2)]
        for model, cache in zip((dflash, dflash2), caches):
            model.extend_context(cache, tapped[:, :9])
        block = embeds[:, 8:]
        assert torch.equal(dflash2.draft_cached(block, positions[:, 8:], caches[1]),
                           dflash.draft_cached(block, positions[:, 8:], caches[0]))


def _random_convs(drafter, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if "_conv." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def test_packed_blocks_equal_a_per_block_loop_with_trained_convolutions():
    """Blocks of different anchors side by side give each block exactly what it gives alone (so nothing of one
    block leaks into the next through the convolutions), and the cached inference path agrees."""
    g = geometry()
    torch.manual_seed(1)
    drafter = FAMILY.build_drafter(g, OPTIONS).double().eval()
    _random_convs(drafter)
    anchors = torch.tensor([[3, 4, 9]])  # overlapping positions, different contexts
    embeds, tapped, positions, mask = _drafter_inputs(g, anchors)
    embeds, tapped = embeds.double(), tapped.double()
    with torch.no_grad():
        packed = drafter(embeds, tapped, positions, mask).view(1, 3, 4, -1)
        for n, anchor in enumerate(anchors[0].tolist()):
            one = AnchorAttentionMask.build(anchors[:, n:n + 1], torch.tensor([[True]]), 12, 4, False)
            alone = drafter(embeds[:, 4 * n:4 * n + 4], tapped, positions[:, 4 * n:4 * n + 4], one)
            torch.testing.assert_close(packed[:, n], alone, rtol=1e-12, atol=1e-12)
            cache = ContextCache(2)
            drafter.extend_context(cache, tapped[:, :anchor])
            cached = drafter.draft_cached(embeds[:, 4 * n:4 * n + 4], positions[:, 4 * n:4 * n + 4], cache)
            torch.testing.assert_close(packed[:, n], cached, rtol=1e-10, atol=1e-10)


def test_a_later_slot_does_not_reach_an_earlier_one_through_the_convolutions_only():
    """The convolution is causal inside the block: with attention removed (o_proj = 0) slot k depends on slots ≤ k."""
    g = geometry()
    drafter = FAMILY.build_drafter(g, OPTIONS).double().eval()
    _random_convs(drafter)
    with torch.no_grad():
        for layer in drafter.layers:
            layer.self_attn.o_proj.weight.zero_()
    anchors = torch.tensor([[5]])
    embeds, tapped, positions, mask = _drafter_inputs(g, anchors)
    embeds, tapped = embeds.double(), tapped.double()
    with torch.no_grad():
        base = drafter(embeds, tapped, positions, mask)
        bumped = embeds.clone()
        bumped[:, 2] += 1.0
        out = drafter(bumped, tapped, positions, mask)
    changed = (out - base).abs().amax(dim=-1)[0]
    assert changed[:2].max() == 0 and changed[2:].min() > 1e-6


# ---------------------------------------------------------------------------------------------- selector
def test_teacher_forced_predecessors_of_two_blocks():
    """input_ids 0..15, blocks at [2..5] and [8..11], B = 4 -> predecessors [[2, 2, 3, 4], [8, 8, 9, 10]]."""
    ids = torch.arange(16).view(1, -1)
    blocks = make_blocks(ids, torch.ones_like(ids), torch.tensor([[2, 8]]), torch.tensor([[True, True]]), 4, 99, 0)
    assert teacher_forced_prev(blocks).tolist() == [[[2, 2, 3, 4], [8, 8, 9, 10]]]


def test_candidates_are_the_unary_top_k_in_descending_order():
    selector = CandidateSelector(7, 4, 1, 2, stop_gradient=False)
    scores = selector.teacher_forced(torch.zeros(4), torch.arange(7.0), torch.tensor(0), torch.tensor(1))
    assert scores.candidates.tolist() == [6, 5]
    assert scores.scores.tolist() == [6.0, 5.0]  # zero successor codebook: the scores are the unary logits


def test_inject_replaces_the_weakest_candidate_with_a_missing_label():
    """Unary [0..5], top-3 [5, 4, 3]; labels [4, 0] -> candidates [[5, 4, 3], [5, 4, 0]], label positions [1, 2]."""
    candidates = torch.tensor([[5, 4, 3], [5, 4, 3]])
    scores = torch.tensor([[5.0, 4.0, 3.0], [5.0, 4.0, 3.0]])
    gold = torch.tensor([4.0, 0.0])
    labels = torch.tensor([4, 0])
    ce, supervised, correct, in_topk = selector_cross_entropy(scores, candidates, gold, labels, inject=True)
    expected = [torch.logsumexp(torch.tensor([5.0, 4.0, 3.0]), 0) - 4.0,
                torch.logsumexp(torch.tensor([5.0, 4.0, 0.0]), 0) - 0.0]  # [5, 4, 0]: the label in the last place
    torch.testing.assert_close(ce, torch.stack(expected))
    assert supervised.tolist() == [True, True] and in_topk.tolist() == [True, False]
    assert correct.tolist() == [False, False]  # argmax picks 5 in both; a missing label is never "correct"
    _, supervised, _, _ = selector_cross_entropy(scores, candidates, gold, labels, inject=False)
    assert supervised.tolist() == [True, False]  # exclude: no selector loss where the label is not a candidate


def _hand_selector():
    """H = V = 4, r = 1, K = 2: P = [[1, 0, 0, 0]], A = [1, 2, 3, 4]ᵀ, Bs = [.5, 1, 1.5, 2]ᵀ."""
    selector = CandidateSelector(4, 4, 1, 2, stop_gradient=False)
    with torch.no_grad():
        selector.hidden_projection.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        selector.predecessor_codebook.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
        selector.successor_codebook.copy_(torch.tensor([[0.5], [1.0], [1.5], [2.0]]))
    hidden = torch.tensor([[k, 0.0, 0.0, 0.0] for k in range(4)])  # slot k: [k, 0, 0, 0]
    unary = torch.tensor([[0.0, 0, 0, 0], [0.1, 0, 3, 2], [0.1, 3, 0, 2], [3.0, 2, 1, 0]])
    labels = torch.tensor([0, 1, 2, 3])
    prev = torch.cat([labels[:1], labels[:-1]])  # x_{a+k-1}
    return selector, hidden, unary, prev, labels


def test_selector_loss_hand_vector():
    """Slot 1: candidates [2, 3] -> with the label injected S = [4.5, 1.0], ℓ = LSE(4.5, 1) − 1 = 3.529750;
    slot 2: S = [7, 6], ℓ = LSE(7, 6) − 6 = 1.313262; weights [0, 1, 0.5, 0]: Σ w·ℓ = 4.186381, × α 0.4 = 1.674553.
    Under the default rule (exclude) neither label is a candidate, so both slots carry no selector loss."""
    selector, hidden, unary, prev, labels = _hand_selector()
    scores = selector.teacher_forced(hidden, unary, prev, labels)
    assert scores.candidates[1:3].tolist() == [[2, 3], [1, 3]]
    ce, supervised, _, _ = selector_cross_entropy(scores.scores, scores.candidates, scores.gold_score, labels, True)
    torch.testing.assert_close(ce[1:3], torch.tensor([3.529750, 1.313262]), rtol=0, atol=1e-6)
    weights = torch.tensor([0.0, 1.0, 0.5, 0.0])
    numerator = (weights * supervised * ce).sum()
    assert numerator.item() == pytest.approx(4.186381, abs=1e-6)
    assert 0.4 * numerator.item() == pytest.approx(1.674553, abs=1e-6)
    _, supervised, _, in_topk = selector_cross_entropy(scores.scores, scores.candidates, scores.gold_score, labels,
                                                       False)
    assert not supervised[1:3].any() and not in_topk[1:3].any()


def test_the_walk_scores_what_training_scores():
    """Fed the labels as predecessors, the walk's edge scores equal the teacher-forced ones (one definition)."""
    selector, hidden, unary, prev, labels = _hand_selector()
    with torch.no_grad():
        selector.successor_codebook.copy_(torch.randn(4, 1))
    tf = selector.teacher_forced(hidden, unary, prev, labels)
    walk = walk_selector(selector, hidden[1:2], unary[1:2], anchor=int(labels[0]), temperature=0.0)
    torch.testing.assert_close(walk.scores[0], tf.scores[1])
    assert walk.tokens[0] == tf.candidates[1, tf.scores[1].argmax()]
    gate = selector.gate(hidden[2], labels[1])
    torch.testing.assert_close(edge_scores(unary[2], gate, selector.successor_codebook, tf.candidates[2]),
                               tf.scores[2])


def test_greedy_walk_follows_its_own_choices_and_sampling_returns_q_over_the_candidates():
    torch.manual_seed(0)
    selector = CandidateSelector(11, 6, 3, 4, stop_gradient=False)
    with torch.no_grad():
        selector.successor_codebook.normal_()
    hidden, unary = torch.randn(5, 6), torch.randn(5, 11)
    walk = walk_selector(selector, hidden, unary, anchor=2, temperature=0.0)
    prev = 2
    for k in range(5):  # the walk, written out: each step conditions on the token chosen before it
        score = edge_scores(unary[k], selector.gate(hidden[k], torch.tensor(prev)), selector.successor_codebook,
                            walk.candidates[k])
        prev = int(walk.candidates[k, score.argmax()])
        assert int(walk.tokens[k]) == prev
    sampled = walk_selector(selector, hidden, unary, 2, 0.7, torch.Generator().manual_seed(1))
    q = sampled.probs(11)
    torch.testing.assert_close(q.sum(-1), torch.ones(5))
    outside = torch.ones(5, 11, dtype=torch.bool).scatter(-1, sampled.candidates, False)
    assert (q[outside] == 0).all() and all(int(t) in c for t, c in zip(sampled.tokens, sampled.candidates.tolist()))
    torch.testing.assert_close(sampled.choice_probs, torch.softmax(sampled.scores / 0.7, dim=-1))


def test_rejection_against_the_selector_distribution_hand_vector():
    """Target one-hot on token 5; drafts [5, 5, 11] with one-hot q over candidates [[5, 1], [5, 2], [11, 3]]:
    two accepted, then the residual max(p − q, 0) is token 5 again."""
    vocab = 16
    p_logits = torch.full((4, vocab), -1e4)
    p_logits[:, 5] = 0.0
    candidates = torch.tensor([[5, 1], [5, 2], [11, 3]])
    q = torch.zeros(3, vocab).scatter(-1, candidates, torch.tensor([[1.0, 0.0]] * 3))
    proposal = Proposal(tokens=torch.tensor([5, 5, 11]), probs=q)
    accepted, bonus = verify(proposal, p_logits, Sampler(1.0, torch.Generator().manual_seed(0)))
    assert (accepted, bonus) == (2, 5)


# ---------------------------------------------------------------------------------------------- objective
def _chunk(selector, hidden, unary, labels, valid):
    prev = torch.cat([labels[..., :1], labels[..., :-1]], dim=-1)
    scores = selector.teacher_forced(hidden, unary, prev, labels)
    drafted = torch.zeros_like(valid)
    drafted[..., 1:] = True
    return SlotChunk(logits=unary, labels=labels, valid=valid & drafted, drafted=drafted,
                     extras={"selector_candidates": scores.candidates, "selector_scores": scores.scores,
                             "selector_gold_score": scores.gold_score})


def test_objective_pools_the_selector_term_over_the_base_denominator():
    selector, hidden, unary, _, labels = _hand_selector()
    chunk = _chunk(selector, hidden.view(1, 1, 4, 4), unary.view(1, 1, 4, 4), labels.view(1, 1, 4),
                   torch.ones(1, 1, 4, dtype=torch.bool))
    objective = make_objective("dflash2", gamma=4.0, selector_gold="inject")
    total = objective(chunk)
    w = torch.tensor([0.0, 1.0, math.exp(-1 / 4), math.exp(-2 / 4)])  # decay, slot 0 not drafted
    ce = torch.nn.functional.cross_entropy(unary, labels, reduction="none")
    assert total.weight_sum.item() == pytest.approx(w.sum().item(), rel=1e-6)
    assert total.terms["ce"].item() == pytest.approx((w * ce).sum().item(), rel=1e-6)
    sel, _, _, _ = selector_cross_entropy(*(chunk.extras[k][0, 0] for k in ("selector_scores", "selector_candidates",
                                                                          "selector_gold_score")), labels, True)
    assert total.terms["selector_ce"].item() == pytest.approx((w * sel).sum().item(), rel=1e-6)
    assert objective.coefficients == {"ce": 1.0, "selector_ce": 1.0} and objective.family == "dflash2"
    exclude = make_objective("dflash2", gamma=4.0)
    assert exclude(chunk).terms["selector_ce"].item() == 0.0  # no label is a candidate: no selector loss at all
    labels = torch.tensor([0, 1, 2, 1])  # slot 3's label is now its second candidate
    chunk = _chunk(selector, hidden.view(1, 1, 4, 4), unary.view(1, 1, 4, 4), labels.view(1, 1, 4),
                   torch.ones(1, 1, 4, dtype=torch.bool))
    excluded = exclude(chunk)
    sel, supervised, _, _ = selector_cross_entropy(
        *(chunk.extras[k][0, 0] for k in ("selector_scores", "selector_candidates", "selector_gold_score")), labels,
        False)
    assert supervised.tolist() == [False, False, False, True]
    assert excluded.terms["selector_ce"].item() == pytest.approx((w * sel)[3].item(), rel=1e-6)
    assert excluded.weight_sum.item() == pytest.approx(total.weight_sum.item())  # the base's Σ w·m either way


def test_objective_metrics_count_valid_slots_and_the_walks_leading_run():
    from dflashtrain.objectives.metrics import count_slots

    selector, hidden, unary, _, labels = _hand_selector()
    chunk = _chunk(selector, hidden.view(1, 1, 4, 4), unary.view(1, 1, 4, 4), labels.view(1, 1, 4),
                   torch.ones(1, 1, 4, dtype=torch.bool))
    objective = make_objective("dflash2", gamma=4.0)
    total = objective(chunk)
    correct = unary.argmax(-1).view(1, 1, 4) == chunk.labels
    counts = count_slots(correct, chunk.valid, chunk.drafted, torch.tensor([[True]]))
    metrics = objective.metrics(total, counts)
    # slots 1, 2: the label is no candidate; slot 3: label 3 (unary 0) is not in the top-2 [0, 1] either
    assert metrics["gold_in_topk"].item() == 0.0 and metrics["selector_acc"].item() == 0.0
    assert metrics["selector_tau_est"].item() == 1.0


def test_selector_weight_schedule():
    assert [selector_alpha_at(s, 100, 2.0, 0.1, 0.2) for s in (0, 9, 10, 20, 29, 30, 99)] == \
        [0.0, 0.0, 0.0, 1.0, pytest.approx(1.9), 2.0, 2.0]
    assert selector_alpha_at(0, 100, 2.0, 0.0, 0.0) == 2.0
    objective = make_objective("dflash2", gamma=4.0, selector_alpha=0.5, selector_warmup_ratio=0.5)
    assert objective.coefficients_at(10, 100) == {"ce": 1.0, "selector_ce": 0.0}
    assert objective.coefficients_at(50, 100) == {"ce": 1.0, "selector_ce": 0.5}


def test_dpace_base_uses_the_dpace_weights():
    selector, hidden, unary, _, labels = _hand_selector()
    chunk = _chunk(selector, hidden.view(1, 1, 4, 4), unary.view(1, 1, 4, 4), labels.view(1, 1, 4),
                   torch.ones(1, 1, 4, dtype=torch.bool))
    total = make_objective("dflash2", gamma=4.0, base="dpace", dpace_alpha=0.5)(chunk)
    reference = make_objective("dpace", alpha=0.5)(chunk)
    assert total.terms["ce"].item() == pytest.approx(reference.terms["ce"].item())
    assert total.weight_sum.item() == pytest.approx(reference.weight_sum.item())


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_stop_gradient_keeps_the_selector_term_off_the_unary_logits_and_hidden(stop_gradient):
    selector, hidden, unary, prev, labels = _hand_selector()
    selector.stop_gradient = stop_gradient
    with torch.no_grad():
        selector.successor_codebook.normal_()
    hidden, unary = hidden.clone().requires_grad_(), unary.clone().requires_grad_()
    scores = selector.teacher_forced(hidden, unary, prev, labels)
    ce, supervised, _, _ = selector_cross_entropy(scores.scores, scores.candidates, scores.gold_score, labels, True)
    (ce * supervised).sum().backward()
    reaches = [t.grad is not None and t.grad.abs().sum() > 0 for t in (hidden, unary)]
    assert reaches == [not stop_gradient] * 2
    assert selector.successor_codebook.grad.abs().sum() > 0  # the selector itself always learns


# ---------------------------------------------------------------------------------------------- config rules
@pytest.mark.parametrize("overrides,message", [
    (["loss=decay", "model.drafter.selector_rank=64"], r"^model.drafter.selector_rank: is a DFlash2 option"),
    (["loss=dflash2", "model.drafter.conv_group_size=48"], r"^model.drafter.conv_group_size: 48 does not divide"),
    (["loss=dflash2", "model.drafter.conv_kernel_size=9"], r"^model.drafter.conv_kernel_size: must be in \[1, "),
    (["loss=dflash2", "model.drafter.selector_top_k=1000"], r"^model.drafter.selector_top_k: 1000 exceeds"),
    (["loss=dflash2", "model.drafter.markov_rank=8"], r"^model.drafter.markov_rank: is 8, but the Markov head"),
    (["loss=dflash2", "loss.selector_alpha=0"], r"^loss.selector_alpha: must be a finite number > 0"),
    (["loss=dflash2", "loss.selector_warmup_ratio=0.6", "loss.selector_ramp_ratio=0.5"],
     r"^loss.selector_ramp_ratio: selector_warmup_ratio \+ selector_ramp_ratio must be < 1"),
])
def test_bad_dflash2_settings_are_refused_naming_the_key(overrides, message, tmp_path):
    from hydra import compose, initialize_config_module

    from dflashtrain.config.checks import validate, validate_against_target
    from dflashtrain.config.errors import ConfigError
    from dflashtrain.config.schema import register_configs
    from dflashtrain.models.target import load_target_config

    register_configs()
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
        validate_against_target(cfg, load_target_config(cfg.model.target.path))
