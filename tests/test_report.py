"""The report (dflashtrain/report): rows, winners, seeds and plots from runs written here; a run's status.json; the
DDP command line of a sweep job; the command's errors; the tiny_ablation recipe. The sweeps that train run in
test_report_sweeps.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import ReportConfig, register_configs
from dflashtrain.report.app import make_report
from dflashtrain.report.jobs import job_command_line, read_status, recorded_run, write_status
from dflashtrain.report.plots import curve_figure, run_labels
from dflashtrain.report.runs import find_runs, read_run, run_names
from dflashtrain.report.table import trailing_means

register_configs()
NO_TAU = ReportConfig(tau=False)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def make_run(root: Path, name: str, overrides, loss="decay", status="completed", scalars=None, exit_code=0,
             error=None, wall_s=60.0):
    """A run directory as a training job leaves it: .hydra/, status.json, TensorBoard events."""
    from torch.utils.tensorboard import SummaryWriter

    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      loss: {loss}\n")
    (run / ".hydra" / "config.yaml").write_text("seed: 0\ndata:\n  eval_path: null\n")
    if status is not None:
        write_status(run, {"status": status, "exit_code": exit_code, "error": error, "wall_s": wall_s,
                           "pid": 1, "host": "elsewhere"})
    writer = SummaryWriter(str(run / "tensorboard"))
    for tag, values in (scalars or {}).items():
        for step, value in enumerate(values):
            writer.add_scalar(tag, value, step)
    writer.close()
    return run


def curves(loss, acc, tau_est=None, val_tau=None, tokens=100.0, step_time=0.1):
    out = {"train/loss": loss, "train/acc": acc, "train/tau_est": tau_est or [1.0 + a for a in acc],
           "train/tokens_per_s": [tokens] * len(loss), "train/step_time": [step_time] * len(loss)}
    if val_tau:
        out["val/tau"] = val_tau
    return out


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    make_run(root, "0_loss=decay", ["loss=decay"], "decay", scalars=curves([3.0] * 12, [0.2] * 12, val_tau=[1.5, 1.8]))
    make_run(root, "1_loss=dpace", ["loss=dpace"], "dpace", scalars=curves([2.0] * 12, [0.3] * 12, val_tau=[1.6, 2.0],
                                                                           tokens=80.0, step_time=0.2))
    make_run(root, "2_loss=dspark", ["loss=dspark"], "dspark", status="failed", exit_code=3,
             error="non-finite loss nan at step 3 | x", scalars=curves([1.0, float("nan")], [0.9, 0.9]))
    return root


def close(value):  # TensorBoard stores float32
    return pytest.approx(value, rel=1e-6)


def read_csv(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_rows_winners_csv_and_plots_from_the_runs_files(sweep, tmp_path):
    report = make_report([str(sweep)], NO_TAU, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "report.csv")
    assert [r["run"] for r in rows] == ["0", "1", "2"] and [r["loss"] for r in rows] == ["decay", "dpace", "dspark"]
    assert [r["status"].split(" ")[0] for r in rows] == ["completed", "completed", "failed"]
    assert rows[2]["exit_code"] == "3" and "non-finite loss" in rows[2]["error"]
    assert float(rows[1]["acc_final"]) == close(0.3) and float(rows[0]["val_tau_best"]) == close(1.8)
    assert float(rows[0]["val_tau_final"]) == close(1.8) and float(rows[1]["tokens_per_s"]) == 80.0
    assert float(rows[0]["wall_s"]) == 60.0 and rows[0]["steps"] == "12"
    # the failed run's acc 0.9 wins nothing; losses of different objectives are not compared
    assert "acc_final" in rows[1]["winner_of"] and "val_tau_final" in rows[1]["winner_of"]
    assert "tokens_per_s" in rows[0]["winner_of"] and rows[2]["winner_of"] == ""
    assert not any("loss_" in r["winner_of"] for r in rows)
    text = report.text
    assert text.startswith(f"# {sweep}: 3 runs")
    header = text.splitlines()[2]
    for column in ("run", "loss", "status", "steps", "loss final", "loss best", "acc final", "acc best",
                   "tau_est final", "val/tau final", "val/tau best", "τ (decode)", "tokens/s", "step s", "wall s"):
        assert f"| {column} |" in header, column
    table = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(table) == 3 and "**0.300**" in table[1] and "**" not in table[2]
    assert "failed (exit 3): non-finite loss nan at step 3 \\| x" in table[2]  # a | in a message is escaped
    assert "loss not compared" in text and "not measured (tau=false)" in text
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["acc.png", "loss.png", "tau_est.png",
                                                                       "val_tau.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (tmp_path / "out").glob("*.png"))


def test_a_plot_has_one_labelled_line_per_run_and_names_the_sweep(sweep):
    runs = [read_run(path) for path in find_runs([str(sweep)])]
    labels = run_labels(runs, ["loss"], [{"run": name} for name in run_names(runs)])
    assert labels == ["0: loss=decay", "1: loss=dpace", "2: loss=dspark"]
    axes = curve_figure("train/loss", runs, labels, "multirun/x").axes[0]
    assert axes.get_title().startswith("multirun/x: train/loss") and axes.get_xlabel() == "optimizer step"
    assert axes.get_ylabel().startswith("train/loss")
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend == ["0: loss=decay", "1: loss=dpace", "2: loss=dspark (failed)"]
    val = curve_figure("val/tau", runs, labels, "multirun/x").axes[0]
    assert [t.get_text() for t in val.get_legend().get_texts()] == labels[:2]  # the run that never measured it
    assert curve_figure("train/none", runs, labels, "x") is None


def test_seed_sweeps_get_mean_and_std_per_configuration(tmp_path):
    root = tmp_path / "seeds"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for loss, accs in (("decay", (0.2, 0.4)), ("dpace", (0.5, 0.7))):
        for seed, acc in enumerate(accs):
            make_run(root, f"{job}_loss={loss},seed={seed}", [f"loss={loss}", f"seed={seed}"], loss,
                     scalars=curves([1.0] * 3, [acc] * 3))
            job += 1
    text = make_report([str(root)], NO_TAU, tmp_path / "out").text
    section = text.split("## Mean ± std over seeds")[1]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| loss | seeds | loss final |")
    assert lines[1].startswith("| decay | 0 1 |") and "0.300 ± 0.141" in lines[1]  # stdev(0.2, 0.4) = 0.1414
    assert lines[2].startswith("| dpace | 0 1 |") and "**0.600 ± 0.141**" in lines[2]
    assert "loss not compared" in section


def test_trailing_means_skip_non_finite_values():
    series = [(i, v) for i, v in enumerate([1.0, 3.0, float("nan"), 5.0])]
    assert trailing_means(series, window=2) == [1.0, 2.0, 4.0]


def test_killed_runs_are_incomplete_and_runs_without_status_unknown(tmp_path):
    killed = make_run(tmp_path, "killed", [], status=None, scalars=curves([1.0], [0.1]))
    write_status(killed, {"status": "running", "pid": 2 ** 22 + 12345, "host": os.uname().nodename})
    make_run(tmp_path, "old", [], status=None, scalars=curves([1.0], [0.1]))
    report = make_report([str(tmp_path / "killed"), str(tmp_path / "old")], NO_TAU, tmp_path / "out")
    assert [row["state"] for row in report.rows] == ["incomplete", "unknown"]
    assert "killed or lost" in report.rows[0]["status"] and report.unfinished == report.rows


def test_csv_logs_are_read_when_there_are_no_event_files(tmp_path):
    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    (run / "csv" / "metrics.csv").write_text("epoch,step,train/loss,train/acc,val/tau\n0,0,2.0,0.1,\n0,1,1.0,0.3,\n"
                                             "0,2,,,1.7\n")
    row = make_report([str(run)], NO_TAU, tmp_path / "out").rows[0]
    # smoothed: mean(2, 1) and mean(0.1, 0.3); steps: one past the last logged train step
    assert (row["loss_final"], row["acc_best"], row["val_tau_final"], row["steps"]) == (1.5, 0.2, 1.7, 2)


def test_recorded_run_writes_how_the_run_ended(tmp_path, monkeypatch):
    with pytest.raises(ConfigError), recorded_run(str(tmp_path / "new")):  # a bad config: its folder is never made
        raise ConfigError("loss.alpha", "must be in (0, 1], got 2.0")
    assert not (tmp_path / "new").exists()
    with recorded_run(str(tmp_path / "ok")):
        (tmp_path / "ok").mkdir()  # made by the run once its checks pass: the end is recorded
    done = read_status(tmp_path / "ok")
    assert (done["status"], done["exit_code"]) == ("completed", 0) and done["wall_s"] >= 0
    with recorded_run(str(tmp_path / "ok")):  # a folder that exists (as Hydra makes a job's) records the start too
        assert read_status(tmp_path / "ok")["status"] == "running"
    done = read_status(tmp_path / "ok")
    cases = [(ConfigError("loss.alpha", "must be in (0, 1], got 2.0"), "failed", 2, "loss.alpha: must be in (0, 1]"),
             (KeyboardInterrupt(), "interrupted", 130, "interrupted"),
             (ZeroDivisionError("a bug"), "failed", 1, "ZeroDivisionError: a bug")]
    for error, state, code, message in cases:
        (tmp_path / state / str(code)).mkdir(parents=True)
        with pytest.raises(type(error)), recorded_run(str(tmp_path / state / str(code))):
            raise error
        status = read_status(tmp_path / state / str(code))
        assert (status["status"], status["exit_code"]) == (state, code) and status["error"].startswith(message)
    with pytest.raises(ConfigError), recorded_run(str(tmp_path / "ok")):  # refused: ok/ is another run's folder
        raise ConfigError("paths.output_dir", "ok/checkpoints already holds checkpoints of another run")
    assert read_status(tmp_path / "ok") == done
    monkeypatch.setenv("LOCAL_RANK", "1")  # another rank: rank 0 records the run
    (tmp_path / "rank1").mkdir()
    with recorded_run(str(tmp_path / "rank1")):
        pass
    assert not (tmp_path / "rank1" / "status.json").exists()


def test_a_sweep_jobs_ddp_children_get_the_jobs_own_command_line():
    hydra_cfg = OmegaConf.create({
        "job": {"config_name": "tiny_ablation"},
        "runtime": {"config_sources": [{"provider": "hydra", "path": "pkg://hydra.conf"},
                                       {"provider": "command-line", "path": "file:///abs/recipes"}]},
        "overrides": {"task": ["loss=dpace", "parallelism=ddp"],
                      "hydra": ["hydra.mode=MULTIRUN", "hydra.sweep.dir=multirun/x", "hydra.run.dir=r"]},
    })
    assert job_command_line(hydra_cfg) == ["--config-dir=file:///abs/recipes", "--config-name=tiny_ablation",
                                           "loss=dpace", "parallelism=ddp", "hydra.sweep.dir=multirun/x"]


def test_the_report_command_names_what_is_wrong_in_one_line(tmp_path, monkeypatch, capsys):
    from dflashtrain.cli import report

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    make_run(tmp_path, "run", [], scalars=curves([1.0], [0.1]))
    cases = [(["nowhere"], "dflashtrain: error: nowhere: no such directory"),
             (["empty"], "dflashtrain: error: empty: holds no run"),
             (["empty", "--num-prompts", "0"], "dflashtrain: error: --num-prompts: must be > 0, got 0"),
             (["empty", "--eval-path", "none.jsonl"], "dflashtrain: error: --eval-path: no prompt file"),
             (["run", "--no-tau", "-o", "a_file/out"], "dflashtrain: error: a_file/out: cannot write the report")]
    for args, expected in cases:
        monkeypatch.setattr(sys, "argv", ["dflashtrain-report", *args])
        with pytest.raises(SystemExit) as exit_info:
            report()
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines


def test_a_sweep_into_a_folder_that_holds_runs_is_refused_before_any_job(tmp_path):
    sweep = tmp_path / "multirun" / "fixed"
    make_run(sweep, "0_loss=decay", ["loss=decay"])
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    command = [sys.executable, "-c", "from dflashtrain.cli import train; train()", "-m", "loss=decay,dpace",
               f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"dflashtrain: error: hydra.sweep.dir: {sweep} already "
                                                             "holds runs (0_loss=decay)")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_tiny_ablation_sweeps_the_four_objectives_into_a_fixed_folder(tmp_path):
    from dflashtrain.config.checks import validate
    from dflashtrain.config.losses import LOSS_SCHEMAS

    FOUR_OBJECTIVES = ["decay", "dpace", "dspark", "vp_drafter"]
    assert set(FOUR_OBJECTIVES) <= set(LOSS_SCHEMAS)
    first_comment = (RECIPES / "tiny_ablation.yaml").read_text().splitlines()[0]
    assert first_comment == "# dflashtrain --config-dir recipes --config-name tiny_ablation -m"
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        cfg = compose("tiny_ablation", overrides=["hydra.searchpath=[pkg://dflashtrain.conf]"],
                      return_hydra_config=True)
        assert cfg.hydra.sweep.dir == "multirun/tiny_ablation"
        assert sorted(cfg.hydra.sweeper.params.loss.split(",")) == FOUR_OBJECTIVES
        assert cfg.hydra.callbacks.report._target_ == "dflashtrain.report.callback.SweepReport"
        for loss in FOUR_OBJECTIVES:
            job = compose("tiny_ablation", overrides=["hydra.searchpath=[pkg://dflashtrain.conf]", f"loss={loss}",
                                                      f"paths.output_dir={tmp_path}"])
            validate(job)
            assert job.model.name == "tiny" and job.trainer.max_steps == 600 and job.eval.every_n_steps == 150


def test_the_report_settings_are_typed_in_the_train_config():
    with initialize_config_dir(config_dir=str(RECIPES.parent / "conf"), version_base=None):
        cfg = compose("train", overrides=["hydra.callbacks.report.num_prompts=4"], return_hydra_config=True)
    assert OmegaConf.get_type(cfg.hydra.callbacks.report) is ReportConfig
    assert (ReportConfig.num_prompts, ReportConfig.max_new_tokens) == (16, 64)  # the README's numbers
    assert cfg.hydra.callbacks.report.num_prompts == 4 and cfg.hydra.callbacks.report.single_run is False
    assert json.loads(json.dumps(OmegaConf.to_container(cfg.hydra.callbacks.report)))["tau"] is True


def test_a_swept_key_a_run_did_not_set_shows_what_its_config_used(tmp_path):
    make_run(tmp_path, "a", ["loss=dpace"], "dpace", scalars=curves([1.0], [0.1]))
    make_run(tmp_path, "b", [], "decay", scalars=curves([1.0], [0.2]))
    (tmp_path / "b" / ".hydra" / "overrides.yaml").write_text("- seed=3\n")
    report = make_report([str(tmp_path / "a"), str(tmp_path / "b")], NO_TAU, tmp_path / "out")
    assert [(row["run"], row["loss"], row["seed"]) for row in report.rows] == [("a", "dpace", "0"), ("b", "decay", "3")]


def test_the_callback_reports_after_a_multirun_and_a_single_run_only_when_asked(sweep, tmp_path, capsys):
    from dflashtrain.report.callback import SweepReport

    settings = {"num_prompts": 2, "max_new_tokens": 8, "eval_path": None, "tau": False, "device": "cpu"}
    with pytest.raises(SystemExit) as exit_info:  # run 2 failed: the table, then one line and exit 5
        multirun = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
        SweepReport(**settings, single_run=False).on_multirun_end(multirun)
    assert exit_info.value.code == 5
    out, err = capsys.readouterr()
    assert out.startswith(f"# {sweep}: 3 runs") and (sweep / "report" / "report.csv").is_file()
    assert err.strip() == ("dflashtrain: error: multirun: 1 of 3 runs did not complete (run 2: failed (exit 3): "
                           "non-finite loss nan at step 3 | x); their rows are in "
                           f"{sweep / 'report' / 'report.md'}")
    single = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(sweep / "0_loss=decay")}}})
    SweepReport(**settings, single_run=False).on_run_end(single)
    assert capsys.readouterr().out == "" and not (sweep / "0_loss=decay" / "report").exists()
    SweepReport(**settings, single_run=True).on_run_end(single)
    assert capsys.readouterr().out.startswith(f"# {sweep / '0_loss=decay'}: 1 run")
    assert (sweep / "0_loss=decay" / "report" / "loss.png").is_file()
