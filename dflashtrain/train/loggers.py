"""Metric loggers that a resumed run continues instead of overwriting.

A run resumed from step G into the directory it was trained in repeats steps G, G+1, … of the interrupted run.
TensorBoard is told to purge the events at step G and later (``purge_step``: TensorBoard then shows each step once,
the resumed value); the CSV file keeps its rows before step G (rewritten atomically) and the resumed run appends.
Lightning's own CSV logger deletes an existing ``metrics.csv``; :class:`CSVMetrics` never does.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from dflashtrain.config.schema import LoggerName
from dflashtrain.export.atomic import atomic_write_text


def _rows_before(path: Path, step: int) -> tuple[List[str], List[Dict[str, str]]]:
    """The header and the rows logged before ``step`` (a row cut short by a kill is dropped)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        kept = []
        for row in reader:
            value = row.get("step") or ""
            if value.isdigit() and int(value) < step and None not in row.values():
                kept.append(row)
        return list(reader.fieldnames or []), kept


def _csv_text(keys: List[str], rows: List[Dict[str, Any]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class CSVMetrics(Logger):
    """``<dir>/metrics.csv``: one row per logging step (values as Python writes floats: exact); appends."""

    def __init__(self, directory: Path, resume_step: Optional[int]):
        super().__init__()
        self.directory = Path(directory)
        self.path = self.directory / "metrics.csv"
        self.keys: List[str] = []
        self.pending: List[Dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            self.keys, kept = _rows_before(self.path, resume_step)
            atomic_write_text(self.path, _csv_text(self.keys, kept, header=True), key="logger")

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.directory)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = step if step is not None else len(self.pending)
        self.pending.append(row)

    @rank_zero_only
    def save(self) -> None:
        if not self.pending:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        new = sorted({k for row in self.pending for k in row} - set(self.keys))
        if new or not self.path.is_file():  # a new column: rewrite the whole file with the wider header
            old = _rows_before(self.path, 2**62)[1] if self.path.is_file() else []
            self.keys = sorted(set(self.keys) | set(new))
            atomic_write_text(self.path, _csv_text(self.keys, old + self.pending, header=True), key="logger")
        else:
            with open(self.path, "a", encoding="utf-8", newline="") as handle:
                handle.write(_csv_text(self.keys, self.pending, header=False))
                handle.flush()
                os.fsync(handle.fileno())
        self.pending = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def build_loggers(cfg: DictConfig, output_dir: Path, resume_step: Optional[int]) -> List[Any]:
    """The configured logger; ``resume_step``: the step a resumed run continues from (its repeats replace)."""
    if cfg.logger.name == LoggerName.tensorboard:
        extra = {"purge_step": resume_step} if resume_step is not None else {}
        return [TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="", **extra)]
    if cfg.logger.name == LoggerName.csv:
        return [CSVMetrics(output_dir / "csv", resume_step)]
    return []
