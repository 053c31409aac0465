"""Speculative decoding (docs/decoding.md): the cached drafter equals the training forward, greedy speculative output equals
plain greedy decoding token for token (random drafter: rejections; forced drafter: full acceptance, a stop token
mid-block), and sampling at T > 0 is lossless (chi-square against the target's exact distribution)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dflashtrain.inference.decode import (
    DFlashProposer,
    PlainDecoding,
    Proposal,
    Sampler,
    acceptance_stats,
    generate,
    verify,
)
from dflashtrain.models.dflash import ContextCache, DFlashDrafter, DrafterGeometry
from dflashtrain.models.masks import AnchorAttentionMask
from dflashtrain.models.target import FrozenTarget

PROMPTS = [[1, 7, 3, 9, 4], [2, 2, 8], [5, 11, 13, 6, 1, 0, 12]]


def tiny_target(vocab_size: int, init: float, seed: int = 0) -> FrozenTarget:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=init,
        tie_word_embeddings=False,
    )
    return FrozenTarget(Qwen3ForCausalLM(config).eval(), layer_ids=[0, 1])


def tiny_drafter(block_size: int, mask_token_id: int, seed: int = 1, std: float = 0.3) -> DFlashDrafter:
    torch.manual_seed(seed)
    geometry = DrafterGeometry(
        hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, target_layer_ids=[0, 1], block_size=block_size,
        mask_token_id=mask_token_id,
    )
    drafter = DFlashDrafter(geometry).eval()
    drafter.reset_parameters(std=std)  # large: a random drafter with opinions, its q far from the target's p
    return drafter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small only lose from intra-op threads (and a shared machine makes that much worse)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab_size=32, init=0.2)


def plain(target, prompt, max_new_tokens=24, stop=()):
    return generate(target, PlainDecoding(), prompt, max_new_tokens, stop, Sampler())


# ---------------------------------------------------------------------------------------------- drafter cache
def test_cached_drafting_equals_the_training_forward():
    drafter = tiny_drafter(block_size=4, mask_token_id=31)
    torch.manual_seed(2)
    seq_len, anchor = 12, 9
    tapped = torch.randn(1, seq_len, 64)
    block_embeds = torch.randn(1, 4, 32)
    positions = torch.arange(anchor, anchor + 4).unsqueeze(0)
    mask = AnchorAttentionMask.build(torch.tensor([[anchor]]), torch.tensor([[True]]), seq_len, 4, use_flex=False)
    expected = drafter(block_embeds, tapped, positions, mask)

    cache = ContextCache(num_layers=2)
    drafter.extend_context(cache, tapped[:, :5])  # appended in two pieces, then past the anchor and cropped back
    drafter.extend_context(cache, tapped[:, 5:11])
    cache.crop(anchor)
    assert cache.length == anchor and cache.keys[0].shape[2] == anchor
    torch.testing.assert_close(drafter.draft_cached(block_embeds, positions, cache), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the context before it"):
        drafter.draft_cached(block_embeds, positions + 1, cache)  # the anchor's own state must not be visible


# ---------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_with_a_random_drafter_equals_plain_decoding(target, prompt):
    reference = plain(target, prompt)
    speculative = generate(target, DFlashProposer(tiny_drafter(4, 31), target), prompt, 24, (), Sampler())
    assert speculative.tokens == reference.tokens
    assert len(speculative.tokens) == 24 and reference.rounds == 23 and reference.accepted == [0] * 23
    assert min(speculative.accepted) == 0  # rejections happened
    assert sum(speculative.accepted) + speculative.rounds == 23  # every round commits accepted + 1 (first is prefill)


def forced_proposer(target, reference_tokens, prompt_len, block_size):
    """A real DFlashProposer (its caches still run) whose drafts are replaced by the target's own greedy tokens."""
    proposer = DFlashProposer(tiny_drafter(block_size, 31), target)
    original = proposer.draft_logits

    def draft_logits(visible, start):
        logits = original(visible, start)  # [B-1, V]; runs the drafter on its cache (checks cache length == start)
        index = start - prompt_len  # generated index of the anchor
        future = (reference_tokens + [0] * block_size)[index + 1: index + block_size]
        return torch.nn.functional.one_hot(torch.tensor(future), logits.shape[-1]).float() * 10

    proposer.draft_logits = draft_logits
    return proposer


def test_greedy_with_forced_right_drafts_accepts_full_blocks_and_stops_mid_block(target):
    prompt, block = PROMPTS[0], 4
    reference = plain(target, prompt, max_new_tokens=40).tokens
    # A stop token that first appears mid-block: generated index i is slot (i - 1) % B of a full-acceptance round.
    stop_index = next(i for i in range(6, 40) if reference[i] not in reference[:i] and (i - 1) % block not in (0, 3))
    stop = [reference[stop_index]]
    expected = plain(target, prompt, max_new_tokens=40, stop=stop)
    assert expected.tokens == reference[: stop_index + 1]

    speculative = generate(target, forced_proposer(target, reference, len(prompt), block), prompt, 40, stop, Sampler())
    assert speculative.tokens == expected.tokens
    full_rounds = (stop_index - 1) // block
    assert speculative.accepted[:full_rounds] == [block - 1] * full_rounds
    assert speculative.accepted[-1] == (stop_index - 1) % block < block - 1  # ended on a draft, mid-block


def test_max_new_tokens_cuts_a_block(target):
    prompt = PROMPTS[1]
    reference = plain(target, prompt, max_new_tokens=10).tokens
    forced = forced_proposer(target, plain(target, prompt, 40).tokens, len(prompt), 4)
    speculative = generate(target, forced, prompt, 10, (), Sampler())
    assert speculative.tokens == reference and speculative.accepted == [3, 3, 0]  # 1 + 4 + 4 + 1


def test_stop_token_from_the_prefill_ends_before_any_round(target):
    first = plain(target, PROMPTS[2], max_new_tokens=1).tokens
    generation = generate(target, DFlashProposer(tiny_drafter(4, 31), target), PROMPTS[2], 10, first, Sampler())
    assert generation.tokens == first and generation.rounds == 0


def test_acceptance_stats_by_hand():
    from dflashtrain.inference.decode import Generation

    stats = acceptance_stats([Generation(tokens=[], accepted=[0, 3, 1]), Generation(tokens=[], accepted=[3])], 4)
    assert stats["tau"] == pytest.approx((1 + 4 + 2 + 4) / 4)
    assert stats["histogram"] == [1, 1, 0, 2]
    assert stats["accept_rate"] == pytest.approx([3 / 4, 2 / 4, 2 / 4])
    assert stats["conditional_accept_rate"] == pytest.approx([3 / 4, 2 / 3, 1.0])


def test_greedy_verify_by_hand():
    logits = torch.eye(5)[[2, 4, 1, 0]] * 3  # target argmax per row: 2, 4, 1, 0
    assert verify(Proposal(torch.tensor([2, 4, 3])), logits, Sampler()) == (2, 1)
    assert verify(Proposal(torch.tensor([2, 4, 1])), logits, Sampler()) == (3, 0)  # all kept + bonus
    assert verify(Proposal(torch.tensor([0, 4, 1])), logits, Sampler()) == (0, 2)
    assert verify(Proposal(torch.empty(0, dtype=torch.long)), logits[:1], Sampler()) == (0, 2)  # block size 1


# ---------------------------------------------------------------------------------------------- sampling
def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square(df) at one-sided z (3.719 ↔ p = 1e-4), Wilson–Hilferty approximation."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


@torch.no_grad()
def exact_pair_distribution(target, prompt, temperature):
    """P(t2, t3) of the target's own sampling, marginalized over t1, by enumeration. -> [V, V] float64."""
    vocab = target.model.config.vocab_size

    def next_probs(ids):
        logits = target.model(torch.tensor([ids])).logits[0, -1].double()
        return torch.softmax(logits / temperature, dim=-1)

    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    p1 = next_probs(prompt)
    for t1 in range(vocab):
        p2 = next_probs(prompt + [t1])
        for t2 in range(vocab):
            joint[t2] += p1[t1] * p2[t2] * next_probs(prompt + [t1, t2])
    return joint


def test_sampling_is_lossless_on_a_small_vocabulary():
    """The first three generated tokens (t1 from the prefill; t2, t3 from rounds: accepted drafts, residual
    resamples after a rejection, bonus tokens) follow the target's distribution. Chi-square over the 16 cells of
    (t2, t3) with cells of expected count < 5 pooled; critical value at p = 1e-4, so the seeded test is not a
    coin flip, and a loop that kept the drafts unverified is rejected by a wide margin."""
    vocab, block, temperature, runs = 4, 3, 1.0, 800
    target = tiny_target(vocab_size=vocab, init=0.5, seed=3)
    drafter = tiny_drafter(block, mask_token_id=vocab - 1, seed=4, std=0.02)
    prompt = [0, 2, 1]
    exact = exact_pair_distribution(target, prompt, temperature).flatten()

    sampler = Sampler(temperature, torch.Generator().manual_seed(0))
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    first_round = [0] * block  # accepted drafts in round 1: 0, 1 (a rejection each) or 2 (all kept + bonus)
    for _ in range(runs):
        generation = generate(target, DFlashProposer(drafter, target), prompt, 4, (), sampler)
        t2, t3 = generation.tokens[1:3]
        counts[t2 * vocab + t3] += 1
        first_round[generation.accepted[0]] += 1
    assert min(first_round) > 0.02 * runs, first_round  # every path ran

    expected = exact * runs
    big = expected >= 5
    observed_cells = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    expected_cells = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    keep = expected_cells > 0
    chi2 = float(((observed_cells - expected_cells)[keep] ** 2 / expected_cells[keep]).sum())
    critical = chi_square_critical(int(keep.sum()) - 1)
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical:.1f}: the loop's samples are not the target's"

    # Power: the drafter's own (unverified) pair distribution is far outside the same test.
    drafted = torch.zeros(vocab * vocab, dtype=torch.float64)
    proposer = DFlashProposer(drafter, target)
    p1 = torch.softmax(target.model(torch.tensor([prompt])).logits[0, -1].double() / temperature, dim=-1)
    prefill = target.model(torch.tensor([prompt]), output_hidden_states=True)
    proposer.begin(torch.cat([prefill.hidden_states[i + 1][0] for i in target.layer_ids], dim=-1))
    for t1 in range(vocab):
        q = torch.softmax(proposer.draft_logits(torch.tensor([t1]), len(prompt)).double() / temperature, dim=-1)
        drafted += p1[t1] * torch.outer(q[0], q[1]).flatten()
    wrong = drafted * runs
    wrong_chi2 = float(((wrong - expected)[expected > 0] ** 2 / expected[expected > 0]).sum())
    assert wrong_chi2 > 3 * critical


def test_sampling_verify_with_deterministic_drafts_keeps_the_target_marginal():
    """q one-hot (proposal.probs None): the first committed token is distributed as p_0 (exact frequencies)."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    sampler = Sampler(1.0, torch.Generator().manual_seed(1))
    counts = torch.zeros(3)
    draws = 4000
    for _ in range(draws):
        accepted, next_token = verify(Proposal(torch.tensor([1])), p.log(), sampler)
        counts[1 if accepted else next_token] += 1
    bound = 4 * math.sqrt(0.25 / draws)  # 4 standard deviations of a frequency
    assert torch.allclose(counts / draws, p[0], atol=bound)


# ---------------------------------------------------------------------------------------------- D²SD rows
def test_d2sd_with_random_drafters_equals_plain_decoding(target):
    from dflashtrain.inference.decode import D2SDProposer

    wins = 0
    for prompt in PROMPTS:
        proposer = D2SDProposer(DFlashProposer(tiny_drafter(4, 31, seed=1), target),
                                DFlashProposer(tiny_drafter(4, 31, seed=2), target), branches=2)
        generation = generate(target, proposer, prompt, 24, (), Sampler())
        assert generation.tokens == plain(target, prompt).tokens
        wins += sum(row > 0 for row in generation.winning_rows)
    assert wins > 0  # some rounds committed a re-drafted row (and its cache row was the one kept)


def test_d2sd_commits_the_branch_row_when_the_main_draft_fails(target):
    """Main draft wrong at slot 2 (the right token its second choice, low confidence there); the VP drafter
    continues right: every full round commits branch row 1 with all B-1 drafts accepted."""
    from dflashtrain.inference.decode import D2SDProposer

    prompt, block = PROMPTS[2], 4
    reference = plain(target, prompt, max_new_tokens=40).tokens
    first = DFlashProposer(tiny_drafter(block, 31, seed=1), target)
    second = DFlashProposer(tiny_drafter(block, 31, seed=2), target)

    def future(start, count, offset=1):
        index = start - len(prompt)  # generated index of the anchor
        return (reference + [0] * 2 * block)[index + offset: index + offset + count]

    def first_logits(visible, start):
        right = torch.tensor(future(start, block - 1))
        logits = torch.nn.functional.one_hot(right, 32).float() * 20
        logits[1] = 0
        logits[1, (int(right[1]) + 1) % 32], logits[1, int(right[1])] = 10.0, 9.9  # wrong first, right second
        return logits

    def second_logits(visible, start):
        assert visible.tolist() == [reference[start - len(prompt)]] + future(start, 2)  # anchor, d_1, a_2
        return torch.nn.functional.one_hot(torch.tensor(future(start, block - 3, offset=3)), 32).float() * 20

    first.draft_logits, second.draft_logits = first_logits, second_logits
    generation = generate(target, D2SDProposer(first, second, branches=1), prompt, 40, (), Sampler())
    assert generation.tokens == reference
    assert generation.winning_rows[:-1] == [1] * (generation.rounds - 1)
    assert generation.accepted[:-1] == [block - 1] * (generation.rounds - 1)
