"""How the Trainer reads and writes checkpoints: atomically, and never unpickling anything but tensors and plain values.

Lightning's default writes ``stepNNNNNNN.ckpt`` in place (a full disk leaves a truncated file beside the good one)
and loads with whatever ``weights_only`` it is given. :class:`SafeCheckpointIO` implements Lightning's CheckpointIO
interface with :func:`dflashtrain.export.atomic.atomic_write` (temporary name, fsync, rename) and loads with
``weights_only=True`` always, whatever the caller asks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from dflashtrain.export.atomic import atomic_write


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint interface, implemented atomically and with ``weights_only=True`` loading."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: torch.save(checkpoint, handle), key="checkpoint",
                     intact=f"every earlier checkpoint in {path.parent} is intact")

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)

    def teardown(self) -> None:
        pass


def save_training_state(trainer: L.Trainer, path: Path) -> None:
    """The whole training state at ``path`` (weights, optimizer, schedulers, loops, the callbacks' and the data's
    states), written through the Trainer, so by :class:`SafeCheckpointIO` (atomic). Lightning's second argument
    chooses what is *saved* (False: everything, not the weights alone); it is not torch.load's flag, and nothing is
    unpickled here: every load above is ``weights_only=True``."""
    trainer.save_checkpoint(str(path), False)
