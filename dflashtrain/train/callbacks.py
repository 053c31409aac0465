"""Training callbacks: side work that runs beside the step, never inside it."""

from __future__ import annotations

import logging
import time
from typing import List, Sequence

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from dflashtrain.inference.decode import Sampler, acceptance_stats, generate, single_thread_on_cpu

log = logging.getLogger(__name__)


class TauEvalCallback(L.Callback):
    """Real acceptance during training: every ``every_n_steps`` optimizer steps, τ of greedy speculative decoding
    (docs/decoding.md) of a few held-out prompts with the current drafter, logged as ``val/tau``.

    τ = mean over rounds of (accepted + 1). The drafting family decodes its own way (DSpark: sequential Markov-head
    drafting). Off under FSDP (the sharded drafter is only whole inside its forward); use `dflashtrain-eval` on
    checkpoints there.
    """

    def __init__(self, prompts: Sequence[List[int]], stop_token_ids: Sequence[int], every_n_steps: int,
                 max_new_tokens: int):
        self.prompts = [list(p) for p in prompts]
        self.stop_token_ids = list(stop_token_ids)
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.enabled = True
        self.history: List[tuple] = []  # (step, τ) of every measurement
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reason = None
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            reason = "the drafter is sharded (FSDP)"
        if reason:
            self.enabled = False
            log.warning("val/tau is off: %s; measure checkpoints with dflashtrain-eval", reason)

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(entry) for entry in state.get("history", [])]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed from a step that was measured logs that measurement again: resumed into the same directory,
        the loggers drop what was logged from the resumed step on (train/loggers.py), and it is not measured twice."""
        if self.history and self.history[-1][0] == trainer.global_step and trainer.global_step > 0:
            self._last_step = trainer.global_step
            for logger in trainer.loggers:
                logger.log_metrics({"val/tau": self.history[-1][1]}, step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken; equal over the micro-batches of one accumulation
        if not self.enabled or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        started = time.perf_counter()
        tau = self.measure(pl_module)
        self.history.append((step, tau))
        for logger in trainer.loggers:  # directly: self.log would drop it on a step that is not a logging step
            logger.log_metrics({"val/tau": tau}, step=step)
        log.info("step %d: val/tau %.3f on %d prompts (%.1f s)", step, tau, len(self.prompts),
                 time.perf_counter() - started)

    def measure(self, pl_module: L.LightningModule) -> float:
        drafter, heads, target = pl_module.drafter, pl_module.heads, pl_module.target
        was_training = pl_module.training
        pl_module.eval()
        try:
            proposer = pl_module.family.proposer(drafter, heads, target)
            with single_thread_on_cpu(target.lm_head.weight.device):
                generations = [generate(target, proposer, prompt, self.max_new_tokens, self.stop_token_ids, Sampler())
                               for prompt in self.prompts]
        finally:
            pl_module.train(was_training)
        return float(acceptance_stats(generations, proposer.block_size)["tau"])
