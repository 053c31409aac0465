"""The LightningModule: frozen target -> anchors and blocks -> drafter -> chunked objective -> global reduction.

It receives built objects and never reads the config (docs/architecture.md, one training step). The target is held
as a plain attribute (not a registered submodule), so it is absent from the optimizer, the state dict and every
checkpoint by construction; the drafting family's extra modules (``heads``) are registered beside the drafter.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from dflashtrain.config.schema import AttentionBackend
from dflashtrain.data.blocks import DraftBlocks, make_blocks, sample_anchors
from dflashtrain.data.sampling import RowGenerators
from dflashtrain.families import DraftingFamily
from dflashtrain.models.masks import AnchorAttentionMask
from dflashtrain.models.target import FrozenTarget, TargetStates
from dflashtrain.objectives.chunked import chunked_objective, teacher_logits
from dflashtrain.objectives.metrics import SlotCounts, summarize
from dflashtrain.objectives.protocol import ChunkLoss, Normalizer, Objective, check_objective
from dflashtrain.train.host import StepClock, StepHealth, StepReport, to_host

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


def loss_numerator(total: ChunkLoss, coefficients: Dict[str, float]) -> Tensor:
    """Σ_t α_t · num_t. The objective's coefficients must name exactly its loss terms."""
    if set(coefficients) != set(total.terms):
        raise ValueError(f"the objective's coefficients {sorted(coefficients)} do not name its loss terms "
                         f"{sorted(total.terms)}")
    return sum(alpha * total.terms[name] for name, alpha in coefficients.items())


def local_denominator(total: ChunkLoss, normalizer: Normalizer, num_sequences: int) -> Tensor:
    """This rank's share of the loss's denominator (docs/conventions.md, reduction), a new fp32 tensor."""
    if normalizer == Normalizer.weight:
        return total.weight_sum.detach().float().clone()
    if normalizer == Normalizer.tokens:
        return total.token_sum.detach().float().clone()
    if normalizer == Normalizer.sequences:
        return torch.tensor(float(num_sequences), device=total.weight_sum.device)
    raise ValueError(f"unknown normalizer {normalizer!r}; valid: {[n.value for n in Normalizer]}")


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
        self.skipped_empty_steps = 0
        self.health = StepHealth()  # device flags: empty / non-finite steps (train/host.py)
        self.clock = StepClock()
        self._window: Optional[tuple] = None  # (loss sum, micro-batches, ChunkLoss, SlotCounts) of this step
        self._grad_norm: Optional[Tensor] = None  # computed once per optimizer step (reset after it)
        self._report: Optional[tuple] = None  # (StepReport or None,) of this optimizer step (reset after it)
        self._skip: Optional[Tensor] = None  # this step is skipped (bool, on the device)

    # ------------------------------------------------------------------------------------------ wiring
    def setup(self, stage: str) -> None:
        self.target.to(self.device)

    def on_fit_start(self) -> None:
        self.target.to(self.device)  # the strategy has placed the module by now

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
        # A batch without any anchor gives dummy blocks only: an empty step, skipped (no host check here).
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
            blocks.anchor_positions, blocks.block_keep, states.tapped.shape[1], block_size, self.use_flex()
        )
        hidden = self.drafter(block_embeds, states.tapped, blocks.position_ids.view(batch, -1), mask)
        return hidden.view(batch, num_blocks, block_size, -1)

    def chunk_logits(self, hidden: Tensor, blocks: DraftBlocks):
        """hidden [b, c, B, d] -> (logits [b, c, B, V], extras): the family's logits (DSpark adds the Markov bias)."""
        return self.family.logits(hidden, blocks, self.target.lm_head, self.heads)

    # ------------------------------------------------------------------------------------------ step
    def forward_loss(self, batch: Dict[str, Tensor], chunk_blocks: int, use_checkpoint: bool = True):
        """Target under no_grad -> blocks -> drafter -> chunked objective. Returns (ChunkLoss, SlotCounts, blocks)."""
        states = self.target.states(batch["input_ids"], batch["attention_mask"])
        blocks = self.blocks_for(batch)
        hidden = self.draft_hidden(blocks, states)
        teacher = None
        if self.objective.needs_teacher:
            teacher = lambda positions: teacher_logits(states.final_hidden, positions, self.target.lm_head)  # noqa: E731
        total, counts = chunked_objective(hidden, blocks, self.objective, self.chunk_logits, chunk_blocks,
                                          teacher=teacher, use_checkpoint=use_checkpoint)
        return total, counts, blocks

    def reduce(self, total: ChunkLoss, num_sequences: int) -> Tensor:
        """W · num_local / (den_global + ε), den all-reduced (on a copy) and detached.

        A global batch with no supervised slot (den_global = 0, so num = 0) gives a zero loss; the step is then
        skipped (``self.health``, no host read here)."""
        numerator = loss_numerator(total, self.objective.coefficients)
        local_den = local_denominator(total, self.objective.normalizer, num_sequences)
        global_den = self.trainer.strategy.reduce(local_den, reduce_op="sum")
        self.health.saw_denominator(global_den)
        return self.trainer.world_size * numerator / (global_den + EPS)

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        total, counts, blocks = self.forward_loss(batch, self.chunk_blocks)
        loss = self.reduce(total, batch["input_ids"].shape[0])
        self.accumulate(loss, total, counts)
        return loss

    # ------------------------------------------------------------------------------------------ step end, logging
    def accumulate(self, loss: Tensor, total: ChunkLoss, counts: SlotCounts) -> None:
        """Add a micro-batch's sums to this optimizer step's (on the device; logged on host-read steps)."""
        total = ChunkLoss(terms={k: v.detach() for k, v in total.terms.items()}, weight_sum=total.weight_sum,
                          token_sum=total.token_sum, slot_weight_sum=total.slot_weight_sum, stats=total.stats)
        if self._window is None:
            self._window = (loss.detach(), 1, total, counts)
        else:
            s, n, t, c = self._window
            self._window = (s + loss.detach(), n + 1, t + total, c + counts)

    def on_before_backward(self, loss: Tensor) -> None:
        self.health.saw_loss(loss)

    def grad_norm(self) -> Tensor:
        """‖∇‖₂ over the trainable parameters, computed once per optimizer step (logging, guard and clipping)."""
        if self._grad_norm is None:
            grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        return self._grad_norm

    def device_skips(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` can skip a step on the device (fused AdamW's found_inf; not under a GradScaler,
        which sets found_inf itself)."""
        raw = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper or the optimizer
        return bool(raw.defaults.get("fused")) and getattr(self.trainer.precision_plugin, "scaler", None) is None

    def host_read_every(self, optimizer: torch.optim.Optimizer) -> int:
        """Steps between host reads (train/host.py): 1 on CPU or without a device-side skip, else the log cadence."""
        if self.device.type == "cpu" or not self.device_skips(optimizer):
            return 1
        return max(1, self.trainer.log_every_n_steps)

    def step_report(self, optimizer: torch.optim.Optimizer) -> Optional[StepReport]:
        """Once per optimizer step, before it: fold the step into ``self.health``; on a host-read step read flags and
        sums in one transfer, log them, and return what the guard needs (None on other steps)."""
        if self._report is not None:
            return self._report[0]
        norm = self.grad_norm()
        reduce_max = (lambda t: self.trainer.strategy.reduce(t, reduce_op="max")) if self.trainer.world_size > 1 \
            else (lambda t: t)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        self._skip = self.health.end_step(self.global_step, norm, not scaler, reduce_max)
        report = None
        every = self.host_read_every(optimizer)
        if (self.global_step + 1) % every == 0 or self.global_step + 1 == self.trainer.max_steps:
            report = self.read_and_log(norm, optimizer)
        self._report = (report,)
        return report

    def read_and_log(self, norm: Tensor, optimizer: torch.optim.Optimizer) -> StepReport:
        """The host read of a step: health flags and every logged sum in one device -> host copy, then the logs."""
        loss_sum, micro, total, counts = self._window
        values = {"loss": loss_sum / micro, "grad_norm": norm, **self.health.device_values(),
                  **{f"counts.{k}": v for k, v in vars(counts).items()},
                  **{f"total.{k}": v for k, v in vars(total).items() if torch.is_tensor(v)},
                  **{f"term.{k}": v for k, v in total.terms.items()}, **{f"stat.{k}": v for k, v in total.stats.items()}}
        tokens = self.clock.previous_tokens()
        if tokens is not None:
            values["tokens"] = tokens
        host = to_host(values)
        self.health.read()
        report = StepReport(step=self.global_step, first_bad=int(host["first_bad"]),
                            bad_was_loss=bool(host["bad_was_loss"]), bad_here=bool(host["bad_here"]), bad_norm=float(host["bad_norm"]), bad_loss=float(host["bad_loss"]),
                            empty_steps=int(host["empty_steps"]))
        if report.empty_steps:
            self.skipped_empty_steps += report.empty_steps
            log.warning("step %d: %d step(s) since the last check had no supervised slot in the global batch; "
                        "skipped (%d so far)", self.global_step, report.empty_steps, self.skipped_empty_steps)
        host_total = ChunkLoss(terms={k[5:]: v for k, v in host.items() if k.startswith("term.")},
                               weight_sum=host["total.weight_sum"], token_sum=host["total.token_sum"],
                               slot_weight_sum=host["total.slot_weight_sum"],
                               stats={k[5:]: v for k, v in host.items() if k.startswith("stat.")})
        host_counts = SlotCounts(**{k[7:]: v for k, v in host.items() if k.startswith("counts.")})
        self.log_step(host["loss"], host_total, host_counts, host["grad_norm"], optimizer)
        elapsed = self.clock.previous()
        if elapsed is not None:
            self.log("train/step_time", torch.tensor(elapsed))
            self.log("train/tokens_per_s", host["tokens"] / elapsed)
        return report

    def log_step(self, loss: Tensor, total: ChunkLoss, counts: SlotCounts, grad_norm: Tensor, optimizer) -> None:
        """Everything logged for a step, from host copies of its sums (CPU tensors: logging reads nothing back)."""
        self.log("train/loss", loss, prog_bar=True)
        den = total.weight_sum.clamp(min=EPS)
        for name in self.objective.coefficients:  # each term un-weighted by its α: Σ w·m·ℓ / Σ w·m
            self.log(f"train/{name}", total.terms[name] / den)
        metrics = summarize(counts)
        metrics.update(self.objective.metrics(total, counts))
        for name, value in metrics.items():
            self.log(f"train/{name}", value, prog_bar=name in ("acc", "tau_est"))
        mean_weight = total.slot_weight_sum / counts.valid.clamp(min=1)
        for k in torch.nonzero(counts.valid).flatten().tolist():
            self.log(f"train/weight_k/{k}", mean_weight[k])
        self.log("train/grad_norm", grad_norm)
        self.log("train/lr", torch.tensor(float(optimizer.param_groups[0]["lr"])))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.step_report(optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """The last hook before the optimizer step: clip with the step's one grad norm, and skip an empty or
        non-finite step on the device (fused AdamW's found_inf) or, without that, on the host."""
        report = self.step_report(optimizer)
        own = gradient_clip_algorithm in (None, "norm") and not isinstance(self.trainer.strategy, FSDPStrategy) \
            and getattr(self.trainer.precision_plugin, "scaler", None) is None
        if gradient_clip_val and own:
            grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(grads, gradient_clip_val, self.grad_norm())
        elif gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self.device_skips(optimizer):
            getattr(optimizer, "optimizer", optimizer).found_inf = self._skip.float()
        elif report is not None and report.empty_steps:  # host read every step here: p.grad None = not stepped
            for p in self.trainable_parameters():
                p.grad = None
        self._window = self._grad_norm = self._report = None  # the step is done

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.clock.start(self.device, batch["attention_mask"].sum())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.stop()

    # ------------------------------------------------------------------------------------------ optim, ckpt
    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.trainable_parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["dflashtrain"] = self.checkpoint_metadata
