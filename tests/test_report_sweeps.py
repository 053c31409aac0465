"""Multiruns from the CLI, as a user launches them, ending in the report: a 2-run sweep (table, CSV, plots, real τ),
a sweep whose first run diverges (a failed row; the sweep and the report go on; exit 5), and a DDP sweep (one sweep
folder; the child ranks train their job in its folder and never re-run the sweep)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "checkpoint.every_n_train_steps=100",
        "eval.num_prompts=1", "eval.max_new_tokens=4", "hydra.callbacks.report.num_prompts=2",
        "hydra.callbacks.report.max_new_tokens=8"]
COLUMNS = ["run", "loss", "status", "exit_code", "steps", "loss_final", "loss_best", "acc_final", "acc_best",
           "tau_est_final", "tau_est_best", "val_tau_final", "val_tau_best", "tau", "tokens_per_s", "step_time_s",
           "wall_s", "tau_prompts", "tau_note", "objective", "winner_of", "error", "run_dir"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from dflashtrain.assets import TINY_TRAIN_JSONL

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(open(TINY_TRAIN_JSONL).readlines()[:48]))
    return path


def sweep(cwd: Path, *overrides: str, module: bool = False):
    """`dflashtrain -m ...` in ``cwd``; ``module``: as `python -m dflashtrain` (what DDP children re-run)."""
    entry = ["-m", "dflashtrain"] if module else ["-c", "from dflashtrain.cli import train; train()"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *entry, "-m", *overrides], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


def rows_of(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def table_lines(stdout: str):
    return [line for line in stdout.splitlines() if line.startswith("| ")]


def test_a_two_run_sweep_ends_in_the_table_csv_plots_and_real_tau(data, tmp_path, monkeypatch):
    result = sweep(tmp_path, "loss=decay,dpace", "trainer.max_steps=3", "eval.every_n_steps=2", f"data.path={data}",
                   "hydra.sweep.dir=sweep", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    header, *lines = table_lines(result.stdout)
    assert header.startswith("| run | loss | status | steps | loss final | loss best | acc final |")
    assert len(lines) == 2 and lines[0].startswith("| 0 | decay | completed | 3 |")
    assert lines[1].startswith("| 1 | dpace | completed | 3 |")
    assert "greedy speculative decoding (dflashtrain-eval) of 2 held-out prompts" in result.stdout
    assert "at most 8 new tokens each" in result.stdout

    report = tmp_path / "sweep" / "report"
    rows = rows_of(report / "report.csv")
    assert list(rows[0]) == COLUMNS and [r["loss"] for r in rows] == ["decay", "dpace"]
    for row in rows:
        assert row["status"] == "completed" and row["steps"] == "3" and row["tau_prompts"] == "2"
        assert 1.0 <= float(row["tau"]) <= 8.0 and 1.0 <= float(row["val_tau_final"]) <= 8.0  # B = 8
        assert float(row["loss_final"]) > 0 and 0 <= float(row["acc_best"]) <= 1
        assert float(row["tokens_per_s"]) > 0 and float(row["step_time_s"]) > 0 and float(row["wall_s"]) > 0
        evaluated = json.loads(Path(row["run_dir"] if os.path.isabs(row["run_dir"]) else tmp_path / row["run_dir"],
                                    "report_tau", "eval.json").read_text())
        assert evaluated["tau"] == pytest.approx(float(row["tau"])) and evaluated["global_step"] == 3
    for name in ("loss", "acc", "tau_est", "val_tau"):
        assert (report / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (report / "report.md").read_text().strip() in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing written anywhere else

    # a second report reuses each run's τ (nothing is decoded) while the checkpoints are unchanged
    import dflashtrain.inference.evaluate as evaluate
    from dflashtrain.config.schema import ReportConfig
    from dflashtrain.report.app import make_report

    monkeypatch.setattr(evaluate, "run", lambda cfg: pytest.fail("decoded again"))
    monkeypatch.chdir(tmp_path)
    again = make_report(["sweep"], ReportConfig(num_prompts=2, max_new_tokens=8), tmp_path / "again")
    assert [row["tau"] for row in again.rows] == [float(row["tau"]) for row in rows]


def test_a_run_failing_mid_sweep_is_a_failed_row_and_the_sweep_and_report_go_on(data, tmp_path):
    result = sweep(tmp_path, "optim.lr=1e30,5e-3", "trainer.max_steps=2", "eval.every_n_steps=0",
                   f"data.path={data}", "hydra.sweep.dir=sweep", *TINY)
    assert result.returncode == 5, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dflashtrain: error:")]
    assert errors[0].startswith("dflashtrain: error: non-finite loss nan at step 1")
    assert errors[0].endswith("(this run failed; the sweep goes on)")
    assert errors[-1].startswith("dflashtrain: error: multirun: 1 of 2 runs did not complete (run 0: failed (exit 3)")
    lines = table_lines(result.stdout)[1:]
    assert len(lines) == 2 and lines[0].startswith("| 0 | 1e+30 | failed (exit 3): non-finite loss nan at step 1")
    assert lines[1].startswith("| 1 | 0.005 | completed | 2 |")
    rows = rows_of(tmp_path / "sweep" / "report" / "report.csv")
    assert [(r["status"].split(" ")[0], r["exit_code"]) for r in rows] == [("failed", "3"), ("completed", "0")]
    assert rows[0]["tau_note"] == "" and float(rows[0]["tau"]) >= 1.0  # measured on its last-good checkpoint
    assert float(rows[1]["tau"]) >= 1.0 and rows[0]["winner_of"] == ""


def test_a_ddp_sweep_writes_one_sweep_folder_and_its_ranks_train_each_job_there(data, tmp_path):
    fixed = ["parallelism=ddp", "parallelism.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=1",
             "eval.every_n_steps=0", f"data.path={data}", "data.batch_size=4", *TINY]
    short_names = "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(o.split("=")[0] for o in fixed) + "]"
    result = sweep(tmp_path, "loss=decay,dpace", *fixed, "hydra.sweep.dir=sweep", "hydra.callbacks.report.tau=false",
                   short_names, module=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no rank wrote outputs/ or another multirun/
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name != "report")
    assert [p.name for p in runs] == ["0_loss=decay", "1_loss=dpace"]
    for run in runs:
        assert {"train.log", "train_ddp_process_1.log", "status.json", "checkpoints"} <= {p.name for p in run.iterdir()}
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run / "train_ddp_process_1.log").read_text()
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert len(table_lines(result.stdout)) == 1 + 2
