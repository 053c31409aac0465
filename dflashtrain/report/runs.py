"""Finding the runs of a sweep and reading what each left on disk: its overrides, its status, its logged metrics.

A run directory is what one training job writes (README, "the run directory"): ``.hydra/`` (config, overrides),
``status.json`` (dflashtrain/report/jobs.py), ``tensorboard/`` event files or ``csv/metrics.csv``, and
``checkpoints/``. A sweep directory holds run directories, one per job, named ``<job number>_<overrides>``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from dflashtrain.config.errors import ConfigError
from dflashtrain.report.jobs import read_status

RUN_MARKERS = (".hydra", "status.json", "checkpoints", "tensorboard", "csv")
Series = List[Tuple[int, float]]  # (step, value), in step order


@dataclass
class Run:
    path: Path
    job: Optional[int]  # the job number in its sweep; None for a run directory given on its own
    overrides: Dict[str, str]  # key -> value, as given on the command line (and by the sweep)
    choices: Dict[str, str]  # config group -> the option the run composed (loss -> dpace, ...)
    config: Any  # its composed config (.hydra/config.yaml, unresolved), or None
    status: Dict[str, object]
    scalars: Dict[str, Series] = field(default_factory=dict)  # tag -> series
    first_wall_time: Optional[float] = None
    last_wall_time: Optional[float] = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state(self) -> str:
        return str(self.status.get("status"))

    @property
    def objective(self) -> Optional[str]:
        return self.choices.get("loss")

    @property
    def eval_path(self) -> Optional[str]:
        """Its held-out prompts (data.eval_path), if its config resolves that key outside Hydra."""
        if self.config is None:
            return None
        try:
            value = OmegaConf.select(self.config, "data.eval_path", throw_on_resolution_failure=True)
        except Exception:  # noqa: BLE001 - an interpolation only the run's Hydra could resolve
            return None
        return None if value is None else str(value)

    def value_of(self, key: str) -> str:
        """What the run used for an override key: the override itself, else its group option or config value."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return str(self.choices[key])
        if self.config is None:
            return ""
        value = OmegaConf.select(self.config, key, default=None, throw_on_resolution_failure=False)
        return "" if value is None or OmegaConf.is_config(value) else str(value)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def find_runs(paths: Sequence[str]) -> List[Path]:
    """Each path is a run directory or a sweep directory of them; ConfigError naming the first that is neither."""
    found: List[Path] = []
    for value in paths:
        path = Path(value)
        if not path.is_dir():
            raise ConfigError(value, "no such directory (give a sweep directory or run directories)")
        if is_run_dir(path):
            found.append(path)
            continue
        runs = sorted((d for d in path.iterdir() if is_run_dir(d)), key=job_order)
        if not runs:
            raise ConfigError(value, "holds no run: a run directory has one of " + ", ".join(RUN_MARKERS))
        found += runs
    unique: Dict[Path, Path] = {}
    for path in found:  # a run named twice is read once
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def job_order(path: Path) -> Tuple[int, str]:
    number = job_number(path)
    return (number if number is not None else 1 << 30, path.name)


def job_number(path: Path) -> Optional[int]:
    match = re.match(r"(\d+)_", path.name + "_")
    return int(match.group(1)) if match and (path.parent / "multirun.yaml").exists() else None


def read_run(path: Path) -> Run:
    hydra_dir = path / ".hydra"
    overrides = parse_overrides(_yaml(hydra_dir / "overrides.yaml") or [])
    choices = OmegaConf.select(_yaml(hydra_dir / "hydra.yaml") or OmegaConf.create(), "hydra.runtime.choices")
    run = Run(path=path, job=job_number(path), overrides=overrides,
              choices={str(k): str(v) for k, v in (choices or {}).items()}, config=_yaml(hydra_dir / "config.yaml"),
              status=run_status(path))
    read_metrics(run)
    return run


def parse_overrides(lines: Sequence[str]) -> Dict[str, str]:
    """``["loss=dpace", "+x=1", "~y"]`` -> ``{"loss": "dpace", "x": "1", "y": "~"}``."""
    parsed = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        parsed[key.lstrip("+~")] = value if _ else "~"
    return parsed


def run_status(path: Path) -> Dict[str, object]:
    """status.json, with ``running`` told apart: still alive on this host, or ``incomplete`` (killed)."""
    status = read_status(path)
    if status is None:
        return {"status": "unknown", "error": "no status.json (a run from before status files, or not a training run)"}
    if status["status"] == "running" and not _alive(status):
        status = {**status, "status": "incomplete", "error": "no end recorded: the process was killed or lost"}
    return status


def read_metrics(run: Run) -> None:
    """Scalars from the TensorBoard event files (tensorboard/) or else the CSV log (csv/metrics.csv)."""
    events = run.path / "tensorboard"
    if events.is_dir() and any(events.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its reader logs each file it reads
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: every point, no sampling
        accumulator.Reload()
        walls = []
        for tag in accumulator.Tags()["scalars"]:
            points = accumulator.Scalars(tag)
            run.scalars[tag] = [(int(p.step), float(p.value)) for p in points]
            walls += [p.wall_time for p in points]
        if walls:
            run.first_wall_time, run.last_wall_time = min(walls), max(walls)
        return
    table = run.path / "csv" / "metrics.csv"
    if table.is_file():
        with open(table, newline="") as handle:
            for row in csv.DictReader(handle):
                step = row.get("step")
                for tag, value in row.items():
                    if tag in ("step", "epoch") or value in ("", None) or step in ("", None):
                        continue
                    run.scalars.setdefault(tag, []).append((int(float(step)), float(value)))
        for series in run.scalars.values():
            series.sort(key=lambda point: point[0])


def last_checkpoint(path: Path) -> Optional[Path]:
    """checkpoints/last.ckpt, else the newest .ckpt there (a failed run's last-good one), else None."""
    directory = path / "checkpoints"
    if (directory / "last.ckpt").is_file():
        return directory / "last.ckpt"
    found = sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if directory.is_dir() else []
    return found[-1] if found else None


def run_names(runs: Sequence[Run]) -> List[str]:
    """The job number when all runs are jobs of one sweep, else ``<sweep>/<job>`` or the directory name (the path
    where those would repeat)."""
    one_sweep = len({run.path.resolve().parent for run in runs}) == 1
    names = [run.name if run.job is None else str(run.job) if one_sweep else f"{run.path.parent.name}/{run.job}"
             for run in runs]
    return names if len(set(names)) == len(names) else [str(run.path) for run in runs]


def swept_keys(runs: Sequence[Run]) -> List[str]:
    """The override keys whose values differ between the runs (every key of a lone run), in first-seen order."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def _yaml(path: Path):
    try:
        return OmegaConf.load(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - a damaged file only loses what it would have told
        return None


def _alive(status: Dict[str, object]) -> bool:
    pid = status.get("pid")
    if status.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
