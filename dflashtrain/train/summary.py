"""The end of a finished run, logged once by global rank 0 (console and ``train.log``): where the run wrote, its last
checkpoint, the final metrics, and the next commands with this run's paths filled in.

    run finished at step 900 in outputs/train/2026-12-01_15-00-00
      last checkpoint  outputs/train/2026-12-01_15-00-00/checkpoints/last.ckpt
      final metrics    train/loss 1.21, train/acc 0.71, train/tau_est 3.35, val/tau 3.4
      next:
        dflashtrain-eval ckpt_path=outputs/train/2026-12-01_15-00-00/checkpoints/last.ckpt
        dflashtrain-export ckpt_path=outputs/train/2026-12-01_15-00-00/checkpoints/last.ckpt output_dir=...
        tensorboard --logdir outputs
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)
FINAL_METRICS = ("train/loss", "train/acc", "train/tau_est", "val/tau")


def shown(path: Path) -> str:
    """A path as the user would type it from where they ran the command: relative below the working directory."""
    absolute = Path(os.path.abspath(path))
    try:
        return shlex.quote(str(absolute.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(absolute))


def tensorboard_logdir(output_dir: Path) -> Path:
    """``outputs`` for a run under ./outputs (dflashtrain-eval writes its scalars under outputs/eval/, beside the
    training runs, so one logdir shows both); else the run's own directory."""
    outputs = Path.cwd() / "outputs"
    return outputs if outputs in Path(os.path.abspath(output_dir)).parents else Path(output_dir)


def final_metrics(trainer: Any) -> Dict[str, float]:
    """The last logged value of every metric, with the last val/tau measurement (logged to the loggers directly)."""
    from dflashtrain.train.callbacks import TauEvalCallback

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    for callback in trainer.callbacks:
        if isinstance(callback, TauEvalCallback) and callback.history:
            metrics.setdefault("val/tau", float(callback.history[-1][1]))
    return metrics


def summary_lines(output_dir: Path, step: int, checkpoint: Optional[Path], metrics: Dict[str, float],
                  logger: str) -> List[str]:
    lines = [f"run finished at step {step} in {shown(output_dir)}"]
    if checkpoint is not None:
        lines.append(f"  last checkpoint  {shown(checkpoint)}")
    final = ", ".join(f"{key} {metrics[key]:.4g}" for key in FINAL_METRICS if key in metrics)
    if final:
        lines.append(f"  final metrics    {final}")
    lines.append("  next:")
    if checkpoint is not None:
        lines.append(f"    dflashtrain-eval ckpt_path={shown(checkpoint)}")
        lines.append(f"    dflashtrain-export ckpt_path={shown(checkpoint)} output_dir={shown(output_dir / 'drafter')}")
    if logger == "tensorboard":
        lines.append(f"    tensorboard --logdir {shown(tensorboard_logdir(output_dir))}")
    elif logger == "csv":
        lines.append(f"    metrics: {shown(output_dir / 'csv' / 'metrics.csv')}")
    return lines


def log_summary(output_dir: Path, step: int, checkpoint: Optional[Path], metrics: Dict[str, float], logger: str,
                is_global_zero: bool) -> None:
    """Log the end-of-run summary once (global rank 0 only)."""
    if is_global_zero:
        log.info("\n".join(summary_lines(output_dir, step, checkpoint, metrics, logger)))
