"""Config rules of the dspark family (Markov and confidence heads), run before any weight loads."""

from __future__ import annotations

from typing import Any, Dict

from omegaconf import DictConfig

from dflashtrain.config.errors import ConfigError
from dflashtrain.families.dflash2.checks import refuse_options


def check(cfg: DictConfig, loss_name: str) -> None:
    """A confidence head reads W1[prev] of the Markov head, so it needs a rank."""
    refuse_options(cfg, loss_name)
    rank = cfg.model.drafter.markov_rank
    if rank < 0:
        raise ConfigError("model.drafter.markov_rank", f"must be >= 0 (0 = no Markov head), got {rank}")
    if cfg.loss.conf_alpha > 0 and rank == 0:
        raise ConfigError(
            "model.drafter.markov_rank",
            f"must be > 0 while loss.conf_alpha={cfg.loss.conf_alpha} > 0: the confidence head reads W1[prev] of the "
            "Markov head; set a rank, or loss.conf_alpha=0 for no confidence head",
        )


def check_against_target(cfg: DictConfig, target_config: Any) -> None:
    pass


def head_options(cfg: DictConfig) -> Dict[str, Any]:
    """markov_rank (0: no heads at all) and whether the confidence head exists (iff its loss weight is > 0)."""
    return {"markov_rank": int(cfg.model.drafter.markov_rank), "confidence_head": bool(cfg.loss.conf_alpha > 0)}
