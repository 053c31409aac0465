"""The ``loss`` group's schemas: one dataclass per objective, the one place for its defaults, and its own rules.

Each schema names the objective class it builds (``objective``, "module:Class"); the class receives the schema's
fields as keyword arguments (objectives.build_objective), and nothing else can be instantiated from a config.
Adding an objective: its module, ``conf/loss/<name>.yaml`` and one entry in :data:`LOSS_SCHEMAS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Dict, Optional, Type

from dflashtrain.config.errors import ConfigError


class MaskMode(str, Enum):
    independent = "independent"
    cumulative = "cumulative"


class TargetKind(str, Enum):
    hard = "hard"
    kd = "kd"


class DPaceMode(str, Enum):
    full = "full"
    cumulative = "cumulative"
    continuation = "continuation"


class DFlash2Base(str, Enum):
    decay = "decay"
    dpace = "dpace"


class SelectorGold(str, Enum):
    exclude = "exclude"
    inject = "inject"


class Reduction(str, Enum):
    weighted_mean = "weighted_mean"
    per_sequence = "per_sequence"
    per_token = "per_token"


# ---------------------------------------------------------------------------------------------- loss
# Each loss schema names the objective class it builds (``objective``, "module:Class") and the class receives the
# schema's fields as keyword arguments; nothing else can be instantiated from a config. The decay γ follows the
# block size (docs/objectives.md, decay) unless set.
BLOCK_GAMMA = "${default_gamma:${model.drafter.block_size}}"


@dataclass
class DecayLossConfig:
    """DFlash: exponentially decaying slot weights (docs/objectives.md, decay)."""

    objective: ClassVar[str] = "dflashtrain.objectives.decay:DecayObjective"
    gamma: Optional[float] = BLOCK_GAMMA  # type: ignore[assignment]  # 0 or null: all weights 1
    mask_mode: MaskMode = MaskMode.independent
    target: TargetKind = TargetKind.hard

    def validate(self) -> None:
        _gamma(self.gamma)


@dataclass
class DPaceLossConfig:
    """D-PACE: detached confidence-derived slot weights (docs/objectives.md, dpace)."""

    objective: ClassVar[str] = "dflashtrain.objectives.dpace:DPaceObjective"
    alpha: float = 0.5  # in (0, 1]; 1 gives the linear ramp [L, L-1, ..., 1]
    mode: DPaceMode = DPaceMode.full
    reduction: Reduction = Reduction.weighted_mean
    gamma: Optional[float] = None  # ignored under dpace; kept only so that setting it warns instead of failing
    mask_mode: MaskMode = MaskMode.independent
    target: TargetKind = TargetKind.hard

    def validate(self) -> None:
        if not 0.0 < self.alpha <= 1.0:  # also false for nan
            raise ConfigError("loss.alpha", f"must be in (0, 1], got {self.alpha}")
        if self.gamma is not None:
            import warnings

            warnings.warn(f"loss.gamma={self.gamma} is ignored under loss=dpace (weights come from confidences)")


DEFAULT_PREFIX_WEIGHT_BASE = 0.9  # vp_drafter: P(p) ∝ base^p; also what a null base means


@dataclass
class VPDrafterLossConfig:
    """D²SD variable-prefix drafter (docs/objectives.md, vp_drafter)."""

    objective: ClassVar[str] = "dflashtrain.objectives.vp:VPDrafterObjective"
    prefix_weight_base: Optional[float] = DEFAULT_PREFIX_WEIGHT_BASE  # P(p) ∝ base^p, p in [2, B-1]; null: default
    gamma: Optional[float] = BLOCK_GAMMA  # type: ignore[assignment]  # decay from the first masked slot
    include_anchor_only: bool = False  # allow p = 1
    mask_mode: MaskMode = MaskMode.independent
    target: TargetKind = TargetKind.hard

    def validate(self) -> None:
        base = self.prefix_weight_base
        if base is not None and not 0.0 < base < float("inf"):
            raise ConfigError("loss.prefix_weight_base",
                              f"must be a finite number > 0 (or null for {DEFAULT_PREFIX_WEIGHT_BASE}), got {base}")
        _gamma(self.gamma)


@dataclass
class DSparkLossConfig:
    """DSpark: next-token convention, Markov-biased logits, CE + L1 to the target + confidence BCE
    (docs/objectives.md, dspark). conf/loss/dspark.yaml also sets the Markov head's rank and the block size."""

    objective: ClassVar[str] = "dflashtrain.objectives.dspark:DSparkObjective"
    ce_alpha: float = 0.1  # hard CE on the data token
    l1_alpha: float = 0.9  # L1 between the drafter's and the target's distributions
    conf_alpha: float = 1.0  # confidence-head BCE; 0 = no confidence head
    gamma: Optional[float] = 4.0  # w_k = exp(-k/gamma), k >= 0; 0 or null: all weights 1
    mask_mode: MaskMode = MaskMode.cumulative

    def validate(self) -> None:
        for key in ("ce_alpha", "l1_alpha", "conf_alpha"):
            value = getattr(self, key)
            if not 0.0 <= value < float("inf"):
                raise ConfigError(f"loss.{key}", f"must be a finite number >= 0, got {value}")
        if self.ce_alpha == 0 and self.l1_alpha == 0:
            raise ConfigError("loss.ce_alpha", "ce_alpha and l1_alpha are both 0: nothing would train the drafter")
        _gamma(self.gamma)


@dataclass
class DFlash2LossConfig:
    """DFlash2: a DFlash base objective (decay or D-PACE) + α · the candidate selector's CE over the same
    denominator (docs/dflash2.md, objective). The convolution and selector sizes are model.drafter keys."""

    objective: ClassVar[str] = "dflashtrain.objectives.dflash2:DFlash2Objective"
    base: DFlash2Base = DFlash2Base.decay
    gamma: Optional[float] = BLOCK_GAMMA  # type: ignore[assignment]  # base decay: w_k = exp(-(k-1)/γ)
    dpace_alpha: float = 0.5  # base dpace: q̃ = α + (1 − α)·q, in (0, 1]
    dpace_mode: DPaceMode = DPaceMode.full  # base dpace
    mask_mode: MaskMode = MaskMode.independent
    target: TargetKind = TargetKind.hard
    selector_alpha: float = 1.0  # > 0: weight of the selector term
    selector_gold: SelectorGold = SelectorGold.exclude  # label outside the top-K: no selector loss, or inject it
    selector_warmup_ratio: float = 0.0  # selector weight 0 for this fraction of trainer.max_steps
    selector_ramp_ratio: float = 0.0  # then a linear ramp to selector_alpha over this fraction
    selector_stop_gradient: bool = False  # the selector term does not move the unary logits or the draft hidden

    def validate(self) -> None:
        _gamma(self.gamma)
        if not 0.0 < self.selector_alpha < float("inf"):
            raise ConfigError("loss.selector_alpha", f"must be a finite number > 0, got {self.selector_alpha}")
        if not 0.0 < self.dpace_alpha <= 1.0:
            raise ConfigError("loss.dpace_alpha", f"must be in (0, 1], got {self.dpace_alpha}")
        for key in ("selector_warmup_ratio", "selector_ramp_ratio"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"loss.{key}", f"must be in [0, 1), got {getattr(self, key)}")
        if self.selector_warmup_ratio + self.selector_ramp_ratio >= 1.0:
            raise ConfigError("loss.selector_ramp_ratio", "selector_warmup_ratio + selector_ramp_ratio must be < 1 "
                                                          "(the selector would never reach selector_alpha)")


def _gamma(gamma: Optional[float]) -> None:
    if gamma is not None and not 0.0 <= gamma < float("inf"):
        raise ConfigError("loss.gamma", f"must be a finite number >= 0, or null; got {gamma}")


# loss=<name> -> its schema. Adding an objective: its module, conf/loss/<name>.yaml, and one line here.
LOSS_SCHEMAS: Dict[str, Type[Any]] = {
    "decay": DecayLossConfig,
    "dpace": DPaceLossConfig,
    "vp_drafter": VPDrafterLossConfig,
    "dspark": DSparkLossConfig,
    "dflash2": DFlash2LossConfig,
}


# Published decay γ per block size (docs/objectives.md, decay); other sizes scale B = 16's γ linearly.
PUBLISHED_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    return PUBLISHED_GAMMA.get(int(block_size), round(7.0 * int(block_size) / 16, 2))
