"""``python tests/signalled.py <overrides>``: the `dflashtrain` command, sending itself a real signal mid-step.

``SIGNAL_AT_STEP=k SIGNAL=SIGKILL`` (or SIGTERM, SIGUSR1, SIGINT): the signal arrives while optimizer step k + 1 is
being computed (global_step == k, inside its first training_step), i.e. at an arbitrary moment of a step, as a
``kill -9``, a scheduler's preemption or a Ctrl-C would.
"""

from __future__ import annotations

import os
import signal

from dflashtrain.cli import train
from dflashtrain.train.module import DraftModule


def main() -> None:
    step, signum = int(os.environ["SIGNAL_AT_STEP"]), getattr(signal, os.environ.get("SIGNAL", "SIGKILL"))
    original = DraftModule.training_step
    sent = []

    def training_step(module, batch, batch_idx):
        if module.global_step == step and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return original(module, batch, batch_idx)

    DraftModule.training_step = training_step
    train()


if __name__ == "__main__":
    main()
