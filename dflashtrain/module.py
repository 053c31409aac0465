"""The LightningModule: frozen target -> anchors and blocks -> drafter -> chunked objective -> global reduction.

It receives built objects and never reads the config. The target is held as a plain attribute (not a registered
submodule), so it is absent from the optimizer, the state dict and every checkpoint by construction.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import torch
from torch import Tensor

from dflashtrain.data.blocks import DraftBlocks, make_blocks, sample_anchors
from dflashtrain.models.dflash import DFlashDrafter
from dflashtrain.models.heads import DSparkHeads, slot_logits, teacher_forced_prev
from dflashtrain.models.masks import AnchorAttentionMask
from dflashtrain.objectives.chunked import chunked_objective, teacher_logits
from dflashtrain.objectives.core import ChunkLoss
from dflashtrain.objectives.dspark import CONFIDENCE_LOGITS
from dflashtrain.objectives.metrics import summarize
from dflashtrain.target import FrozenTarget, TargetStates

log = logging.getLogger(__name__)
EPS = 1e-8


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
        drafter: DFlashDrafter,
        target: FrozenTarget,
        objective: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_factor: Callable[[int], float],
        num_anchors: int,
        chunk_blocks: int,
        attention: str = "auto",
        checkpoint_metadata: Optional[Dict[str, Any]] = None,
        heads: Optional[DSparkHeads] = None,
    ):
        super().__init__()
        self.drafter = drafter
        self.heads = heads  # DSpark Markov/confidence heads: registered, so optimized and checkpointed
        if heads is not None and objective.label_offset != 1:
            raise ValueError("the DSpark heads need the next-token convention (objective.label_offset = 1)")
        self.__dict__["target"] = target  # plain attribute: never registered, never checkpointed
        self.objective = objective
        self.make_optimizer = optimizer
        self.lr_factor = lr_factor
        self.num_anchors = num_anchors
        self.chunk_blocks = chunk_blocks
        self.attention = attention
        self.checkpoint_metadata = checkpoint_metadata or {}
        self.skipped_empty_steps = 0
        self._step_started = 0.0

    # ------------------------------------------------------------------------------------------ wiring
    def setup(self, stage: str) -> None:
        self.target.to(self.device)

    def on_fit_start(self) -> None:
        self.target.to(self.device)  # the strategy has placed the module by now
        reduction = getattr(self.objective, "reduction", None)  # D-PACE names its reduction (SPEC §4)
        log.info("objective %s, reduction %s (normalizer %s)", self.objective.name,
                 getattr(reduction, "value", reduction) or self.objective.normalizer, self.objective.normalizer)

    def use_flex(self) -> bool:
        return self.attention == "flex" or (self.attention == "auto" and self.device.type == "cuda")

    def draft_hidden(self, blocks: DraftBlocks, states: TargetStates) -> Tensor:
        """Drafter forward over all N blocks at once -> final hidden [b, N, B, d]."""
        batch, num_blocks, block_size = blocks.input_ids.shape
        with torch.no_grad():
            block_embeds = self.target.embed_tokens(blocks.input_ids.view(batch, -1))  # [b, N·B, d]
        mask = AnchorAttentionMask.build(
            blocks.anchor_positions, blocks.block_keep, states.tapped.shape[1], block_size, self.use_flex()
        )
        hidden = self.drafter(block_embeds, states.tapped, blocks.position_ids.view(batch, -1), mask)
        return hidden.view(batch, num_blocks, block_size, -1)

    def logits(self, hidden: Tensor, blocks: DraftBlocks):
        """hidden [b, c, B, d] -> (logits [b, c, B, V], extras). With DSpark heads: z = lm_head(h) + W2·W1[prev]
        (teacher-forced prev) and extras["confidence_logits"] = u [b, c, B] when the confidence head exists."""
        if self.heads is None:
            return self.target.lm_head(hidden), {}
        logits, confidence = slot_logits(hidden, teacher_forced_prev(blocks), self.target.lm_head, self.heads)
        return logits, {} if confidence is None else {CONFIDENCE_LOGITS: confidence}

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """The drafter's parameters and the DSpark heads' (the frozen target is never among them)."""
        modules = [self.drafter] + ([self.heads] if self.heads is not None else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def loss_coefficients(self, total: ChunkLoss) -> Dict[str, float]:
        """Loss term name -> α. An objective without ``coefficients`` sums all its terms with α = 1."""
        return getattr(self.objective, "coefficients", None) or {name: 1.0 for name in total.terms}

    def blocks_for(self, batch: Dict[str, Tensor]) -> DraftBlocks:
        anchors, keep = sample_anchors(batch["loss_mask"], self.num_anchors)
        if not keep.any():
            raise ValueError(f"no valid anchor in the batch (sample ids {batch['sample_ids'].tolist()})")
        blocks = make_blocks(
            batch["input_ids"], batch["loss_mask"], anchors, keep,
            self.drafter.geometry.block_size, self.drafter.geometry.mask_token_id, self.objective.label_offset,
        )
        prepare = getattr(self.objective, "prepare_blocks", None)
        return prepare(blocks, batch["input_ids"]) if prepare is not None else blocks

    # ------------------------------------------------------------------------------------------ step
    def forward_loss(self, batch: Dict[str, Tensor], chunk_blocks: int, use_checkpoint: bool = True):
        """Target under no_grad -> blocks -> drafter -> chunked objective. Returns (ChunkLoss, SlotCounts, blocks)."""
        states = self.target.states(batch["input_ids"], batch["attention_mask"])
        blocks = self.blocks_for(batch)
        hidden = self.draft_hidden(blocks, states)
        teacher = None
        if getattr(self.objective, "needs_teacher", False):
            teacher = lambda positions: teacher_logits(states.final_hidden, positions, self.target.lm_head)  # noqa: E731
        total, counts = chunked_objective(
            hidden, blocks, self.objective, self.logits, chunk_blocks, teacher=teacher, use_checkpoint=use_checkpoint
        )
        return total, counts, blocks

    def reduce(self, total: ChunkLoss, num_sequences: int) -> Optional[Tensor]:
        """SPEC §2.4: W · num_local / (den_global + ε), den all-reduced and detached; None if den_global = 0."""
        numerator = sum(alpha * total.terms[name] for name, alpha in self.loss_coefficients(total).items())
        local_den = {"weight": total.weight_sum, "tokens": total.token_sum}.get(
            self.objective.normalizer, torch.tensor(float(num_sequences), device=self.device)
        )
        global_den = self.trainer.strategy.reduce(local_den.detach().float(), reduce_op="sum")
        if global_den <= 0:
            return None
        return self.trainer.world_size * numerator / (global_den + EPS)

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Optional[Tensor]:
        total, counts, blocks = self.forward_loss(batch, self.chunk_blocks)
        loss = self.reduce(total, batch["input_ids"].shape[0])
        if loss is None:
            self.skipped_empty_steps += 1
            log.warning("step %d: no supervised slot in the global batch; skipped (%d so far)",
                        self.global_step, self.skipped_empty_steps)
            return None
        self.log_step(loss, total, counts, blocks, batch)
        return loss

    # ------------------------------------------------------------------------------------------ logging
    def log_step(self, loss: Tensor, total: ChunkLoss, counts, blocks: DraftBlocks, batch: Dict[str, Tensor]) -> None:
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        den = total.weight_sum.clamp(min=EPS)
        for name in self.loss_coefficients(total):  # each term un-weighted by its α: Σ w·m·ℓ / Σ w·m
            self.log(f"train/{name}", total.terms[name].detach() / den, batch_size=size)
        kept = blocks.block_keep
        first_drafted = blocks.drafted.float().argmax(dim=-1)[kept].float()  # DFlash 1, next-token 0, VP p
        first_name = getattr(self.objective, "first_drafted_metric", "first_drafted_slot")  # VP: "prefix_len" (mean p)
        self.log(f"train/{first_name}", first_drafted.mean(), batch_size=size)
        metrics = summarize(counts)
        if hasattr(self.objective, "metrics"):  # objective-specific (DSpark: tau_probabilistic, confidence error)
            metrics.update(self.objective.metrics(total, counts))
        for name, value in metrics.items():
            self.log(f"train/{name}", value, prog_bar=name in ("acc", "tau_est"), batch_size=size)
        mean_weight = total.slot_weight_sum / counts.valid.clamp(min=1)
        for k in torch.nonzero(counts.valid).flatten().tolist():
            self.log(f"train/weight_k/{k}", mean_weight[k], batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Whole-step time (forward, backward, optimizer) and throughput in tokens of the local batch."""
        elapsed = max(time.perf_counter() - self._step_started, 1e-9)
        size = batch["input_ids"].shape[0]
        self.log("train/step_time", elapsed, batch_size=size)
        self.log("train/tokens_per_s", batch["attention_mask"].sum().float() / elapsed, batch_size=size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = [p.grad.detach().float().norm() for p in self.trainable_parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())

    # ------------------------------------------------------------------------------------------ optim, ckpt
    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.trainable_parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["dflashtrain"] = self.checkpoint_metadata
