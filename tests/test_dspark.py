"""DSpark (docs/objectives.md, dspark): teacher-forced prev, target alignment, Markov bias everywhere, per-term values, pooled
reduction across ranks, decay vector, config composition, and the CLI end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from factories import make_module, make_objective
from dflashtrain.data.blocks import make_blocks
from dflashtrain.export.checkpoint import load_checkpoint
from dflashtrain.families.dspark.export import export_tensors
from dflashtrain.families.dspark.heads import DSparkHeads, teacher_forced_prev
from dflashtrain.objectives.chunked import chunked_objective, teacher_logits
from dflashtrain.objectives.metrics import TAU_PROB_SUM
from dflashtrain.objectives.protocol import SlotChunk
from dflashtrain.objectives.weights import decay_weights, first_drafted_offsets
from dflashtrain.train.reduction import local_sums, pack
from reference import ref_ce, ref_softmax, ref_supervision

VOCAB, HIDDEN, RANK, BLOCK, MASK = 11, 8, 4, 4, 10


def _blocks(input_ids, loss_mask, anchors, keep, block_size=BLOCK):
    return make_blocks(torch.tensor(input_ids), torch.tensor(loss_mask), torch.tensor(anchors), torch.tensor(keep),
                       block_size, MASK, label_offset=1)


def _heads(seed=0, confidence=True, scale=3.0):
    torch.manual_seed(seed)
    heads = DSparkHeads(VOCAB, HIDDEN, RANK, confidence)
    nn.init.normal_(heads.markov.proj.weight, std=scale)  # a decisive bias (a fresh W2 is zero)
    return heads


def _module(heads, lm_head, objective=None):
    target = SimpleNamespace(lm_head=lm_head)
    return make_module(nn.Linear(1, 1), target, objective or make_objective("dspark"), heads=heads)


# --------------------------------------------------------------------------------------------- layout, alignment
SEQ = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2]]
LOSS_MASK = [[0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 1, 1]]
ANCHORS, KEEP = [[1, 4, 7], [2, 3, 0]], [[True, True, True], [True, True, False]]


def test_teacher_forced_prev_is_the_token_at_each_slot_position():
    blocks = _blocks(SEQ, LOSS_MASK, ANCHORS, KEEP)
    prev = teacher_forced_prev(blocks)
    for b, row in enumerate(SEQ):
        for n, a in enumerate(ANCHORS[b]):
            for k in range(BLOCK):
                if KEEP[b][n] and a + k < len(row):
                    assert prev[b, n, k] == row[a + k], (b, n, k)
                if blocks.slot_valid[b, n, k]:
                    assert a + k + 1 < len(row) and blocks.label_ids[b, n, k] == row[a + k + 1]
    # Anchor 7 of S = 9: slot 0 predicts x[8] (valid), slot 1 would read x[9] (out of range, invalid).
    assert blocks.slot_valid[0, 2].tolist() == [True, False, False, False]
    assert prev[0, 2, :2].tolist() == [6, 5]


def test_target_distribution_is_read_one_position_before_the_label():
    torch.manual_seed(1)
    final_hidden = torch.randn(2, len(SEQ[0]), HIDDEN)
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    blocks = _blocks(SEQ, LOSS_MASK, ANCHORS, KEEP)
    teacher = teacher_logits(final_hidden, blocks.label_positions, lm_head)  # [b, N, B, V]
    for b in range(2):
        for n, a in enumerate(ANCHORS[b]):
            for k in range(BLOCK):
                if blocks.slot_valid[b, n, k]:  # p_t,k = softmax(lm_head(h^T_final[a + k]))
                    expected = lm_head(final_hidden[b, a + k])
                    torch.testing.assert_close(teacher[b, n, k], expected, rtol=0, atol=1e-6)


def test_decay_vector_for_block_7():
    drafted = torch.ones(1, 7, dtype=torch.bool)  # next-token convention: every slot drafted, slot 0 weighs 1
    weights = decay_weights(first_drafted_offsets(drafted), 4.0)[0]
    expected = [1, .778801, .606531, .472367, .367879, .286505, .223130]
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ per-term values
def test_terms_on_a_hand_made_two_slot_block():
    """Slot 0: q = [.5, .3, .2], p = [.2, .3, .5], label 0, u = 0 -> CE ln2, L1 .6, c* .7, BCE ln2.
    Slot 1: q = p = [.1, .1, .8], label 2, u = ln 3 -> CE −ln .8, L1 0, c* 1, BCE −ln .75. Slot 2 is invalid."""
    log = lambda rows: torch.tensor(rows).log().view(1, 1, 3, 3)  # noqa: E731
    chunk = SlotChunk(
        logits=log([[.5, .3, .2], [.1, .1, .8], [.98, .01, .01]]),
        labels=torch.tensor([[[0, 2, 1]]]),
        valid=torch.tensor([[[True, True, False]]]),
        drafted=torch.ones(1, 1, 3, dtype=torch.bool),
        teacher_logits=log([[.2, .3, .5], [.1, .1, .8], [.01, .01, .98]]),
        extras={"confidence_logits": torch.tensor([[[0.0, math.log(3.0), 5.0]]])},
    )
    objective = make_objective("dspark", ce_alpha=0.1, l1_alpha=0.9, conf_alpha=1.0, gamma=4.0)
    total = objective(chunk)
    den = 1 + math.exp(-0.25)  # w = [1, .778801]
    assert total.weight_sum.item() == pytest.approx(den, abs=1e-6)
    pooled = {name: total.terms[name].item() / den for name in objective.coefficients}
    assert pooled == pytest.approx({"ce": 0.487369, "l1": 0.337306, "bce": 0.515625}, abs=1e-5)
    loss = sum(alpha * pooled[name] for name, alpha in objective.coefficients.items())
    assert loss == pytest.approx(0.867937, abs=1e-5)
    counts = SimpleNamespace(blocks=torch.tensor(1.0))
    metrics = {k: v.item() for k, v in objective.metrics(total, counts).items()}
    # tau_probabilistic = 1 + c*_0 + c*_0·c*_1; |σ(u) − c*| = [.2, .25]
    assert metrics == pytest.approx({"tau_probabilistic": 2.4, "conf_target": 0.85, "conf_abs_err": 0.225,
                                     "conf_bias": -0.225}, abs=1e-5)


def test_cumulative_mask_is_the_default():
    chunk = SlotChunk(logits=torch.zeros(1, 1, 3, 5), labels=torch.zeros(1, 1, 3, dtype=torch.long),
                      valid=torch.tensor([[[True, False, True]]]), drafted=torch.ones(1, 1, 3, dtype=torch.bool),
                      teacher_logits=torch.zeros(1, 1, 3, 5), extras={"confidence_logits": torch.zeros(1, 1, 3)})
    total = make_objective("dspark")(chunk)
    assert total.token_sum.item() == 1 and total.weight_sum.item() == pytest.approx(1.0)  # slot 2 dropped


# ----------------------------------------------------------------------------- the Markov bias in every use
def _reference_sums(hidden, final_hidden, lm_head, heads, blocks, gamma=4.0):
    """float64 loops: z = lm_head(h) + W2·W1[x[a+k]] (prev read from the sequence), every term, argmax hits."""
    W1, W2 = heads.markov.embed.weight.double(), heads.markov.proj.weight.double()
    wc, bc = heads.confidence.weight.double()[0], heads.confidence.bias.double()[0]
    head = lm_head.weight.double()
    out = {"ce": 0.0, "l1": 0.0, "bce": 0.0, "den": 0.0, "correct": 0, "tau_prob": 0.0}
    for b, row in enumerate(SEQ):
        for n, a in enumerate(ANCHORS[b]):
            valid = blocks.slot_valid[b, n].tolist()
            mask = ref_supervision(valid, [KEEP[b][n]] * BLOCK, "cumulative")
            run = 1.0
            for k in range(BLOCK):
                if not mask[k]:
                    run = 0.0
                    continue
                h = hidden[b, n, k].double()
                e = W1[row[a + k]]
                z = (head @ h + W2 @ e).tolist()
                q, p = ref_softmax(z), ref_softmax((head @ final_hidden[b, a + k].double()).tolist())
                l1 = sum(abs(qi - pi) for qi, pi in zip(q, p))
                c_star = min(1.0, max(0.0, 1 - l1 / 2))
                u = float((wc @ torch.cat([h, e]) + bc).detach())
                bce = -(c_star * math.log(1 / (1 + math.exp(-u))) + (1 - c_star) * math.log(1 / (1 + math.exp(u))))
                w = math.exp(-k / gamma)
                label = row[a + k + 1]
                out["ce"] += w * ref_ce(z, label)
                out["l1"] += w * l1
                out["bce"] += w * bce
                out["den"] += w
                out["correct"] += int(max(range(VOCAB), key=lambda v: z[v]) == label)
                run *= c_star
                out["tau_prob"] += run
    return out


def test_markov_bias_is_inside_ce_l1_confidence_target_and_argmax():
    torch.manual_seed(2)
    heads, lm_head = _heads(), nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    hidden, final_hidden = torch.randn(2, 3, BLOCK, HIDDEN), torch.randn(2, len(SEQ[0]), HIDDEN)
    blocks = _blocks(SEQ, LOSS_MASK, ANCHORS, KEEP)
    module = _module(heads, lm_head)
    total, counts = chunked_objective(hidden, blocks, module.objective, module.chunk_logits, chunk_blocks=2,
                                      teacher=lambda pos: teacher_logits(final_hidden, pos, lm_head))
    ref = _reference_sums(hidden, final_hidden, lm_head, heads, blocks)
    for name in ("ce", "l1", "bce"):
        assert total.terms[name].item() == pytest.approx(ref[name], rel=1e-5, abs=1e-6), name
    assert total.weight_sum.item() == pytest.approx(ref["den"], rel=1e-6)
    assert total.stats[TAU_PROB_SUM].item() == pytest.approx(ref["tau_prob"], rel=1e-5)  # c* has the bias
    assert counts.correct.sum().item() == ref["correct"]  # accuracy uses the biased argmax
    # The bias is decisive here: without it the argmax differs on some supervised slot.
    biased, _ = module.chunk_logits(hidden, blocks)
    assert (biased.argmax(-1) != lm_head(hidden).argmax(-1))[blocks.slot_valid].any()


def test_heads_are_trained_and_checkpointed_but_the_target_is_not():
    heads, lm_head = _heads(), nn.Linear(HIDDEN, VOCAB, bias=False)
    module = _module(heads, lm_head)
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in heads.parameters()} <= optimized and id(lm_head.weight) not in optimized
    keys = set(module.state_dict())
    assert {"heads.markov.embed.weight", "heads.markov.proj.weight", "heads.confidence.weight",
            "heads.confidence.bias"} <= keys
    assert not any("lm_head" in k for k in keys)


# ------------------------------------------------------------------- global reduction (docs/conventions.md)
def test_pooled_reduction_equals_the_global_weighted_mean_across_two_ranks():
    """Rank r's loss is W·num_r/(den_1 + den_2); Σ_r grads / W must be the gradient of the global mean."""
    torch.manual_seed(3)
    heads, lm_head = _heads(), nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    shared = nn.Linear(HIDDEN, HIDDEN)  # stands in for the replicated drafter
    final_hidden = torch.randn(2, len(SEQ[0]), HIDDEN)
    rank_rows = [[0], [1]]  # rank 0 holds sequence 0 (more valid slots), rank 1 sequence 1
    inputs = [torch.randn(1, 3, BLOCK, HIDDEN) for _ in rank_rows]

    def rank_total(r, module):
        rows = rank_rows[r]
        blocks = _blocks([SEQ[i] for i in rows], [LOSS_MASK[i] for i in rows], [ANCHORS[i] for i in rows],
                         [KEEP[i] for i in rows])
        total, _ = chunked_objective(shared(inputs[r]), blocks, module.objective, module.chunk_logits, chunk_blocks=2,
                                     teacher=lambda pos: teacher_logits(final_hidden[rows], pos, lm_head))
        return total

    module = _module(heads, lm_head)
    params = list(shared.parameters()) + list(heads.parameters())
    totals = [rank_total(r, module) for r in range(2)]
    assert totals[0].token_sum.item() != totals[1].token_sum.item()
    global_den = sum(t.weight_sum.detach() for t in totals)
    summed_sums = sum(pack(local_sums(t, None, module.objective.normalizer, 1)) for t in totals)  # the all-reduce
    module.trainer = SimpleNamespace(world_size=2, global_step=0, max_steps=1, strategy=SimpleNamespace(reduce=lambda x, reduce_op: summed_sums))
    summed, value = [torch.zeros_like(p) for p in params], 0.0
    for r in range(2):
        loss = module.reduce(rank_total(r, module), num_sequences=1)
        value += loss.item() / 2
        for acc, grad in zip(summed, torch.autograd.grad(loss, params)):
            acc += grad / 2

    alphas = module.objective.coefficients
    global_mean = sum(a * (totals[0].terms[n] + totals[1].terms[n]) for n, a in alphas.items()) / global_den
    assert value == pytest.approx(global_mean.item(), rel=1e-5)
    for acc, grad in zip(summed, torch.autograd.grad(global_mean, params)):
        torch.testing.assert_close(acc, grad, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------- config
def _compose(*overrides):
    from hydra import compose, initialize_config_module

    from dflashtrain.config.schema import register_configs

    register_configs()
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("train", overrides=list(overrides))


def test_loss_dspark_composes_the_whole_method():
    cfg = _compose("loss=dspark")
    from omegaconf import OmegaConf

    from dflashtrain.config.losses import DSparkLossConfig

    assert OmegaConf.get_type(cfg.loss) is DSparkLossConfig
    assert (cfg.loss.ce_alpha, cfg.loss.l1_alpha, cfg.loss.conf_alpha, cfg.loss.gamma) == (0.1, 0.9, 1.0, 4.0)
    assert cfg.loss.mask_mode.value == "cumulative"
    assert (cfg.model.drafter.markov_rank, cfg.model.drafter.block_size) == (32, 7)
    assert _compose("loss=dspark", "model.drafter.markov_rank=8").model.drafter.markov_rank == 8  # CLI wins
    assert _compose().model.drafter.markov_rank == 0  # the default (decay) has no heads


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["loss=dspark", "model.drafter.markov_rank=0"], "model.drafter.markov_rank"),  # confidence head needs W1
        (["loss=decay", "model.drafter.markov_rank=8"], "model.drafter.markov_rank"),  # DFlash convention
        (["loss=dspark", "model.drafter.markov_rank=-1"], "model.drafter.markov_rank"),
        (["loss=dspark", "loss.l1_alpha=-0.5"], "loss.l1_alpha"),
        (["loss=dspark", "loss.ce_alpha=0", "loss.l1_alpha=0"], "loss.ce_alpha"),
    ],
)
def test_contradictions_fail_at_validation_naming_the_key(overrides, key, tmp_path):
    from dflashtrain.config.checks import validate
    from dflashtrain.config.errors import ConfigError

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text("")
    cfg = _compose(*overrides, f"model.target.path={tmp_path}", f"data.path={tmp_path / 'train.jsonl'}",
                   "paths.output_dir=/tmp/unused")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key


def test_no_confidence_head_without_its_loss_weight(tmp_path):
    from dflashtrain.config.checks import validate

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text("")
    validate(_compose("loss=dspark", "model.drafter.markov_rank=0", "loss.conf_alpha=0",
                      f"model.target.path={tmp_path}", f"data.path={tmp_path / 'train.jsonl'}",
                      "paths.output_dir=/tmp/unused"))  # plain next-token drafter with L1: allowed
    objective = make_objective("dspark", conf_alpha=0.0)
    assert set(objective.coefficients) == {"ce", "l1"} and not objective.uses_confidence


# --------------------------------------------------------------------------------------------- end to end
def test_cli_loss_dspark_trains_logs_every_term_decodes_and_checkpoints_the_heads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dflashtrain.assets import TINY_TRAIN_JSONL

    data = tmp_path / "train.jsonl"
    data.write_text("".join(open(TINY_TRAIN_JSONL).readlines()[:48]))
    out = tmp_path / "out"
    cli = [sys.executable, "-c", "from dflashtrain.cli import train; train()"]
    result = subprocess.run([*cli, "loss=dspark", f"paths.output_dir={out}", f"data.path={data}",
                             "trainer.max_steps=3", "data.batch_size=8", "trainer.enable_progress_bar=false",
                             "trainer.log_every_n_steps=1", "eval.every_n_steps=3", "eval.num_prompts=2",
                             "eval.max_new_tokens=8"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    for tag in ("ce", "l1", "bce", "tau_probabilistic", "conf_abs_err", "conf_bias", "tau_est", "acc_k/0"):
        assert f"train/{tag}" in last, f"train/{tag} not logged"
    assert last["train/loss"] == pytest.approx(0.1 * last["train/ce"] + 0.9 * last["train/l1"] + last["train/bce"],
                                               rel=1e-4)
    assert 0 <= last["train/l1"] <= 2 and 1 <= last["train/tau_probabilistic"] <= 8  # B = 7 drafts + bonus
    assert 1 <= last["val/tau"] <= 8  # real decoding with DSpark drafts: B = 7 drafts + the bonus token at most

    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state, meta = checkpoint["state_dict"], checkpoint["dflashtrain"]
    hidden = meta["geometry"]["hidden_size"]
    assert state["heads.markov.embed.weight"].shape[1] == 32
    assert state["heads.confidence.weight"].shape == (1, hidden + 32)
    assert meta["label_offset"] == 1 and meta["family"] == "dspark"
    assert meta["head_options"] == {"markov_rank": 32, "confidence_head": True}
    assert meta["geometry"]["block_size"] == 7
    assert not any("lm_head" in k or "embed_tokens" in k for k in state)
    heads = load_checkpoint(out / "checkpoints" / "last.ckpt").heads
    assert heads.markov_rank == 32 and heads.confidence is not None
    exported = export_tensors(heads)
    assert set(exported) == {"markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
                             "confidence_head.proj.weight", "confidence_head.proj.bias"}  # the engines' names
    assert torch.equal(exported["markov_head.markov_w2.weight"], state["heads.markov.proj.weight"])
