"""Reliability guards: a run stops cleanly, keeps its good checkpoints, and never touches another run's outputs.

* :class:`NonFiniteGuard` (a Lightning callback) stops on a non-finite loss or gradient before the optimizer step.
  It saves the weights as they are (still those the bad step started from: it never reached the optimizer) to
  ``checkpoints/last-good-step{step:07d}.ckpt`` and raises :class:`NonFiniteLossError`, naming the step and the
  batch's ``sample_ids`` (JSONL line numbers). When it checks is the host-read policy of train/host.py.
* :func:`check_checkpoint_dir` refuses to start a new run in an output directory that already holds checkpoints
  of another run (only a run resumed from one of them may continue there).
* :func:`check_resume_matches` compares a ``resume_from`` checkpoint's drafter geometry with the config's before
  any weight is loaded.

Every decision that stops training is reduced over ranks, so all ranks stop at the same step (no rank is left
waiting in a collective).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from dflashtrain.config.schema import ConfigError
from dflashtrain.export.checkpoint import METADATA_KEY, read_checkpoint

LAST_GOOD = "last-good-step{step:07d}"  # global_step = optimizer steps already applied to the saved weights

# Where each drafter-geometry field comes from, for a resume mismatch message.
GEOMETRY_SOURCES = {
    "block_size": "model.drafter.block_size",
    "num_layers": "model.drafter.num_layers",
    "target_layer_ids": "model.drafter.target_layer_ids / num_taps",
    "mask_token_id": "model.drafter.mask_token_id",
    "intermediate_size": "model.drafter.intermediate_size",
}


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the message names the step, samples and checkpoint."""


def unused_path(path: Path) -> Path:
    """``path``, or ``stem-v1``, ``stem-v2``, … if it exists: a checkpoint is never overwritten."""
    version = 0
    candidate = path
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
    return candidate


class NonFiniteGuard(Callback):
    """Stop on a non-finite loss or gradient before the optimizer step, keeping the weights that step started from.

    The module flags such a step on the device (``DraftModule.step_report``, train/host.py) and the guard acts on
    the host-read steps: every step on CPU or without a device-side skip; on a GPU with fused AdamW every
    ``trainer.log_every_n_steps`` steps, and then the bad step and every step after it until the read were skipped
    by the optimizer on the device, so the weights saved are still those the bad step started from. Under a
    GradScaler (``16-mixed``) the gradient check is the scaler's: it skips steps with inf gradients itself.
    """

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.ids_by_step: Dict[int, List[Any]] = {}  # each optimizer step's sample-id tensors since the last read

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        ids = batch.get("sample_ids") if isinstance(batch, dict) else None
        if ids is not None:  # a host tensor (the datamodule keeps it off the GPU); read only to name them
            self.ids_by_step.setdefault(trainer.global_step, []).append(ids)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        report = pl_module.step_report(optimizer)
        if report is None:
            return
        if report.first_bad >= 0:
            what = (f"loss {report.bad_loss}" if report.bad_was_loss else f"gradient (norm {report.bad_norm})") if report.bad_here \
                else "loss or gradient on another rank"
            tensors = self.ids_by_step.get(report.first_bad, []) if report.bad_here else []
            ids = [i for t in tensors for i in t.tolist()]
            self.stop(trainer, what, ids, report.first_bad)
        self.ids_by_step.clear()

    def stop(self, trainer: L.Trainer, what: str, sample_ids: List[int], step: int) -> None:
        """Save the untouched weights, then raise. Called on every rank (saving is collective)."""
        path = unused_path(self.checkpoint_dir / f"{LAST_GOOD.format(step=step)}.ckpt")
        trainer.save_checkpoint(str(path))
        ids = f"sample ids {sample_ids} (JSONL line numbers)" if sample_ids else "sample ids on the reporting rank"
        skipped = f" (steps {step}..{trainer.global_step - 1} were skipped on the device until this check)" \
            if trainer.global_step > step else ""
        raise NonFiniteLossError(
            f"non-finite {what} at step {step}, {ids}; stopped before the optimizer step{skipped}, "
            f"the weights this step started from are in {path}"
        )


def check_checkpoint_dir(checkpoint_dir: Path, resume_from: Optional[str]) -> Path:
    """Create ``checkpoint_dir``; refuse one that holds checkpoints unless resuming from one of them.

    Lightning's ModelCheckpoint would not delete another run's files, but it would write ``last-v1.ckpt`` beside
    them, so ``last.ckpt`` would silently keep meaning the other run.
    """
    existing = sorted(p.name for p in checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    continuing = resume_from is not None and Path(resume_from).resolve().parent == checkpoint_dir.resolve()
    if existing and not continuing:
        shown = ", ".join(existing[:3]) + (", …" if len(existing) > 3 else "")
        raise ConfigError(
            "paths.output_dir",
            f"{checkpoint_dir} already holds checkpoints of another run ({shown}); a new run never writes beside "
            f"them: choose a new paths.output_dir, or continue that run with resume_from={checkpoint_dir}/<name>.ckpt",
        )
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("paths.output_dir", f"cannot create {checkpoint_dir}: {error.strerror or error}") from None
    return checkpoint_dir


def check_resume_matches(resume_from: str, geometry: Dict[str, Any]) -> None:
    """The checkpoint's drafter geometry must equal the config's (read memory-mapped: no weights are loaded)."""
    saved = read_checkpoint(Path(resume_from), "resume_from")[METADATA_KEY]["geometry"]
    for name, value in saved.items():
        if name in geometry and geometry[name] != value:
            source = GEOMETRY_SOURCES.get(name, "the target (model.target.path)")
            raise ConfigError(
                "resume_from",
                f"{resume_from} holds a drafter with {name}={value}, this config gives {geometry[name]} "
                f"(from {source}); resume with the config the checkpoint was trained with",
            )
