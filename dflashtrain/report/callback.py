"""The report at the end of every multirun: a Hydra callback (``hydra.callbacks.report`` in conf/train.yaml).

* before the first job: a sweep directory that already holds runs is refused (exit 2), so a rerun of a fixed
  sweep directory never writes over, or mixes with, the runs already there;
* after the last job: the report of the sweep directory (dflashtrain/report/app.py) is printed and written to
  ``<sweep dir>/report/``; if any run did not complete, one line says so and the command exits 5;
* after a single run only with ``single_run: true``.

Hydra turns an exception raised in a callback into a warning, so every outcome here that must end the command
exits explicitly. Only global rank 0 reports (under torchrun or SLURM every rank runs the sweep).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import ReportConfig
from dflashtrain.report.jobs import is_global_rank_zero
from dflashtrain.report.runs import is_run_dir

log = logging.getLogger(__name__)
KEY = "hydra.callbacks.report"


class SweepReport(Callback):
    def __init__(self, num_prompts: int, max_new_tokens: int, eval_path: Any, tau: bool, device: str,
                 single_run: bool):
        self.settings = ReportConfig(num_prompts=num_prompts, max_new_tokens=max_new_tokens, eval_path=eval_path,
                                     tau=tau, device=device, single_run=single_run)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_global_rank_zero():
            _exiting_on_error(lambda: check_new_sweep_dir(Path(config.hydra.sweep.dir), self.settings))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if is_global_rank_zero():
            _exiting_on_error(lambda: self.report(str(config.hydra.sweep.dir)))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.settings.single_run and is_global_rank_zero():
            _exiting_on_error(lambda: self.report(str(config.hydra.runtime.output_dir)))

    def report(self, directory: str) -> None:
        from dflashtrain.cli import SWEEP_FAILED_EXIT
        from dflashtrain.report.app import make_report

        report = make_report([directory], self.settings)
        print(report.text, flush=True)
        unfinished = report.unfinished
        if unfinished:
            first = unfinished[0]
            print(f"dflashtrain: error: multirun: {len(unfinished)} of {len(report.rows)} runs did not complete "
                  f"(run {first['run']}: {first['status']}); their rows are in {report.output_dir / 'report.md'}",
                  file=sys.stderr, flush=True)
            sys.exit(SWEEP_FAILED_EXIT)


def check_new_sweep_dir(sweep_dir: Path, settings: ReportConfig) -> None:
    """The settings, and a sweep directory that holds no run yet."""
    from dflashtrain.report.app import check_settings

    check_settings(settings, key=lambda name: f"{KEY}.{name}")
    runs = sorted(d.name for d in sweep_dir.iterdir() if is_run_dir(d)) if sweep_dir.is_dir() else []
    if runs:
        shown = ", ".join(runs[:3]) + (", …" if len(runs) > 3 else "")
        raise ConfigError("hydra.sweep.dir", f"{sweep_dir} already holds runs ({shown}); remove it, or give another: "
                                             f"hydra.sweep.dir={sweep_dir}_2 (dflashtrain-report can compare both)")


def _exiting_on_error(action: Callable[[], None]) -> None:
    """A user error prints one line and exits 2; a bug logs its traceback and exits 1 (Hydra would only warn)."""
    from dflashtrain.cli import exit_code, one_line, user_error

    try:
        action()
    except Exception as error:  # noqa: BLE001 - Hydra swallows what a callback raises; end the command here
        reported = user_error(error)
        if reported is None:
            log.exception("the report failed; the runs are intact (dflashtrain-report DIR retries it)")
            sys.exit(1)
        print(f"dflashtrain: error: {one_line(reported)}", file=sys.stderr, flush=True)
        sys.exit(exit_code(reported))
