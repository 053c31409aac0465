"""Training callbacks: side work that runs beside the step, never inside it."""

from __future__ import annotations

import logging
import time
from typing import List, Sequence

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from dflashtrain.decode import DFlashProposer, Sampler, acceptance_stats, generate, single_thread_on_cpu

log = logging.getLogger(__name__)


class TauEvalCallback(L.Callback):
    """Real acceptance during training: every ``every_n_steps`` optimizer steps, τ of greedy speculative decoding
    (SPEC §8) of a few held-out prompts with the current drafter, logged as ``val/tau``.

    τ = mean over rounds of (accepted + 1). Off for next-token (DSpark) drafters, whose drafting mode differs, and
    under FSDP (the sharded drafter is only whole inside its forward); use `dflashtrain-eval` on checkpoints there.
    """

    def __init__(self, prompts: Sequence[List[int]], stop_token_ids: Sequence[int], every_n_steps: int,
                 max_new_tokens: int):
        self.prompts = [list(p) for p in prompts]
        self.stop_token_ids = list(stop_token_ids)
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.enabled = True
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reason = None
        if pl_module.objective.label_offset != 0:
            reason = f"objective {pl_module.objective.name} drafts in the next-token convention"
        elif isinstance(trainer.strategy, FSDPStrategy):
            reason = "the drafter is sharded (FSDP)"
        if reason:
            self.enabled = False
            log.warning("val/tau is off: %s; measure checkpoints with dflashtrain-eval", reason)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken; equal over the micro-batches of one accumulation
        if not self.enabled or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        started = time.perf_counter()
        tau = self.measure(pl_module.drafter, pl_module.target)
        pl_module.log("val/tau", tau, on_step=True, on_epoch=False, batch_size=1)
        log.info("step %d: val/tau %.3f on %d prompts (%.1f s)", step, tau, len(self.prompts),
                 time.perf_counter() - started)

    def measure(self, drafter, target) -> float:
        was_training = drafter.training
        drafter.eval()
        try:
            proposer = DFlashProposer(drafter, target)
            with single_thread_on_cpu(target.lm_head.weight.device):
                generations = [generate(target, proposer, prompt, self.max_new_tokens, self.stop_token_ids, Sampler())
                               for prompt in self.prompts]
        finally:
            drafter.train(was_training)
        return float(acceptance_stats(generations, drafter.geometry.block_size)["tau"])
