"""The LightningModule: frozen target -> anchors and blocks -> drafter -> chunked objective -> global reduction.

It receives built objects and never reads the config (docs/architecture.md, one training step). The target is held
as a plain attribute (not a registered submodule), so it is absent from the optimizer, the state dict and every
checkpoint by construction; the drafting family's extra modules (``heads``) are registered beside the drafter.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import torch
from torch import Tensor, nn

from dflashtrain.config.schema import AttentionBackend
from dflashtrain.data.blocks import DraftBlocks, make_blocks, sample_anchors
from dflashtrain.data.sampling import RowGenerators
from dflashtrain.families import DraftingFamily
from dflashtrain.models.masks import AnchorAttentionMask
from dflashtrain.models.target import FrozenTarget, TargetStates
from dflashtrain.objectives.chunked import chunked_objective, teacher_logits
from dflashtrain.objectives.metrics import SlotCounts, summarize
from dflashtrain.objectives.protocol import ChunkLoss, Objective, check_objective
from dflashtrain.train.reduction import (
    EPS,
    AccumulationWindow,
    StepReport,
    loss_numerator,
    local_sums,
    pack,
    scale_gradients,
    unpack,
)

log = logging.getLogger(__name__)
__all__ = ["DraftModule", "loss_numerator", "warmup_cosine"]


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warmup over warmup_ratio·total steps, then cosine down to min_lr_ratio."""
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class DraftModule(L.LightningModule):
    def __init__(
        self,
        drafter: nn.Module,
        heads: Optional[nn.Module],
        target: FrozenTarget,
        objective: Objective,
        family: DraftingFamily,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_factor: Callable[[int], float],
        num_anchors: int,
        chunk_blocks: int,
        attention: AttentionBackend,
        seed: int,
        max_length: int,
        checkpoint_metadata: Dict[str, Any],
        shard: Optional[Callable[..., None]],
    ):
        super().__init__()
        self.objective = check_objective(objective)
        if objective.family != family.name or objective.label_offset != family.label_offset:
            raise ValueError(f"objective {objective.name} (family {objective.family}, label offset "
                             f"{objective.label_offset}) does not fit family {family.name} (label offset "
                             f"{family.label_offset})")
        self.drafter = drafter
        self.heads = heads  # the family's extra modules: registered, so optimized and checkpointed
        self.__dict__["target"] = target  # plain attribute: never registered, never checkpointed
        self.family = family
        self.make_optimizer = optimizer
        self.lr_factor = lr_factor
        self.num_anchors = num_anchors
        self.chunk_blocks = chunk_blocks
        self.attention = AttentionBackend(attention)
        self.seed = seed  # with the epoch and each row's dataset index, it seeds the row's anchors (and prefixes)
        self.max_length = max_length  # anchor scores are drawn for max_length positions, whatever the padding
        self.checkpoint_metadata = checkpoint_metadata
        self.shard = shard  # fsdp2: shards the drafter and heads in configure_model (train/parallelism.py)
        self.skipped_empty_steps = 0
        self.window = AccumulationWindow()  # the micro-batches of the current optimizer step
        self.report: Optional[StepReport] = None  # the step's host read, from its first reader to its optimizer step
        self._step_started = 0.0
        self._step_values: Dict[str, Tensor] = {}  # this rank's tokens, loss sum, non-finite losses in the window

    # ------------------------------------------------------------------------------------------ wiring
    def setup(self, stage: str) -> None:
        self.target.to(self.device)

    def on_fit_start(self) -> None:
        self.target.to(self.device)  # the strategy has placed the module by now

    def configure_model(self) -> None:
        if self.shard is not None:
            self.shard(self.drafter, self.heads, self.trainer.world_size, self.trainer.strategy.root_device)

    def use_flex(self) -> bool:
        return self.attention == AttentionBackend.flex or (
            self.attention == AttentionBackend.auto and self.device.type == "cuda")

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """The drafter's parameters and the family's heads' (the frozen target is never among them)."""
        modules = [self.drafter] + ([self.heads] if self.heads is not None else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def blocks_for(self, batch: Dict[str, Any]) -> DraftBlocks:
        """Anchors, then the blocks the objective trains on (its prepare_blocks: VP shows a visible prefix).

        Every random draw of a row comes from its own generator (seed, epoch, dataset index): the same on resume,
        on any rank and in any batch the row lands in.
        """
        rng = RowGenerators(self.seed, self.current_epoch, batch["row_keys"], batch["loss_mask"].device)
        # A batch without any anchor gives dummy blocks only: no supervised slot, so the step is skipped (no host
        # read here; see step_report).
        anchors, keep = sample_anchors(batch["loss_mask"], self.num_anchors, uniforms=rng.uniform(self.max_length))
        geometry = self.drafter.geometry
        blocks = make_blocks(batch["input_ids"], batch["loss_mask"], anchors, keep, geometry.block_size,
                             geometry.mask_token_id, self.objective.label_offset)
        return self.objective.prepare_blocks(blocks, batch["input_ids"], rng)

    def draft_hidden(self, blocks: DraftBlocks, states: TargetStates) -> Tensor:
        """Drafter forward over all N blocks at once -> final hidden [b, N, B, d]."""
        batch, num_blocks, block_size = blocks.input_ids.shape
        with torch.no_grad():
            block_embeds = self.target.embed_tokens(blocks.input_ids.view(batch, -1))  # [b, N·B, d]
        mask = AnchorAttentionMask.build(
            blocks.anchor_positions, blocks.block_keep, states.tapped.shape[1], block_size, self.use_flex(),
            sliding_window=self.drafter.geometry.sliding_window,
        )
        hidden = self.drafter(block_embeds, states.tapped, blocks.position_ids.view(batch, -1), mask)
        return hidden.view(batch, num_blocks, block_size, -1)

    def chunk_logits(self, hidden: Tensor, blocks: DraftBlocks):
        """hidden [b, c, B, d] -> (logits [b, c, B, V], extras): the family's logits (DSpark adds the Markov bias)."""
        return self.family.logits(hidden, blocks, self.target.lm_head, self.heads)

    # ------------------------------------------------------------------------------------------ step
    def forward_loss(self, batch: Dict[str, Tensor], chunk_blocks: int, use_checkpoint: bool = True):
        """Target under no_grad -> blocks -> drafter -> chunked objective. Returns (ChunkLoss, SlotCounts, blocks)."""
        states = self.target.batch_states(batch)
        blocks = self.blocks_for(batch)
        hidden = self.draft_hidden(blocks, states)
        teacher = None
        if self.objective.needs_teacher:
            teacher = lambda positions: teacher_logits(states.final_hidden, positions, self.target.lm_head)  # noqa: E731
        total, counts = chunked_objective(hidden, blocks, self.objective, self.chunk_logits, chunk_blocks,
                                          teacher=teacher, use_checkpoint=use_checkpoint,
                                          coefficients=self.coefficients() if self._trainer is not None else None)
        return total, counts, blocks

    def reduce(self, total: ChunkLoss, num_sequences: int, counts: Optional[SlotCounts] = None) -> Tensor:
        """W · Σ α·num_local / (P + ε) (train/reduction.py): the micro-batch's sums are all-reduced in one collective
        on a packed detached copy and added to the step's window; P is the window's provisional denominator."""
        numerator = loss_numerator(total, self.coefficients())
        local = local_sums(total, counts, self.objective.normalizer, num_sequences)
        global_sums = unpack(self.trainer.strategy.reduce(pack(local), reduce_op="sum"), like=local)
        provisional = self.window.add(global_sums, num_sequences)
        return self.trainer.world_size * numerator / (provisional + EPS)

    def coefficients(self) -> Dict[str, float]:
        """The objective's loss coefficients at this optimizer step (constant unless the objective schedules them)."""
        return dict(self.objective.coefficients_at(self.global_step, self.trainer.max_steps))

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        total, counts, _ = self.forward_loss(batch, self.chunk_blocks)
        self.add_to_step(tokens=batch["attention_mask"].sum())
        return self.reduce(total, batch["input_ids"].shape[0], counts)

    def on_before_backward(self, loss: Tensor) -> None:
        """The loss backward runs on (what training_step returned), checked with the gradients at the step's read."""
        loss = loss.detach().float()
        self.add_to_step(loss=loss, bad_loss=(~torch.isfinite(loss)).float())

    def add_to_step(self, **values: Tensor) -> None:
        """Sum device scalars over the micro-batches of the step (read once, in step_report)."""
        for name, value in values.items():
            self._step_values[name] = value + self._step_values[name] if name in self._step_values else value

    def step_report(self) -> StepReport:
        """The step's one host read, once all its micro-batches are reduced (the NaN guard reads it first).

        The window's global sums, the gradient norm and the non-finite flags (summed over ranks in one collective on
        the device) come back in one copy; everything logged and decided for the step is taken from it.
        """
        if self.report is None:
            grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
            zero = torch.zeros((), device=self.device)
            norm = torch.nn.utils.get_total_norm(grads) if grads else zero
            if hasattr(norm, "full_tensor"):  # fsdp2: a norm of gradient shards (DTensor); its full value, on device
                norm = norm.full_tensor()
            norm = norm.float()
            local = {"grad_norm": norm, "tokens": self._step_values.get("tokens", zero),
                     "loss": self._step_values.get("loss", zero),
                     "local_bad_loss": self._step_values.get("bad_loss", zero),
                     "local_bad_grad": (~torch.isfinite(norm)).float()}
            flags = torch.stack([local["local_bad_loss"], local["local_bad_grad"]])
            if self.trainer.world_size > 1:  # every rank decides the same: one collective, on the device
                flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
            rows = self.window.rows * self.trainer.world_size
            factor, sums, host = self.window.close(self.trainer.accumulate_grad_batches,
                                                   {**local, "bad_loss": flags[0], "bad_grad": flags[1]})
            self.report = StepReport(
                factor=factor, sums=sums, loss=loss_numerator(sums.total, self.coefficients()) / (sums.den + EPS),
                rows=rows, grad_norm=float(host["grad_norm"]) * (factor or 1.0), tokens=float(host["tokens"]),
                local_loss=float(host["loss"]), bad_loss=bool(host["bad_loss"] > 0),
                local_bad_loss=bool(host["local_bad_loss"] > 0), bad_grad=bool(host["bad_grad"] > 0),
                local_bad_grad=bool(host["local_bad_grad"] > 0))
            self._step_values = {}
        return self.report

    def finish_step(self) -> None:
        """Before the optimizer step: make the gradients those of the step's global mean (or drop them when the
        step has no supervised slot anywhere), then log the step's global values (host copies: no device read)."""
        report = self.step_report()
        if report.factor is None:
            for p in self.trainable_parameters():
                p.grad = None  # the optimizer skips parameters without a gradient
            self.skipped_empty_steps += 1
            log.warning("step %d: no supervised slot in the global batch; skipped (%d so far)",
                        self.global_step, self.skipped_empty_steps)
            return
        scale_gradients(self.trainable_parameters(), report.factor)
        self.log_step(report.loss, report.sums.total, report.sums.counts, report.rows)
        self.log("train/grad_norm", torch.tensor(report.grad_norm), batch_size=report.rows)

    # ------------------------------------------------------------------------------------------ logging
    def log_step(self, loss: Tensor, total: ChunkLoss, counts: SlotCounts, size: int) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        den = total.weight_sum.clamp(min=EPS)
        for name in self.objective.coefficients:  # each term un-weighted by its α: Σ w·m·ℓ / Σ w·m
            self.log(f"train/{name}", total.terms[name] / den, batch_size=size)
        metrics = summarize(counts)
        metrics.update(self.objective.metrics(total, counts))
        for name, value in metrics.items():
            self.log(f"train/{name}", value, prog_bar=name in ("acc", "tau_est"), batch_size=size)
        mean_weight = total.slot_weight_sum / counts.valid.clamp(min=1)
        for k in torch.nonzero(counts.valid).flatten().tolist():
            self.log(f"train/weight_k/{k}", mean_weight[k], batch_size=size)
        self.log("train/lr", torch.tensor(float(self.optimizers().param_groups[0]["lr"])), batch_size=size)
        for name, alpha in self.coefficients().items():  # where a schedule (DFlash2's selector ramp) stands
            self.log(f"train/coefficient/{name}", torch.tensor(float(alpha)), batch_size=size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.window.sums is None:  # the first micro-batch of an optimizer step
            self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Whole-step time (forward, backward, optimizer; on a GPU the host waits for the device at the step's read)
        and throughput in real tokens of this rank's micro-batches of the step."""
        report = self.report
        if report is None:  # within an accumulation window: the step is not done yet
            return
        self.report = None  # the optimizer step has run
        elapsed = max(time.perf_counter() - self._step_started, 1e-9)
        self.log("train/step_time", torch.tensor(elapsed), batch_size=report.rows)
        self.log("train/tokens_per_s", torch.tensor(report.tokens / elapsed), batch_size=report.rows)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.finish_step()

    # ------------------------------------------------------------------------------------------ optim, ckpt
    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.trainable_parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["dflashtrain"] = self.checkpoint_metadata
