"""The comparison table: one row per run, the winner per metric, and mean ± std over seeds.

Train metrics are logged every few steps and are noisy, so "final" and "best" are read off their trailing mean over
the last ``SMOOTH`` logged values (final: at the last step; best: the best such mean over the run). val/tau is taken
as measured. tokens/s and step time are medians over the logged steps, wall time is the run's own (status.json).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dflashtrain.report.runs import Run, Series
from dflashtrain.report.tau import Tau

SMOOTH = 10


@dataclass(frozen=True)
class Metric:
    key: str  # the column in the CSV
    header: str  # the column in the Markdown table
    better: str  # "min" | "max"
    digits: int


# (tag, CSV name, better): the smoothed train metrics and val/tau, each with a final and a best column.
CURVES = (("train/loss", "loss", "min"), ("train/acc", "acc", "max"), ("train/tau_est", "tau_est", "max"),
          ("val/tau", "val_tau", "max"))
METRICS = (
    *(Metric(f"{name}_{kind}", f"{tag.removeprefix('train/')} {kind}", better, 4 if name == "loss" else 3)
      for tag, name, better in CURVES for kind in ("final", "best")),
    Metric("tau", "τ (decode)", "max", 3),
    Metric("tokens_per_s", "tokens/s", "max", 0),
    Metric("step_time_s", "step s", "min", 4),
    Metric("wall_s", "wall s", "min", 0),
)
LOSS_KEYS = ("loss_final", "loss_best")  # comparable only between runs of the same objective
CONTESTANTS = ("completed", "unknown")  # a failed or unfinished run wins nothing


def trailing_means(series: Series, window: int = SMOOTH) -> List[float]:
    """m_i = mean(v_{i-window+1..i}) over the finite values, in step order."""
    values = [v for _, v in series if math.isfinite(v)]
    means, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        means.append(total / min(i + 1, window))
    return means


def summarize(run: Run, name: str, tau: Tau, swept: Sequence[str]) -> Dict[str, Any]:
    """The run's row: identity and status, then every metric of METRICS (None when it was not logged)."""
    row: Dict[str, Any] = {"run": name}
    row.update({key: run.value_of(key) for key in swept})
    row.update(status=status_text(run), exit_code=run.status.get("exit_code"), steps=last_step(run, tau))
    for tag, name, better in CURVES:
        series = run.scalars.get(tag, [])
        values = [v for _, v in series if math.isfinite(v)] if tag == "val/tau" else trailing_means(series)
        pick = min if better == "min" else max
        row[f"{name}_final"] = values[-1] if values else None
        row[f"{name}_best"] = pick(values) if values else None
    row["tau"] = tau.value
    row["tokens_per_s"] = _median(run.scalars.get("train/tokens_per_s"))
    row["step_time_s"] = _median(run.scalars.get("train/step_time"))
    wall = run.status.get("wall_s")
    if wall is None and run.first_wall_time is not None:
        wall = run.last_wall_time - run.first_wall_time  # a run without its own record: the span of its logs
    row["wall_s"] = wall
    row.update(tau_prompts=tau.prompts, tau_note=tau.note or "", objective=run.objective or "",
               state=run.state, error=run.status.get("error") or "", run_dir=str(run.path))
    return row


def status_text(run: Run) -> str:
    state, code, error = run.state, run.status.get("exit_code"), run.status.get("error")
    if state == "completed":
        return "completed"
    if state == "failed":
        return f"failed (exit {code}): {error}"
    return f"{state}: {error}" if error else state


def last_step(run: Run, tau: Tau) -> Optional[int]:
    """Optimizer steps trained: the checkpoint's global step, else one past the last logged train step (Lightning
    logs a train step under the global step it started from)."""
    if tau.step is not None:
        return tau.step
    steps = [s for tag, series in run.scalars.items() if tag.startswith("train/") for s, _ in series[-1:]]
    return max(steps) + 1 if steps else None


def winners(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[int]]:
    """metric key -> indices of the best rows among completed runs (ties share). Loss only if one objective."""
    found: Dict[str, List[int]] = {}
    eligible = [i for i, row in enumerate(rows) if row["state"] in CONTESTANTS]
    one_objective = len({rows[i]["objective"] for i in eligible}) <= 1
    for metric in METRICS:
        if metric.key in LOSS_KEYS and not one_objective:
            continue
        scored = [(rows[i][metric.key], i) for i in eligible if rows[i][metric.key] is not None]
        if len(scored) < 2:
            continue
        best = (min if metric.better == "min" else max)(value for value, _ in scored)
        found[metric.key] = [i for value, i in scored if value == best]
    return found


def seed_groups(rows: Sequence[Dict[str, Any]], swept: Sequence[str]) -> Optional[List[Dict[str, Any]]]:
    """With ``seed`` among the swept keys: one row per configuration (the other swept values), each metric as
    (mean, std, n) over its completed runs. None without a seed sweep."""
    if "seed" not in swept:
        return None
    others = [key for key in swept if key != "seed"]
    groups: Dict[Tuple[str, ...], List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in others), []).append(row)
    table = []
    for values, members in groups.items():
        done = [row for row in members if row["state"] in CONTESTANTS]
        label = " ".join(f"{key}={value}" for key, value in zip(others, values)) or "all"
        entry: Dict[str, Any] = {**dict(zip(others, values)), "run": label,
                                 "seeds": " ".join(row["seed"] for row in done) or "—",
                                 "runs": len(members), "completed": len(done), "state": "completed",
                                 "objective": ",".join(sorted({row["objective"] for row in done}))}
        for metric in METRICS:
            scores = [row[metric.key] for row in done if row[metric.key] is not None]
            entry[metric.key] = statistics.fmean(scores) if scores else None
            entry[metric.key + "_std"] = statistics.stdev(scores) if len(scores) > 1 else None
        table.append(entry)
    return table


# ---------------------------------------------------------------------------------------------- rendering
def markdown(rows: Sequence[Dict[str, Any]], identity: Sequence[str], spread: bool = False) -> str:
    """A Markdown table: the identity columns, then every metric; winners in bold (and ``±`` std if spread)."""
    best = winners(rows)
    headers = [*identity, *(m.header for m in METRICS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for i, row in enumerate(rows):
        cells = [_cell("—" if row[key] is None else str(row[key]), 80) for key in identity]
        for metric in METRICS:
            text = _number(row[metric.key], metric.digits)
            if spread and row.get(metric.key + "_std") is not None:
                text += " ± " + _number(row[metric.key + "_std"], metric.digits)
            cells.append(f"**{text}**" if i in best.get(metric.key, ()) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winners_line(rows: Sequence[Dict[str, Any]], among: str = "completed runs") -> str:
    best = winners(rows)
    parts = [f"{m.header}: " + ", ".join(rows[i]["run"] for i in best[m.key]) for m in METRICS if m.key in best]
    if not parts:
        return f"Best per metric: none marked (fewer than two {among} to compare)."
    if len({row["objective"] for row in rows if row["state"] in CONTESTANTS}) > 1:
        parts.append("loss not compared (the runs train different objectives, whose losses differ in kind)")
    return f"Best per metric (bold; among {among}): " + "; ".join(parts) + "."


def write_csv(rows: Sequence[Dict[str, Any]], identity: Sequence[str], path: Path) -> None:
    best = winners(rows)
    keys = [*identity, "status", "exit_code", "steps", *(m.key for m in METRICS), "tau_prompts", "tau_note",
            "objective", "winner_of", "error", "run_dir"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({**row, "winner_of": ";".join(k for k, indices in best.items() if i in indices)})


def _number(value: Optional[float], digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"


def _cell(text: str, width: int) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _median(series: Optional[Series]) -> Optional[float]:
    values = [v for _, v in series or () if math.isfinite(v)]
    return statistics.median(values) if values else None
