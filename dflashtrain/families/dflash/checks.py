"""Config rules of the dflash family (no extra modules), run before any weight loads."""

from __future__ import annotations

from typing import Any, Dict

from omegaconf import DictConfig

from dflashtrain.config.errors import ConfigError
from dflashtrain.families.dflash2.checks import refuse_options


def check(cfg: DictConfig, loss_name: str) -> None:
    refuse_options(cfg, loss_name)
    rank = cfg.model.drafter.markov_rank
    if rank != 0:
        raise ConfigError(
            "model.drafter.markov_rank",
            f"is {rank}, but the Markov head is a DSpark head (next-token convention) and loss={loss_name} trains "
            "the dflash family (DFlash convention); use loss=dspark or model.drafter.markov_rank=0",
        )


def check_against_target(cfg: DictConfig, target_config: Any) -> None:
    pass


def head_options(cfg: DictConfig) -> Dict[str, Any]:
    return {}
