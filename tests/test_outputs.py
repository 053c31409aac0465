"""Nothing already written is lost or damaged: atomic checkpoints and reports, a full disk that leaves every earlier
checkpoint loadable, one live run per output directory, unique default run directories, Hydra's files never
overwritten, metrics continued on resume.

Tests run as root, where file modes do not stop writes: a full disk is a real file-size limit (RLIMIT_FSIZE, the
kernel's EFBIG) in a subprocess, or a monkeypatched write in process.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import write_count_up_chats
from dflashtrain.config.errors import ConfigError
from dflashtrain.export.atomic import PARTIAL_MARK, OutputWriteError, atomic_write_text
from dflashtrain.train.checkpoint_io import SafeCheckpointIO
from dflashtrain.train.loggers import CSVMetrics
from dflashtrain.train.outputs import Refused, RunDirGuard, claim_dir, lock_dir, unlock_dir

CLI = [sys.executable, "-c", "from dflashtrain.cli import train; train()"]
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "eval.every_n_steps=0", "data.batch_size=4"]


def environment(**extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partials(directory: Path):
    return sorted(p.name for p in directory.rglob(f"*{PARTIAL_MARK}*"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_count_up_chats(tmp_path_factory.mktemp("data") / "train.jsonl", 16)


# ---------------------------------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_previous_file_and_no_partial(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    before = digest(path)

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise RuntimeError("file write failed") from OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputWriteError, match=r"^checkpoint: cannot write .*last\.ckpt: No space left on device; "
                                               r"every earlier checkpoint in .* is intact$"):
        io.save_checkpoint({"global_step": 2}, path)
    with pytest.raises(OutputWriteError, match="nothing was written"):
        atomic_write_text(tmp_path / "read_only" / "eval.json", "{}", key="output_dir")  # no such directory
    assert digest(path) == before and partials(tmp_path) == []
    assert io.load_checkpoint(path)["global_step"] == 1


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run([*CLI, f"data.path={data}", f"paths.output_dir={out}", f"hydra.run.dir={out}",
                             "trainer.max_steps=2", "checkpoint.every_n_train_steps=1", *QUIET],
                            capture_output=True, text=True, env=environment(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_full_disk_mid_run_is_one_line_exit_6_and_every_checkpoint_stays_loadable(data, finished, tmp_path):
    """The run continues in place under a file-size limit below a checkpoint's size (the kernel refuses the write
    with EFBIG, as a full disk refuses it with ENOSPC): the first save fails."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = {p.name: digest(p) for p in (out / "checkpoints").glob("*.ckpt")}
    limit = min(p.stat().st_size for p in (out / "checkpoints").glob("*.ckpt")) // 2

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([*CLI, f"data.path={data}", f"paths.output_dir={out}", f"hydra.run.dir={out}",
                             "trainer.max_steps=4", "checkpoint.every_n_train_steps=1", *QUIET,
                             f"resume_from={out / 'checkpoints' / 'last.ckpt'}"],
                            capture_output=True, text=True, env=environment(), timeout=600, preexec_fn=small_disk)
    assert result.returncode == 6 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("dflashtrain: error: checkpoint: cannot write ") and "File too large" in line
    assert line.endswith(f"every earlier checkpoint in {out / 'checkpoints'} is intact")
    assert {p.name: digest(p) for p in (out / "checkpoints").glob("*.ckpt")} == before
    assert partials(out) == []
    for name in before:
        assert torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=True)["global_step"] > 0


# ---------------------------------------------------------------------------------------------- one run per dir
def test_a_second_live_run_on_the_same_directories_is_refused_before_writing(data, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([*CLI, f"data.path={data}", f"paths.output_dir={out}", f"hydra.run.dir={out}",
                              "trainer.max_steps=100000", "checkpoint.every_n_train_steps=1", *QUIET],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step0000001.ckpt").exists():
            assert first.poll() is None and time.time() < deadline, "the first run never saved step 1"
            time.sleep(0.2)
        hydra_config = digest(out / ".hydra" / "config.yaml")
        for where, key in [([f"hydra.run.dir={out}", f"paths.output_dir={tmp_path / 'other'}"], "hydra.run.dir"),
                           ([f"hydra.run.dir={tmp_path / 'h2'}", f"paths.output_dir={out}"], "paths.output_dir")]:
            second = subprocess.run([*CLI, f"data.path={data}", "trainer.max_steps=2", *QUIET, *where],
                                    capture_output=True, text=True, env=environment(), timeout=600)
            line = second.stderr.strip().splitlines()[-1]
            assert second.returncode == 2 and line.startswith(f"dflashtrain: error: {key}: "), second.stderr[-2000:]
            assert ("in use by another live run (pid " in line) or ("already holds a run" in line), line
        assert digest(out / ".hydra" / "config.yaml") == hydra_config
        assert not (tmp_path / "other").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 143


def test_a_lock_dies_with_its_holder(tmp_path):
    """flock: a killed holder leaves no stale lock; a live one in another process keeps it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path;"
                               "from dflashtrain.train.outputs import lock_dir; lock_dir(Path(sys.argv[1]), 'k');"
                               "print('locked', flush=True); time.sleep(600)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=rf"^k: .* in use by another live run \(pid {holder.pid} on "):
        lock_dir(tmp_path, "k")
    holder.kill()
    holder.wait()
    assert lock_dir(tmp_path, "k") is True
    unlock_dir(tmp_path)


def test_default_run_directories_are_unique_within_one_second(tmp_path):
    """Four processes claim the same <time> directory at once (as four runs started in one second would)."""
    path = str(tmp_path / "outputs" / "train" / "2026-01-01_00-00-00")
    code = "import sys; from dflashtrain.train.outputs import claim_dir; print(claim_dir(sys.argv[1]))"
    workers = [subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    claimed = sorted(worker.communicate(timeout=300)[0].strip() for worker in workers)
    assert claimed == sorted([path, f"{path}_1", f"{path}_2", f"{path}_3"])
    assert claim_dir(path) == f"{path}_4" and claim_dir(path) == f"{path}_5"  # a new run of this process, a new one


def test_hydra_files_of_an_existing_run_are_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the first run\n")

    def launch(resume_from):
        config = OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}, "output_subdir": ".hydra"},
                                   "resume_from": resume_from})
        RunDirGuard().on_run_start(config)
        unlock_dir(run_dir)
        return config.hydra.output_subdir

    for resume in (None, str(tmp_path / "elsewhere" / "last.ckpt")):  # Hydra would only warn about an Exception
        with pytest.raises(Refused, match=r"^hydra\.run\.dir: .* already holds a run \(\.hydra/config\.yaml\)") \
                as info:
            launch(resume)
        assert isinstance(info.value.__cause__, ConfigError) and not isinstance(info.value, Exception)
    assert launch(str(run_dir / "checkpoints" / "last.ckpt")) == ".hydra/resume-1"  # resuming that run
    (run_dir / ".hydra" / "resume-1").mkdir()
    (run_dir / ".hydra" / "resume-1" / "config.yaml").write_text("the first resume\n")
    assert launch("auto") == ".hydra/resume-2"
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the first run\n"


# ---------------------------------------------------------------------------------------------- metrics
def test_csv_metrics_continue_on_resume(tmp_path):
    first = CSVMetrics(tmp_path, None)
    for step in range(6):
        first.log_metrics({"train/loss": 1.0 / (step + 1), "epoch": 0}, step=step)
        if step == 2:
            first.log_metrics({"val/tau": 1.5}, step=step)
    first.save()
    with open(tmp_path / "metrics.csv", "a") as handle:
        handle.write("0,6,0.14")  # a row cut short by a kill -9
    resumed = CSVMetrics(tmp_path, resume_step=4)  # the checkpoint is step 4: steps 4, 5 are repeated
    resumed.log_metrics({"train/loss": 0.2, "epoch": 0, "train/acc": 0.5}, step=4)  # a new column
    resumed.save()
    resumed.log_metrics({"train/loss": 1.0 / 6, "epoch": 0}, step=5)
    resumed.finalize("success")
    import csv

    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 2, 3, 4, 5]
    assert rows[5]["train/acc"] == "0.5" and rows[0]["train/loss"] == "1.0" and rows[4]["train/loss"] == repr(0.25)


def test_a_sweep_never_reuses_a_directory_holding_runs(tmp_path):
    (tmp_path / "0_loss=decay").mkdir()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(Refused, match=r"^hydra\.sweep\.dir: .* already holds runs"):
        RunDirGuard().on_multirun_start(config)


def test_the_eval_report_is_written_whole(tmp_path, monkeypatch):
    from dflashtrain.inference import evaluate

    report = {"tau": 2.0, "accept_rate": [0.5], "histogram": [1, 1]}
    evaluate.write_report(report, tmp_path, step=3)
    before = digest(tmp_path / "eval.json")

    def crash(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OutputWriteError, match=r"^output_dir: cannot write .*eval\.json: Read-only file system; the "
                                               r"previous eval\.json is intact$"):
        evaluate.write_report(dict(report, tau=3.0), tmp_path, step=4)
    assert digest(tmp_path / "eval.json") == before and partials(tmp_path) == []


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The first Ctrl-C asks for a save at the end of the step; the second does not wait (exit 130, one line)."""
    from dflashtrain.cli import exit_code, one_line
    from dflashtrain.train.preemption import Interrupted, Preempted, SaveOnStop

    stop = SaveOnStop(tmp_path, every_n_train_steps=5, save_last=True, save_top_k=1)
    stop.handle(signal.SIGINT, None)
    assert stop.received == signal.SIGINT
    with pytest.raises(Interrupted) as info:
        stop.handle(signal.SIGINT, None)
    assert exit_code(info.value) == 130 and not isinstance(info.value, Exception)
    assert exit_code(KeyboardInterrupt()) == 130 and one_line(KeyboardInterrupt()).startswith("SIGINT: interrupted")
    assert exit_code(Preempted(signal.SIGTERM, 3, tmp_path / "last.ckpt")) == 143


def test_a_failed_metrics_rewrite_keeps_the_old_file(tmp_path, monkeypatch):
    first = CSVMetrics(tmp_path, None)
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 0.5}, step=1)
    first.save()
    before = digest(tmp_path / "metrics.csv")
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OutputWriteError, match="^logger: cannot write .*metrics.csv: No space left on device"):
        CSVMetrics(tmp_path, resume_step=1)
    assert digest(tmp_path / "metrics.csv") == before and partials(tmp_path) == []


@pytest.mark.parametrize("output", ["csv/metrics.csv", "tensorboard/events.out.tfevents.1.host", "hpc_ckpt_1.ckpt"])
def test_a_new_run_never_writes_beside_another_runs_metrics(tmp_path, output):
    from dflashtrain.train.outputs import claimed_output_dir

    (tmp_path / output).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / output).write_text("another run's")
    with pytest.raises(ConfigError, match=f"already holds another run's outputs \\({output}\\)"):
        with claimed_output_dir(str(tmp_path), None):
            pass
