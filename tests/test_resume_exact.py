"""Long runs survive: a run killed (kill -9) or preempted (SIGTERM, SIGUSR1, Ctrl-C) at an arbitrary step and resumed
from last.ckpt repeats the uninterrupted run's loss curve bit for bit on CPU, and the signals save a resumable
checkpoint and exit 128 + the signal.

Every run here is a real `dflashtrain` process (tests/signalled.py sends the signal from inside a step). The data has
32 rows in batches of 4, so an epoch is 8 batches: the resumes below start at an epoch's end, in the middle of one
and before one. Losses are
compared as the CSV logger writes them (Python's shortest exact float repr), in the directory the run was resumed
into, which also shows that a resumed run continues its metrics.csv instead of overwriting it.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_count_up_chats

TESTS = Path(__file__).resolve().parent
QUIET = ["trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "eval.every_n_steps=0",
         "data.batch_size=4"]


def launch(out: Path, *overrides: str, signal_at: int = 0, signal_name: str = "SIGKILL", env=None, wait=True):
    """A dflashtrain process writing to ``out`` (paths.output_dir and Hydra's run dir beside it)."""
    command = [sys.executable, str(TESTS / "signalled.py")] if signal_at else \
        [sys.executable, "-c", "from dflashtrain.cli import train; train()"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None)
    if signal_at:
        environment.update(SIGNAL_AT_STEP=str(signal_at), SIGNAL=signal_name)
    args = [*command, f"paths.output_dir={out}", f"hydra.run.dir={out}", *QUIET, *overrides]
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    return subprocess.run(args, capture_output=True, text=True, env=environment, timeout=600)


def losses(out: Path) -> dict:
    with open(out / "csv" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    steps = [int(row["step"]) for row in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {int(row["step"]): row["train/loss"] for row in rows}


def scalars(out: Path, tag: str) -> list:
    """(step, value) of a TensorBoard tag, as TensorBoard shows it (a resumed run's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def last_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_count_up_chats(tmp_path_factory.mktemp("data") / "train.jsonl", 32)


DECAY = ["loss=decay", "logger=csv", "trainer.max_steps=13", "checkpoint.every_n_train_steps=4"]


@pytest.fixture(scope="module")
def decay_reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("decay") / "reference"
    result = launch(out, f"data.path={data}", *DECAY, "resume_from=auto")  # nothing to resume yet: a new run
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_final_step_is_in_last_ckpt_with_the_random_states(decay_reference):
    """13 steps, checkpoints every 4: Lightning alone would leave step 12 in last.ckpt."""
    from dflashtrain.train.resume import rng_state, set_rng_state

    checkpoint = torch.load(decay_reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 13 and sorted(losses(decay_reference)) == list(range(13))
    saved = next(state["rng"] for key, state in checkpoint["callbacks"].items() if key.startswith("ResumeState"))
    assert {"python", "numpy", "torch"} <= set(saved)
    here = rng_state()
    set_rng_state(saved)  # what a resume does; then the generators continue from the saved states
    assert torch.equal(torch.get_rng_state(), saved["torch"]) and rng_state()["python"] == tuple(saved["python"])
    set_rng_state(here)


def test_kill_9_then_resume_repeats_the_loss_curve_bitwise(data, decay_reference, tmp_path):
    out = tmp_path / "run"
    killed = launch(out, f"data.path={data}", *DECAY, signal_at=9, signal_name="SIGKILL")
    assert killed.returncode == -9
    assert step_of(out / "checkpoints" / "last.ckpt") == 8  # the end of epoch 0: the resume starts epoch 1
    resumed = launch(out, f"data.path={data}", *DECAY, f"resume_from={out / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(decay_reference)  # steps 0..7 from the killed run, 8..12 resumed: all identical
    assert step_of(out / "checkpoints" / "last.ckpt") == 13


def test_sigterm_saves_exits_143_and_resumes_bitwise(data, decay_reference, tmp_path):
    out = tmp_path / "run"
    stopped = launch(out, f"data.path={data}", *DECAY, signal_at=8, signal_name="SIGTERM")
    last = out / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert last_line(stopped) == f"dflashtrain: stopped: SIGTERM: stopped at step 9; resumable checkpoint {last} " \
                                 f"(resume_from={last})"
    assert step_of(last) == 9 and "Traceback" not in stopped.stderr
    resumed = launch(out, f"data.path={data}", *DECAY, "resume_from=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(decay_reference)


def test_dspark_with_accumulation_kill_9_then_resume_bitwise(data, tmp_path):
    """DSpark (its heads and optimizer state too), two micro-batches per step: killed inside an accumulation."""
    settings = [f"data.path={data}", "loss=dspark", "trainer.accumulate_grad_batches=2", "trainer.max_steps=7",
                "checkpoint.every_n_train_steps=3", "logger=tensorboard"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert launch(reference, *settings).returncode == 0
    killed = launch(out, *settings, signal_at=4, signal_name="SIGKILL")
    assert killed.returncode == -9 and step_of(out / "checkpoints" / "last.ckpt") == 3
    resumed = launch(out, *settings, f"resume_from={out / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # TensorBoard in the resumed directory: each step once, the killed run's steps after the checkpoint purged
    assert scalars(out, "train/loss") == scalars(reference, "train/loss")
    assert [step for step, _ in scalars(reference, "train/loss")] == list(range(7))
    reference_state = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed_state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for name, tensor in reference_state["state_dict"].items():
        assert torch.equal(resumed_state["state_dict"][name], tensor), name


def test_sigusr1_under_slurm_saves_requeues_and_exits_138(data, tmp_path):
    """What SLURM sends before the time limit (--signal=USR1@90): save, `scontrol requeue <job>`, exit 138."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "drafter",
             "SLURM_NODELIST": "localhost", "SLURM_NTASKS_PER_NODE": "1"}
    out = tmp_path / "run"
    stopped = launch(out, f"data.path={data}", "trainer.max_steps=6", "checkpoint.every_n_train_steps=5",
                     "logger=none", signal_at=1, signal_name="SIGUSR1", env=slurm)
    assert stopped.returncode == 138, stopped.stderr[-3000:]
    assert last_line(stopped).endswith("; SLURM job 4242 requeued")
    assert calls.read_text().split() == ["requeue", "4242"]
    assert step_of(out / "checkpoints" / "last.ckpt") == 2


def test_ctrl_c_from_outside_saves_and_exits_130(data, tmp_path):
    """A real SIGINT from another process while training runs: the step in progress ends, is saved, exit 130.
    (A second Ctrl-C stops at once: tests/test_outputs.py.)"""
    import signal
    import time

    out = tmp_path / "run"
    process = launch(out, f"data.path={data}", "trainer.max_steps=100000", "checkpoint.every_n_train_steps=2",
                     "logger=none", wait=False)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step0000002.ckpt").exists() and process.poll() is None:
        assert time.time() < deadline, "the run never reached step 2"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("dflashtrain: stopped: SIGINT: stopped at step ") and "Traceback" not in stderr
    step = int(line.split("stopped at step ")[1].split(";")[0])
    assert step >= 2 and step_of(out / "checkpoints" / "last.ckpt") == step
