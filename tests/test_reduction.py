"""The loss of an optimizer step is one global mean over ranks and accumulated micro-batches (docs/conventions.md,
reduction): its gradients and logged values equal those of one process training on the whole global batch.

Tolerances: gradients to 1e-5 of each tensor's largest entry (fp32 sums taken in another order; measured ≈ 4e-7),
logged values to 1e-6 relative. Without the accumulation correction the gradients differ by ≈ 1e-2 here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steps import train_steps

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dflashtrain.assets import TINY_TRAIN_JSONL

    path = tmp_path_factory.mktemp("reduction") / "train.jsonl"
    path.write_text("".join(open(TINY_TRAIN_JSONL).readlines()[:64]))
    return str(path)


@pytest.fixture(scope="module")
def one_process(data):
    """One process, batch 8: the reference every other layout must reproduce."""
    return train_steps(data, "auto", batch_size=8, accumulate=1)


def assert_same_step(got, expected):
    grads, metrics = got
    ref_grads, ref_metrics = expected
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=0, atol=1e-5 * ref.abs().max().item(), msg=name)
    assert set(metrics) == set(ref_metrics)
    for name, ref in ref_metrics.items():
        assert metrics[name] == pytest.approx(ref, rel=1e-6, abs=1e-7), name


def test_accumulating_two_micro_batches_equals_one_batch_of_twice_the_size(data, one_process):
    assert_same_step(train_steps(data, "auto", batch_size=4, accumulate=2), one_process)


def test_accumulation_is_exact_for_dpace_whose_weights_come_from_the_drafter(data):
    """D-PACE's Σ w·m is only known after the drafter ran: the gradient correction handles it too."""
    expected = train_steps(data, "auto", batch_size=8, accumulate=1, loss="dpace")
    assert_same_step(train_steps(data, "auto", batch_size=4, accumulate=2, loss="dpace"), expected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# parallelism=…[:parallelism.sharding_strategy][/trainer.accumulate_grad_batches, with batch 4 / k]
LAYOUTS = ("ddp", "fsdp2", "ddp/2", "fsdp2:SHARD_GRAD_OP/2")


def test_two_processes_equal_one_process_under_ddp_and_fsdp2(data, one_process, tmp_path):
    """2 gloo processes with batch 4 each (or 2 micro-batches of 2) vs 1 process with batch 8: loss, every logged
    term and metric, gradients."""
    out = tmp_path / "two.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(HERE / "steps.py"), str(out), data, "4", *LAYOUTS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    for layout in LAYOUTS:
        assert_same_step((results[layout]["grads"], results[layout]["metrics"]), one_process)


def test_an_empty_step_is_skipped_and_the_factor_is_one_without_accumulation():
    from dflashtrain.objectives.protocol import ChunkLoss, Normalizer
    from dflashtrain.train.reduction import AccumulationWindow, local_sums

    def sums(den):
        total = ChunkLoss(terms={"ce": torch.tensor(2.0 * den)}, weight_sum=torch.tensor(den),
                          token_sum=torch.tensor(den), slot_weight_sum=torch.zeros(4))
        return local_sums(total, None, Normalizer.weight, 1)

    window = AccumulationWindow()
    assert window.add(sums(3.7), rows=1).item() == pytest.approx(3.7)
    assert window.close(accumulate_grad_batches=1)[0] == 1.0
    window.add(sums(0.0), rows=1)  # an empty first micro-batch: P = 1, not ε
    assert window.provisional.item() == 1.0
    window.add(sums(3.0), rows=1)
    factor, step, _ = window.close(accumulate_grad_batches=2)
    assert factor == pytest.approx(2 * 1.0 / 3.0) and step.total.terms["ce"].item() == 6.0
    window.add(sums(0.0), rows=1)
    assert window.close(accumulate_grad_batches=1)[0] is None  # D = 0: the step is skipped


def test_fsdp_gathers_bf16_but_reduces_gradients_and_keeps_buffers_in_fp32():
    """FSDP1 (GPU only, so not run here): Lightning's bf16-mixed would reduce in bf16 and cast RoPE's inv_freq."""
    from lightning.pytorch.strategies import FSDPStrategy
    from omegaconf import OmegaConf

    from dflashtrain.models.dflash import DFlashDecoderLayer
    from dflashtrain.train.parallelism import build_strategy

    parallelism = OmegaConf.create({"strategy": "fsdp", "sharding_strategy": "FULL_SHARD"})
    strategy = build_strategy(parallelism, "bf16-mixed", {DFlashDecoderLayer})
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.mixed_precision_config
    assert (policy.param_dtype, policy.reduce_dtype, policy.buffer_dtype) == (torch.bfloat16, torch.float32,
                                                                              torch.float32)
    assert build_strategy(parallelism, "32-true", {DFlashDecoderLayer}).mixed_precision is None
