"""What a training run prints while it runs: each log line once, no advertisements, a bar that counts steps.

* **Each line once.** The ``lightning`` package adds a stderr handler of its own to the ``lightning`` logger, which
  also propagates to the root handlers Hydra configured (console and ``train.log``): every Lightning INFO line would
  print twice. Lightning's handler is dropped; the records still reach the console and ``train.log`` through Hydra's.
* **No advertisements.** Lightning's "litlogger" tip (an INFO record) is filtered out by its text.
* **No warning about Lightning's own internals.** Lightning 2.6 tests ``isinstance(spec, LeafSpec)`` inside its
  pytree helper, which torch 2.13 deprecates; that one warning is ignored by its text (any other stays visible).
* **The bar counts optimizer steps** of the whole run, ``k/max_steps`` across epochs and from a resumed step, not
  Lightning's per-epoch batches (which read "Epoch 1/-2" under ``max_epochs=-1``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, List, Optional

from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

ADVERTISEMENTS = ("litlogger",)
BAR_METRICS = {"train/loss": "loss", "train/acc": "acc", "train/tau_est": "tau_est"}


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(word in record.getMessage() for word in ADVERTISEMENTS)


def quiet_console() -> None:
    """Each Lightning line once, through Hydra's handlers; no litlogger tip; no LeafSpec deprecation. Idempotent."""
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:  # lightning/__init__.py's own console handler
            lightning_logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisements) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertisements())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def step_progress_bar(enabled: bool) -> List[ProgressBar]:
    """The run's progress bar (``trainer.enable_progress_bar``), as a callback list for the Trainer."""
    return [StepProgressBar()] if enabled else []


class StepProgressBar(ProgressBar):
    """``train 412/900 [01:10<01:22, 5.8 step/s, loss=1.93, acc=0.61, tau_est=2.7]`` on global rank 0."""

    def __init__(self) -> None:
        super().__init__()
        self.bar: Optional[tqdm] = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=0.5)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bar is None:
            return
        metrics = trainer.progress_bar_metrics
        shown = {short: f"{float(metrics[key]):.3g}" for key, short in BAR_METRICS.items() if key in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
