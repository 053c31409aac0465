"""Config rules of the dflash2 family (dynamic convolutions + candidate selector), run before any weight loads.

The convolution and selector sizes live in ``model.drafter`` (docs/dflash2.md); the stop-gradient switch is a
loss option that shapes how the selector's scores are computed, so it travels with the head options.
"""

from __future__ import annotations

from typing import Any, Dict

from omegaconf import DictConfig

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import DrafterConfig

OPTIONS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")


def check(cfg: DictConfig, loss_name: str) -> None:
    drafter = cfg.model.drafter
    if drafter.markov_rank != 0:
        raise ConfigError("model.drafter.markov_rank", f"is {drafter.markov_rank}, but the Markov head is DSpark's; "
                                                       f"loss={loss_name} trains DFlash2 (set it to 0)")
    if not 1 <= drafter.conv_kernel_size <= drafter.block_size:
        raise ConfigError("model.drafter.conv_kernel_size", f"must be in [1, model.drafter.block_size = "
                                                            f"{drafter.block_size}], got {drafter.conv_kernel_size}")
    if drafter.conv_group_size < 1:
        raise ConfigError("model.drafter.conv_group_size", f"must be >= 1, got {drafter.conv_group_size}")
    if drafter.selector_rank < 1:
        raise ConfigError("model.drafter.selector_rank", f"must be >= 1, got {drafter.selector_rank}")
    if drafter.selector_top_k < 2:
        raise ConfigError("model.drafter.selector_top_k", f"must be >= 2 (a choice among candidates), got "
                                                          f"{drafter.selector_top_k}")


def check_against_target(cfg: DictConfig, target_config: Any) -> None:
    """The convolution groups divide the hidden size; K fits the vocabulary."""
    drafter = cfg.model.drafter
    if target_config.hidden_size % drafter.conv_group_size:
        raise ConfigError("model.drafter.conv_group_size", f"{drafter.conv_group_size} does not divide the target's "
                                                           f"hidden size {target_config.hidden_size}")
    if drafter.selector_top_k > target_config.vocab_size:
        raise ConfigError("model.drafter.selector_top_k", f"{drafter.selector_top_k} exceeds the target's vocabulary "
                                                          f"{target_config.vocab_size}")


def head_options(cfg: DictConfig) -> Dict[str, Any]:
    options: Dict[str, Any] = {name: int(cfg.model.drafter[name]) for name in OPTIONS}
    options["selector_stop_gradient"] = bool(cfg.loss.selector_stop_gradient)
    return options


def refuse_options(cfg: DictConfig, loss_name: str) -> None:
    """For the other families: a DFlash2 size set away from its default would silently do nothing."""
    for name in OPTIONS:
        default = DrafterConfig.__dataclass_fields__[name].default
        if cfg.model.drafter[name] != default:
            raise ConfigError(f"model.drafter.{name}", f"is a DFlash2 option (loss=dflash2); loss={loss_name} trains "
                                                       f"another family, so leave it at {default}")
