"""Two processes from the CLI (gloo on CPU), as the README runs them: a ddp run killed after a checkpoint and resumed
reproduces the uninterrupted run's curve; the same checkpoint resumes under fsdp2 (2 processes) and in one process
with the same global batch, and those continue the same curve. fsdp2 writes the same drafter-only checkpoint.

Tolerances: resuming under ddp is bitwise on CPU; fsdp2 and one process sum in another order (≤ 1e-5 relative).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS, EVERY = 12, 2
CLI = [sys.executable, "-m", "dflashtrain"]  # children are re-executed the same way (python -m dflashtrain.__main__)


def common(data: Path):
    return [f"data.path={data}", "data.batch_size=4", "trainer.accelerator=cpu", f"trainer.max_steps={STEPS}",
            f"checkpoint.every_n_train_steps={EVERY}", "checkpoint.save_top_k=-1", "logger=csv",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def start(cwd: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*CLI, *overrides], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group: the kill reaches every rank


def run(cwd: Path, *overrides: str) -> str:
    process = start(cwd, *overrides)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def curve(output_dir: Path, key: str = "train/loss") -> dict:
    rows = csv.DictReader(open(output_dir / "csv" / "metrics.csv"))
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted ddp run, and the same run killed (SIGKILL, every rank) once its first checkpoint exists."""
    from dflashtrain.assets import TINY_TRAIN_JSONL

    root = tmp_path_factory.mktemp("parallel")
    data = root / "train.jsonl"
    data.write_text("".join(open(TINY_TRAIN_JSONL).readlines()[:96]))
    ddp = ["parallelism=ddp", "parallelism.devices=2"]
    run(root, *ddp, *common(data), f"paths.output_dir={root / 'full'}")

    killed = root / "killed"
    process = start(root, *ddp, *common(data), f"paths.output_dir={killed}")
    deadline = time.monotonic() + 600
    while not list((killed / "checkpoints").glob("step*.ckpt")) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {output[-2000:]}"
    checkpoint = max((killed / "checkpoints").glob("step*.ckpt"))  # written atomically: complete when it exists
    return root, data, checkpoint


def resumed_curve(runs, name: str, *overrides: str) -> tuple[dict, dict, Path]:
    root, data, checkpoint = runs
    out = root / name
    run(root, *common(data), *overrides, f"resume_from={checkpoint}", f"paths.output_dir={out}")
    step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    expected = {s: v for s, v in curve(root / "full").items() if s >= step}
    assert len(expected) == STEPS - step > 0
    return curve(out), expected, out


def test_ddp_kill_and_resume_reproduces_the_uninterrupted_curve(runs):
    got, expected, _ = resumed_curve(runs, "ddp", "parallelism=ddp", "parallelism.devices=2")
    assert got == expected  # bitwise: same data position, anchors, optimizer and scheduler state


def test_fsdp2_resumes_a_ddp_checkpoint_and_writes_the_same_drafter_only_checkpoint(runs):
    from dflashtrain.export.checkpoint import load_checkpoint

    got, expected, out = resumed_curve(runs, "fsdp2", "parallelism=fsdp2", "parallelism.devices=2")
    assert got.keys() == expected.keys()
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5), step
    mine = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    theirs = torch.load(runs[0] / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert mine["global_step"] == theirs["global_step"] == STEPS
    assert {k: v.shape for k, v in mine["state_dict"].items()} == {k: v.shape for k, v in theirs["state_dict"].items()}
    assert all(k.startswith("drafter.") for k in mine["state_dict"])  # no target weights, full tensors
    adam, ref = mine["optimizer_states"][0], theirs["optimizer_states"][0]
    assert adam["param_groups"][0]["params"] == ref["param_groups"][0]["params"]  # keyed as ddp keys them
    for key, state in ref["state"].items():
        torch.testing.assert_close(adam["state"][key]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    assert load_checkpoint(out / "checkpoints" / "last.ckpt").meta["global_step"] == STEPS  # export reads it


def test_one_process_with_the_global_batch_resumes_a_two_process_checkpoint(runs):
    got, expected, _ = resumed_curve(runs, "single", "parallelism=single", "data.batch_size=8")
    assert got.keys() == expected.keys()
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5), step


def test_fsdp_on_cpu_fails_in_one_line_naming_the_options_that_run_there(tmp_path):
    result = subprocess.run([*CLI, "parallelism=fsdp", "trainer.accelerator=cpu", f"paths.output_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dflashtrain: error: parallelism.strategy: fsdp needs GPUs (trainer.accelerator=gpu); on CPU use "
        "parallelism=fsdp2 (sharded) or parallelism=ddp"]


def test_a_checkpoint_of_another_global_batch_size_continues_at_its_first_untrained_row(caplog):
    from dflashtrain.data.datamodule import resumed_batches
    from dflashtrain.data.sampling import GlobalBatchSampler

    two_ranks_of_4 = {"epoch": 1, "batches_done": 5, "global_batch_size": 8}
    assert resumed_batches(two_ranks_of_4, GlobalBatchSampler(100, 8, True, 0, 0, 1)) == 5  # 1 process × 8: exact
    assert resumed_batches(two_ranks_of_4, GlobalBatchSampler(100, 4, True, 0, 1, 2)) == 5
    assert not caplog.records
    assert resumed_batches(two_ranks_of_4, GlobalBatchSampler(100, 4, True, 0, 0, 1)) == 10  # row 40 of 100
    assert resumed_batches(two_ranks_of_4, GlobalBatchSampler(100, 6, True, 0, 0, 2)) == 3  # row 36: 40 // 12
    assert "global batches of 8 rows, this run's have 12" in caplog.text


def test_single_refuses_more_than_one_device_and_fsdp2_the_fsdp1_only_shardings(tmp_path):
    from hydra import compose, initialize_config_module

    from dflashtrain.config.checks import validate
    from dflashtrain.config.errors import ConfigError
    from dflashtrain.config.schema import register_configs

    register_configs()
    cases = {("parallelism.devices=2",): "parallelism.devices",
             ("parallelism=fsdp2", "parallelism.sharding_strategy=HYBRID_SHARD"): "parallelism.sharding_strategy"}
    for overrides, key in cases.items():
        with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
            cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])
        with pytest.raises(ConfigError) as error:
            validate(cfg)
        assert error.value.key == key, overrides
