"""Objective ``dpace`` (docs/objectives.md, dpace): every vector there, a float64 loop oracle, the derivative identity, gradients,
reductions, chunking, and the CLI."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from factories import make_module, make_objective
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.losses import DPaceLossConfig, DPaceMode, MaskMode, Reduction, TargetKind
from dflashtrain.data.blocks import make_blocks, sample_anchors
from dflashtrain.objectives.chunked import chunked_objective
from dflashtrain.objectives.protocol import SlotChunk
from dflashtrain.objectives.weights import dpace_raw_weights, dpace_weights
from reference import ref_ce, ref_soft_ce, ref_softmax, ref_supervision

MODES = ("full", "cumulative", "continuation")


def _weights(conf, valid=None, alpha=0.5, mode="full", raw=False):
    conf = torch.tensor(conf)
    valid = torch.ones_like(conf, dtype=torch.bool) if valid is None else torch.tensor(valid, dtype=torch.bool)
    return (dpace_raw_weights if raw else dpace_weights)(conf, valid, alpha, mode)


def naive_weights(conf, valid, alpha, mode):
    """The D-PACE weights per element in float64 Python loops, one block: list of L confidences -> list of L weights."""
    length = len(conf)
    q_tilde = [alpha + (1 - alpha) * conf[j] if valid[j] else 1.0 for j in range(length)]
    cumulative = []
    for j in range(length):
        product = 1.0
        for i in range(j + 1):
            product *= q_tilde[i]
        cumulative.append(product)
    out = []
    for j in range(length):
        suffix = sum(cumulative[m] for m in range(j, length) if valid[m])
        raw = {"full": suffix, "cumulative": cumulative[j], "continuation": suffix / cumulative[j]}[mode]
        out.append(raw if valid[j] else 0.0)
    return out


# ------------------------------------------------------------------------------------------------ the vectors of docs/objectives.md
@pytest.mark.parametrize("conf,alpha,expected", [
    ([0.8, 0.5], 0.5, [1.575, 0.675]),
    ([0.9, 0.6, 0.3, 0.8], 0.5, [2.6486, 1.6986, 0.9386, 0.4446]),
    ([0.9, 0.6, 0.3, 0.8], 0.3, [2.234783, 1.304783, 0.635183, 0.293687]),
    ([0.3, 0.9, 0.1, 0.6, 0.7], 1.0, [5.0, 4.0, 3.0, 2.0, 1.0]),  # α = 1: the linear ramp, not uniform
    ([1.0, 1.0, 1.0], 0.5, [3.0, 2.0, 1.0]),  # conf all 1 -> [3, 2, 1] for any α
    ([1.0, 1.0, 1.0], 0.05, [3.0, 2.0, 1.0]),
    ([1.0, 1.0, 1.0], 1.0, [3.0, 2.0, 1.0]),
])
def test_spec_vectors_full(conf, alpha, expected):
    torch.testing.assert_close(_weights(conf, alpha=alpha), torch.tensor(expected), rtol=0, atol=1e-6)


def test_spec_masked_slot():
    conf, valid = [0.9, 0.2, 0.3, 0.8], [1, 0, 1, 1]
    torch.testing.assert_close(_weights(conf, valid), torch.tensor([2.12325, 0.0, 1.17325, 0.55575]), rtol=0, atol=1e-6)
    raw = _weights(conf, valid, raw=True)
    assert abs(raw[1].item() - 1.17325) < 1e-6  # the raw weight at an invalid slot is not zero
    kept = _weights([0.9, 0.3, 0.8])  # = the weights of the kept slots alone
    torch.testing.assert_close(_weights(conf, valid)[[0, 2, 3]], kept, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,expected", [
    ("cumulative", [0.9, 0.675, 0.43875]),
    ("continuation", [2.2375, 1.65, 1.0]),
    ("full", [2.01375, 1.11375, 0.43875]),
])
def test_spec_modes(mode, expected):
    torch.testing.assert_close(_weights([0.8, 0.5, 0.3], mode=mode), torch.tensor(expected), rtol=0, atol=1e-6)


def test_spec_batched_rows_are_independent():
    got = _weights([[0.8, 0.5], [0.2, 0.9]])
    torch.testing.assert_close(got, torch.tensor([[1.575, 0.675], [1.17, 0.57]]), rtol=0, atol=1e-6)


def test_weights_never_require_grad_and_are_fp32():
    conf = torch.tensor([[0.8, 0.5, 0.3]], dtype=torch.float64, requires_grad=True)
    for mode in MODES:
        weights = dpace_weights(conf, torch.ones(1, 3, dtype=torch.bool), 0.5, mode)
        assert not weights.requires_grad and weights.dtype == torch.float32


def test_unknown_mode_raises_listing_valid_ones():
    with pytest.raises(ValueError, match="continuation"):
        _weights([0.5, 0.5], mode="suffix")


# ------------------------------------------------------------------------------------------ random vs float64 loop
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 8), (1, 2, 16)])
@pytest.mark.parametrize("alpha", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_weights_match_naive_loop(shape, alpha, mode):
    gen = torch.Generator().manual_seed(100 * len(shape) + int(100 * alpha) + MODES.index(mode))
    conf = torch.rand(shape, generator=gen)
    conf.view(-1)[::7] = 1.0  # certain slots
    valid = torch.rand(shape, generator=gen) < 0.7
    valid[..., 0] = False  # the anchor slot
    valid.view(-1, shape[-1])[-1] = False  # a dummy block: weighs nothing
    got = dpace_weights(conf, valid, alpha, mode).view(-1, shape[-1])
    for row, (c, v) in enumerate(zip(conf.view(-1, shape[-1]).tolist(), valid.view(-1, shape[-1]).tolist())):
        expected = torch.tensor(naive_weights(c, v, alpha, mode), dtype=torch.float64)
        torch.testing.assert_close(got[row].double(), expected, rtol=2e-6, atol=1e-6)
    assert (got[-1] == 0).all()


@pytest.mark.parametrize("valid", [[1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0]])
def test_weight_is_derivative_of_expected_run(valid):
    """w_j = ∂S/∂log q̃_j with S = Σ_m valid_m Π_{i≤m} q̃_i, by central finite differences in float64."""
    alpha, step = 0.4, 1e-6
    conf = [0.85, 0.3, 0.6, 0.95, 0.1, 0.7]
    q_tilde = [alpha + (1 - alpha) * c if v else 1.0 for c, v in zip(conf, valid)]

    def expected_run(log_q):
        total, product = 0.0, 1.0
        for m, lq in enumerate(log_q):
            product *= math.exp(lq)
            total += product * valid[m]
        return total

    log_q = [math.log(x) for x in q_tilde]
    weights = _weights(conf, valid, alpha=alpha)
    for j in range(len(conf)):
        if not valid[j]:
            continue
        up, down = list(log_q), list(log_q)
        up[j] += step
        down[j] -= step
        derivative = (expected_run(up) - expected_run(down)) / (2 * step)
        assert abs(weights[j].item() - derivative) < 1e-5, j


# ------------------------------------------------------------------------------------------ objective vs loops
def _random_chunk(seed: int, with_teacher: bool, block_size: int = 5, vocab: int = 7) -> SlotChunk:
    gen = torch.Generator().manual_seed(seed)
    b, c = 2, 3
    keep = torch.tensor([[True, True, True], [True, True, False]])  # one dummy block
    drafted = (torch.arange(block_size) >= 1) & keep.unsqueeze(-1)
    valid = drafted & (torch.rand(b, c, block_size, generator=gen) < 0.75)
    valid[0, 0] = drafted[0, 0]
    return SlotChunk(
        logits=(torch.randn(b, c, block_size, vocab, generator=gen) * 2.0).requires_grad_(True),
        labels=torch.randint(0, vocab, (b, c, block_size), generator=gen),
        valid=valid,
        drafted=drafted,
        teacher_logits=torch.randn(b, c, block_size, vocab, generator=gen) * 2.0 if with_teacher else None,
    )


def _naive_objective(chunk: SlotChunk, alpha, mode, mask_mode, target):
    """Σ w·m·ℓ, Σ w·m, Σ m, per-slot Σ w·m and w·m per slot, all float64 loops; q from the hard CE."""
    logits, labels = chunk.logits.tolist(), chunk.labels.tolist()
    valid, drafted = chunk.valid.tolist(), chunk.drafted.tolist()
    teacher = chunk.teacher_logits.tolist() if chunk.teacher_logits is not None else None
    b, c, block_size = chunk.labels.shape
    num = den = tokens = 0.0
    per_slot = [0.0] * block_size
    wm = torch.zeros(b, c, block_size, dtype=torch.float64)
    for i in range(b):
        for n in range(c):
            m = ref_supervision(valid[i][n], drafted[i][n], mask_mode)
            conf = [math.exp(-ref_ce(logits[i][n][k], labels[i][n][k])) for k in range(block_size)]
            weights = naive_weights(conf, m, alpha, mode)
            for k in range(block_size):
                if not m[k]:
                    continue
                loss = ref_ce(logits[i][n][k], labels[i][n][k]) if target == "hard" else \
                    ref_soft_ce(logits[i][n][k], teacher[i][n][k])
                num += weights[k] * loss
                den += weights[k]
                tokens += 1
                per_slot[k] += weights[k]
                wm[i, n, k] = weights[k]
    return num, den, tokens, per_slot, wm


def _naive_grad(chunk: SlotChunk, wm: torch.Tensor, denominator: float, target: str) -> torch.Tensor:
    """d(Σ w·m·ℓ / den)/d logits, w detached: w·m·(softmax(z) − y)/den; y one-hot or softmax(teacher)."""
    b, c, block_size, vocab = chunk.logits.shape
    grad = torch.zeros(b, c, block_size, vocab, dtype=torch.float64)
    for i, n, k in torch.nonzero(wm).tolist():
        p = ref_softmax(chunk.logits[i, n, k].tolist())
        if target == "hard":
            y = [float(v == chunk.labels[i, n, k].item()) for v in range(vocab)]
        else:
            y = ref_softmax(chunk.teacher_logits[i, n, k].tolist())
        grad[i, n, k] = torch.tensor([wm[i, n, k].item() * (p[v] - y[v]) / denominator for v in range(vocab)])
    return grad


@pytest.mark.parametrize("target,mask_mode,mode,reduction", [
    ("hard", "independent", "full", "weighted_mean"),
    ("hard", "independent", "continuation", "per_token"),
    ("hard", "cumulative", "full", "per_sequence"),
    ("hard", "independent", "cumulative", "weighted_mean"),
    ("kd", "independent", "full", "weighted_mean"),
    ("kd", "cumulative", "continuation", "per_token"),
])
def test_objective_matches_naive_loop_value_and_gradient(target, mask_mode, mode, reduction):
    chunk = _random_chunk(seed=len(target) + 3 * len(mode) + len(reduction), with_teacher=target == "kd")
    objective = make_objective("dpace", alpha=0.5, mode=DPaceMode(mode), reduction=Reduction(reduction),
                               mask_mode=MaskMode(mask_mode), target=TargetKind(target))
    assert objective.label_offset == 0 and objective.needs_teacher == (target == "kd")
    out = objective(chunk)
    num, den, tokens, per_slot, wm = _naive_objective(chunk, 0.5, mode, mask_mode, target)
    assert set(out.terms) == {"ce"}
    assert abs(out.terms["ce"].item() - num) < 1e-4 * max(1.0, abs(num))
    assert abs(out.weight_sum.item() - den) < 1e-5 * max(1.0, den)
    assert out.token_sum.item() == tokens
    torch.testing.assert_close(out.slot_weight_sum.double(), torch.tensor(per_slot, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    denominator = {"weighted_mean": den, "per_token": tokens, "per_sequence": float(chunk.labels.shape[0])}[reduction]
    (out.terms["ce"] / denominator).backward()  # the weights are constants for autograd
    torch.testing.assert_close(chunk.logits.grad.double(), _naive_grad(chunk, wm, denominator, target),
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ B = 4 reductions (docs/objectives.md)
def _module_reduce(objective, total, num_sequences: int) -> float:
    """DraftModule.reduce on one CPU rank (W = 1): the module's own normalizer logic; no drafter or target needed."""
    module = make_module(drafter=nn.Identity(), target=None, objective=objective, num_anchors=1, chunk_blocks=1)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    return module.reduce(total, num_sequences).item()


@pytest.mark.parametrize("reduction,expected", [
    ("weighted_mean", 0.490597), ("per_sequence", 1.749591), ("per_token", 0.583197),
])
def test_spec_block4_reductions(reduction, expected):
    ce = torch.tensor([2.0, -math.log(0.8), -math.log(0.5), -math.log(0.3)])
    p = torch.exp(-ce)  # two-token vocabulary: CE of label 0 is exactly ce
    logits = torch.stack([p.log(), (1 - p).log()], dim=-1).view(1, 1, 4, 2)
    drafted = torch.tensor([[[False, True, True, True]]])
    chunk = SlotChunk(logits=logits, labels=torch.zeros(1, 1, 4, dtype=torch.long), valid=drafted, drafted=drafted)
    objective = make_objective("dpace", reduction=Reduction(reduction))
    total = objective(chunk)
    torch.testing.assert_close(total.slot_weight_sum, torch.tensor([0.0, 2.01375, 1.11375, 0.43875]),
                               rtol=0, atol=1e-6)  # the module logs these as train/weight_k/{k}
    assert abs(total.terms["ce"].item() - 1.749591) < 1e-6
    assert abs(_module_reduce(objective, total, num_sequences=1) - expected) < 1e-6


def test_reduction_names_map_to_normalizers_and_alpha_is_checked():
    assert [make_objective("dpace", reduction=r).normalizer for r in Reduction] == ["weight", "sequences", "tokens"]
    for alpha in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="loss.alpha"):
            make_objective("dpace", alpha=alpha)
        with pytest.raises(ConfigError, match="loss.alpha"):
            DPaceLossConfig(alpha=alpha).validate()
    DPaceLossConfig(alpha=1.0).validate()
    with pytest.warns(UserWarning, match="loss.gamma"):
        DPaceLossConfig(gamma=7.0).validate()


# ------------------------------------------------------------------------------------------ chunked = unchunked
def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(3)
    vocab, hidden_size, block_size, num_anchors, seq_len = 23, 16, 4, 5, 16
    input_ids = torch.randint(0, vocab - 1, (2, seq_len), generator=gen)
    loss_mask = torch.ones(2, seq_len, dtype=torch.long)
    loss_mask[0, 9] = 0
    loss_mask[1] = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1] + [0] * (seq_len - 8))  # 3 candidates -> 2 dummy blocks
    anchors, keep = sample_anchors(loss_mask, num_anchors, generator=gen)
    blocks = make_blocks(input_ids, loss_mask, anchors, keep, block_size, vocab - 1, label_offset=0)
    lm_head = nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    base = torch.randn(2, num_anchors, block_size, hidden_size, generator=gen) * 3.0
    objective = make_objective("dpace", alpha=0.3)

    def run(chunk_blocks, use_checkpoint):
        hidden = base.clone().requires_grad_(True)
        total, counts = chunked_objective(hidden, blocks, objective, lambda h, sub: (lm_head(h), {}), chunk_blocks,
                                          use_checkpoint=use_checkpoint)
        (total.terms["ce"] / total.weight_sum).backward()
        return total, counts, hidden.grad

    reference, ref_counts, ref_grad = run(num_anchors, False)
    direct = objective(SlotChunk(logits=lm_head(base), labels=blocks.label_ids, valid=blocks.slot_valid,
                                 drafted=blocks.drafted))
    torch.testing.assert_close(reference.terms["ce"].detach(), direct.terms["ce"])
    assert ref_grad.abs().sum() > 0
    for chunk_blocks, use_checkpoint in ((1, True), (2, True), (3, False)):
        total, counts, grad = run(chunk_blocks, use_checkpoint)
        torch.testing.assert_close(total.terms["ce"], reference.terms["ce"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(total.weight_sum, reference.weight_sum, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(total.slot_weight_sum, reference.slot_weight_sum, rtol=1e-6, atol=1e-6)
        assert total.token_sum == reference.token_sum and torch.equal(counts.accepted, ref_counts.accepted)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli(tmp_path):
    """Runs the console script on the embedded tiny target with 64 rows of its data."""
    from dflashtrain.assets import TINY_TRAIN_JSONL

    data = tmp_path / "train.jsonl"
    data.write_text("".join(Path(TINY_TRAIN_JSONL).read_text().splitlines(keepends=True)[:64]))

    def run(*overrides: str) -> subprocess.CompletedProcess:
        command = [str(Path(sys.executable).parent / "dflashtrain"), f"data.path={data}", *overrides,
                   f"paths.output_dir={tmp_path}/out", f"hydra.run.dir={tmp_path}/hydra"]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    return run


@pytest.mark.parametrize("mode", ["cumulative", "continuation"])
def test_cli_runs_dpace(cli, tmp_path, mode):
    result = cli("loss=dpace", f"loss.mode={mode}", "loss.gamma=7", "trainer.max_steps=3",
                 "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "logger=csv",
                 "data.batch_size=2", "data.num_anchors=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss.gamma=7.0 is ignored" in result.stderr  # the warning reaches the user
    assert re.search(r"objective dpace \(family dflash\): .*reduction weighted_mean", result.stderr + result.stdout)
    with open(tmp_path / "out" / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(rows) == 3 and all(math.isfinite(float(row["train/loss"])) for row in rows)
    assert float(rows[-1]["train/weight_k/1"]) > 0  # D-PACE weights reach the per-slot log


def test_cli_rejects_alpha_before_loading_weights(cli, tmp_path):
    result = cli("loss=dpace", "loss.alpha=1.5")
    assert result.returncode != 0
    assert "loss.alpha" in result.stderr and "Traceback" not in result.stderr
    assert "Loading weights" not in result.stderr + result.stdout and not (tmp_path / "out").exists()
