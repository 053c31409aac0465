"""Reliability guards: a run stops cleanly on a non-finite loss and keeps its good checkpoints.

* :class:`NonFiniteGuard` (a Lightning callback) checks the losses and the gradients of a step before its
  optimizer step. On a non-finite value it saves the weights as they are (still those of the last good step: the
  bad step never reached the optimizer) to ``checkpoints/last-good-step{global_step:07d}.ckpt`` and raises
  :class:`NonFiniteLossError`, naming the step and its batches' ``sample_ids`` (``file:N`` of each row). Its data
  position is past the bad batch: a run resumed from it continues with the next batch.

Every decision that stops training is reduced over ranks, so all ranks stop at the same step (no rank is left
waiting in a collective). Output directories are guarded in :mod:`dflashtrain.train.outputs`, resumes in
:mod:`dflashtrain.train.resume`, signals in :mod:`dflashtrain.train.preemption`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import lightning as L
from lightning.pytorch.callbacks import Callback

from dflashtrain.train.checkpoint_io import save_training_state


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
    """Stop on a non-finite loss or gradient before the optimizer step, keeping the good weights.

    It reads the module's :meth:`~dflashtrain.train.module.DraftModule.step_report`, the step's one host read (the
    loss flags of every micro-batch and the gradient norm, summed over ranks on the device), so checking costs no
    extra synchronisation. The gradient check is off under a GradScaler (``16-mixed``): the scaler itself skips
    steps with inf gradients.
    """

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.step_ids: List[str] = []  # sample ids of every micro-batch since the last optimizer step
        self.step_of_ids = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        ids = batch.get("sample_ids", []) if isinstance(batch, dict) else []
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # file:N strings (a tensor in hand-made batches)
        if trainer.global_step != self.step_of_ids:  # a new optimizer step (accumulation window) begins
            self.step_ids, self.step_of_ids = [], trainer.global_step
        self.step_ids += ids

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        report = pl_module.step_report()
        if report.bad_loss:
            what = f"loss {report.local_loss}" if report.local_bad_loss else "loss on another rank"
            self.stop(trainer, what, self.step_ids if report.local_bad_loss else [])
        if report.bad_grad and getattr(trainer.precision_plugin, "scaler", None) is None:
            what = f"gradient (norm {report.grad_norm})" if report.local_bad_grad else "gradient on another rank"
            self.stop(trainer, what, self.step_ids if report.local_bad_grad else [])

    def stop(self, trainer: L.Trainer, what: str, sample_ids: List[int]) -> None:
        """Save the untouched weights, then raise. Called on every rank (saving is collective)."""
        path = unused_path(self.checkpoint_dir / f"{LAST_GOOD.format(step=trainer.global_step)}.ckpt")
        save_training_state(trainer, path)
        ids = f"sample ids {sample_ids} (file:N)" if sample_ids else "sample ids on the reporting rank"
        raise NonFiniteLossError(
            f"non-finite {what} at step {trainer.global_step}, {ids}; stopped before the optimizer step, "
            f"the weights this step started from are in {path}"
        )
