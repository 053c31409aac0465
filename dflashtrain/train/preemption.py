"""Stopping without losing work: a resumable checkpoint whenever training stops, and an honest exit status.

:class:`SaveOnStop` (a Lightning callback) owns SIGTERM, SIGUSR1 and SIGINT while training runs. A signal only
records itself; at the end of the optimizer step in progress (never inside an accumulation window, so nothing
half-accumulated is lost) every rank agrees to stop, the state is saved as a periodic checkpoint would be
(``last.ckpt``), and the run ends with :class:`Preempted`: exit status 128 + the signal (143 SIGTERM, 138 SIGUSR1,
130 SIGINT). SIGUSR1 under SLURM also requeues the job (``scontrol requeue``), as Lightning's own SLURM support
does; with a fixed ``paths.output_dir`` and ``resume_from=auto`` the requeued job continues from the newest
checkpoint there.
A second Ctrl-C stops at once (:class:`Interrupted`, exit 130) and keeps the last checkpoint written.

The step a run finishes on is always in ``last.ckpt`` too (Lightning saves only every
``checkpoint.every_n_train_steps``). Both saves happen where periodic checkpoints are saved (the end of a
batch), so their data position and loop counters are those a resume expects.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from dflashtrain.train.checkpoint_io import save_training_state

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
LAST = "last.ckpt"


def exit_status(signum: int) -> int:
    return 128 + int(signum)


class Preempted(RuntimeError):
    """Training stopped on a signal after saving a resumable checkpoint; exit status 128 + the signal."""

    def __init__(self, signum: int, step: int, path: Optional[Path], requeue: str = ""):
        where = f"resumable checkpoint {path} (resume_from={path})" if path else "no checkpoint was needed"
        super().__init__(f"{signal.Signals(signum).name}: stopped at step {step}; {where}{requeue}")
        self.signum = signum


class Interrupted(BaseException):
    """A second Ctrl-C: stop now, save nothing more (exit 130). Not an Exception, so nothing on the way catches it."""


class SaveOnStop(L.Callback):
    def __init__(self, checkpoint_dir: Path, every_n_train_steps: int, save_last: bool, save_top_k: int):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.every_n_train_steps = every_n_train_steps
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.received: Optional[int] = None  # the first stop signal
        self.stopped_by: Optional[int] = None  # the signal training stopped on (another rank's counts)
        self.saved: Optional[Path] = None
        self.previous: Dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------ signals
    def install(self) -> None:
        """Own the stop signals (main thread only; Python delivers signals there). Called before ``fit`` and
        again at train start, after Lightning registered its own SIGTERM handler."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self.handle)
            self.previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise Interrupted("SIGINT: a second Ctrl-C stopped the run at once; the checkpoints already written are "
                              "whole")
        if self.received is None:
            self.received = signum
            log.warning("%s received: saving a resumable checkpoint at the end of this step%s",
                        signal.Signals(signum).name, " (Ctrl-C again: stop now)" if signum == signal.SIGINT else "")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    # ------------------------------------------------------------------------------------------ saving
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank stops at the same step, whichever got the signal
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        progress = trainer.fit_loop.epoch_loop.batch_progress
        at_step_end = progress.current.ready % trainer.accumulate_grad_batches == 0 or progress.is_last_batch
        if not at_step_end:
            return
        if stop:
            self.stopped_by = self.received or signal.SIGTERM
            trainer.should_stop = True
        if stop or self.last_step(trainer):
            self.save(trainer)

    def last_step(self, trainer: L.Trainer) -> bool:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return progress.is_last_batch and trainer.max_epochs not in (None, -1) \
            and trainer.current_epoch + 1 >= trainer.max_epochs

    def save(self, trainer: L.Trainer) -> None:
        """Save this step unless the periodic checkpoint (which runs right after) saves it anyway."""
        step = trainer.global_step
        name = LAST if self.save_last else f"step{step:07d}.ckpt"
        periodic = step % self.every_n_train_steps == 0 and (self.save_last or self.save_top_k != 0)
        self.saved = self.checkpoint_dir / name
        if not periodic:
            save_training_state(trainer, self.saved)


def requeue_slurm_job() -> str:
    """``scontrol requeue`` this SLURM job (rank 0 only); a note for the exit message."""
    if not SLURMEnvironment.detect() or int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return ""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_id else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        return "; not requeued (no SLURM job id)"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"; requeue of SLURM job {job} failed: {error}"
    if result.returncode != 0:
        return f"; requeue of SLURM job {job} failed: {result.stderr.strip() or result.returncode}"
    return f"; SLURM job {job} requeued"
