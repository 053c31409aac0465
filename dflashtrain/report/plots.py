"""PNG plots of the logged curves against step, one line per run, drawn with matplotlib's Agg canvas (no display).

Train metrics are drawn raw (faint) and as their trailing mean (dflashtrain/report/table.py, SMOOTH); val/tau as
measured, with markers. A run that did not complete is dashed and says so in the legend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

from dflashtrain.report.runs import Run
from dflashtrain.report.table import SMOOTH, trailing_means

# tag -> (file name, y-axis label)
PLOTS = {
    "train/loss": ("loss.png", "train/loss (objective's weighted loss)"),
    "train/acc": ("acc.png", "train/acc (drafted-token accuracy)"),
    "train/tau_est": ("tau_est.png", "train/tau_est (1 + leading correct drafts)"),
    "val/tau": ("val_tau.png", "val/tau (τ by speculative decoding)"),
}


def plot_curves(runs: Sequence[Run], labels: Sequence[str], title: str, output_dir: Path) -> List[Path]:
    """One PNG per tag of PLOTS that some run logged; returns the files written."""
    written = []
    for tag, (file_name, _) in PLOTS.items():
        figure = curve_figure(tag, runs, labels, title)
        if figure is not None:
            figure.savefig(output_dir / file_name, dpi=110)
            written.append(output_dir / file_name)
    return written


def curve_figure(tag: str, runs: Sequence[Run], labels: Sequence[str], title: str):
    """The figure of one tag (a matplotlib Figure), or None if no run logged it."""
    from matplotlib.figure import Figure

    logged = [(run, label) for run, label in zip(runs, labels) if run.scalars.get(tag)]
    if not logged:
        return None
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.subplots()
    for index, (run, label) in enumerate(logged):
        finished = run.state in ("completed", "unknown")
        style, color = ("-" if finished else "--"), f"C{index % 10}"
        legend = label if finished else f"{label} ({run.state})"
        points = [(s, v) for s, v in run.scalars[tag] if math.isfinite(v)]
        steps = [s for s, _ in points]
        if tag == "val/tau":
            axes.plot(steps, [v for _, v in points], style, marker="o", color=color, label=legend)
            continue
        axes.plot(steps, [v for _, v in points], "-", color=color, alpha=0.2, linewidth=0.8)
        axes.plot(steps, trailing_means(points), style, color=color, linewidth=1.8, label=legend)
    smoothing = "" if tag == "val/tau" else f" — trailing mean of {SMOOTH} logged steps, raw faint"
    axes.set_title(f"{title}: {tag}{smoothing}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(PLOTS[tag][1])
    axes.grid(True, alpha=0.3)
    axes.legend(title=legend_title(labels), fontsize="small")
    return figure


def legend_title(labels: Sequence[str]) -> str:
    return "run: overrides" if any(": " in label for label in labels) else "run"


def run_labels(runs: Sequence[Run], swept: Sequence[str], rows: Sequence[Dict]) -> List[str]:
    """``0: loss=decay`` from the job number and swept overrides, else the run's directory name."""
    labels = []
    for run, row in zip(runs, rows):
        overrides = " ".join(f"{key}={run.overrides[key]}" for key in swept if key in run.overrides)
        labels.append(f"{row['run']}: {overrides}" if overrides else row["run"])
    return labels
