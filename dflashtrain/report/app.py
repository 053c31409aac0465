"""The report, top to bottom: find the runs, read them, measure real τ, write the table (Markdown + CSV) and the plots.

`dflashtrain-report DIR...` (``main``) and the Hydra callback at the end of a multirun (callback.py) both call
``make_report``. The settings and their defaults are ``ReportConfig`` (dflashtrain/config/schema.py).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import ReportConfig, register_configs
from dflashtrain.report.plots import plot_curves, run_labels
from dflashtrain.report.runs import find_runs, read_run, run_names, swept_keys
from dflashtrain.report.table import SMOOTH, markdown, seed_groups, summarize, winners_line, write_csv
from dflashtrain.report.tau import Tau, real_tau

log = logging.getLogger(__name__)


@dataclass
class Report:
    text: str  # the Markdown printed to the terminal (also report.md)
    output_dir: Path
    files: List[Path]
    rows: List[dict]

    @property
    def unfinished(self) -> List[dict]:
        return [row for row in self.rows if row["state"] != "completed"]


def check_settings(settings: ReportConfig, key: Callable[[str], str]) -> None:
    """Before any run is read; ``key`` names a setting as the user wrote it (an option, a Hydra key)."""
    if settings.num_prompts <= 0:
        raise ConfigError(key("num_prompts"), f"must be > 0, got {settings.num_prompts}")
    if settings.max_new_tokens <= 0:
        raise ConfigError(key("max_new_tokens"), f"must be > 0, got {settings.max_new_tokens}")
    if settings.eval_path is not None and not os.path.isfile(settings.eval_path):
        raise ConfigError(key("eval_path"), f"no prompt file (chat JSONL) at {settings.eval_path!r}")


def default_output(paths: Sequence[str]) -> Path:
    """<DIR>/report for one directory, else outputs/report/<date_time>."""
    if len(paths) == 1:
        return Path(paths[0]) / "report"
    return Path("outputs/report") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def make_report(paths: Sequence[str], settings: ReportConfig, output_dir: Optional[Path] = None) -> Report:
    """Report on the runs under ``paths`` (sweep or run directories) into ``output_dir``; returns what it wrote.
    The settings are checked already (check_settings)."""
    register_configs()  # the runs' configs name the asset resolver
    run_dirs = find_runs(paths)
    output_dir = Path(output_dir) if output_dir is not None else default_output(paths)
    runs = [read_run(path) for path in run_dirs]
    taus = [real_tau(run, settings.eval_path, settings.num_prompts, settings.max_new_tokens, settings.device)
            if settings.tau else Tau(None, 0, None, "not measured (tau=false)") for run in runs]
    swept = swept_keys(runs)
    rows = [summarize(run, name, tau, swept) for run, name, tau in zip(runs, run_names(runs), taus)]
    title = " + ".join(map(str, paths)) if len(paths) <= 3 else f"{len(paths)} directories"

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(str(output_dir), f"cannot write the report there: {error.strerror or error}") from None
    write_csv(rows, ["run", *swept], output_dir / "report.csv")
    files = [output_dir / "report.md", output_dir / "report.csv"]
    files += plot_curves(runs, run_labels(runs, swept, rows), title, output_dir)
    text = document(title, rows, swept, taus, runs, settings, files)
    (output_dir / "report.md").write_text(text + "\n")
    return Report(text=text, output_dir=output_dir, files=files, rows=rows)


def document(title, rows, swept, taus, runs, settings: ReportConfig, files: Sequence[Path]) -> str:
    heading = f"# {title}: {len(rows)} run{'s' * (len(rows) != 1)}"
    parts = [heading, "", markdown(rows, ["run", *swept, "status", "steps"]), "", winners_line(rows), "",
             method(taus, runs, settings)]
    groups = seed_groups(rows, swept)
    if groups is not None:
        identity = [key for key in swept if key != "seed"] + ["seeds"]
        parts += ["", "## Mean ± std over seeds", "", markdown(groups, identity, spread=True), "",
                  winners_line(groups, among="configurations, by their mean")]
    notes = [f"- {row['run']}: {row['tau_note']}" for row in rows if row["tau_note"] and settings.tau]
    if notes:
        parts += ["", "Real τ not measured:", *notes]
    parts += ["", "Files: " + ", ".join(str(path) for path in files)]
    return "\n".join(parts)


def method(taus: Sequence[Tau], runs, settings: ReportConfig) -> str:
    """How every number was obtained, stated under the table."""
    if settings.tau:
        prompts = sorted({tau.prompts for tau in taus if tau.value is not None})
        sources = sorted({settings.eval_path or run.eval_path for run in runs if settings.eval_path or run.eval_path})
        counted = "/".join(map(str, prompts)) or str(settings.num_prompts)
        where = ", ".join(sources) if sources else "no prompt file"
        tau = (f"τ (decode): greedy speculative decoding (dflashtrain-eval) of {counted} held-out prompts from "
               f"{where}, at most {settings.max_new_tokens} new tokens each, with each run's last checkpoint; "
               "τ = mean over rounds of (accepted + 1).")
    else:
        tau = "τ (decode): not measured (tau=false)."
    return (f"{tau} Train metrics: final and best of the trailing mean over {SMOOTH} logged steps; val/tau as "
            "measured during training; tokens/s and step s: medians over logged steps; wall s: the run's own.")


def parser() -> argparse.ArgumentParser:
    defaults = ReportConfig()
    p = argparse.ArgumentParser(
        prog="dflashtrain-report",
        description="Compare training runs: a table (Markdown printed, CSV), plots of loss, acc, tau_est and val/tau "
                    "against step, and real τ by speculative decoding with each run's last checkpoint.")
    p.add_argument("paths", nargs="+", metavar="DIR", help="a sweep directory (multirun/...) and/or run directories")
    p.add_argument("-o", "--output", help="where report.md, report.csv and the PNGs go "
                                          "(default: DIR/report for one DIR, else outputs/report/<date_time>)")
    p.add_argument("--num-prompts", type=int, default=defaults.num_prompts,
                   help=f"real τ: held-out prompts decoded per run (default {defaults.num_prompts})")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help=f"real τ: token budget per prompt (default {defaults.max_new_tokens})")
    p.add_argument("--eval-path", default=defaults.eval_path,
                   help="real τ: chat JSONL of held-out prompts (default: each run's data.eval_path)")
    p.add_argument("--no-tau", dest="tau", action="store_false", help="skip the decoding (no checkpoint is loaded)")
    p.add_argument("--device", default=defaults.device, help=f"real τ: device (default {defaults.device})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Report:
    args = parser().parse_args(argv)
    settings = ReportConfig(num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                            eval_path=args.eval_path, tau=args.tau, device=args.device)
    check_settings(settings, key=lambda name: "--" + name.replace("_", "-"))
    report = make_report(args.paths, settings, Path(args.output) if args.output else None)
    print(report.text)
    return report
