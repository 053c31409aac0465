"""Drafting families: what a kind of drafter brings beyond the shared DFlash backbone (docs/architecture.md, families).

Every objective names the family it trains (``Objective.family``). A family is one subpackage here with

* ``checks.py`` (no torch): ``check(cfg, loss_name)``, the family's config rules, run before any weight loads,
  ``check_against_target(cfg, target_config)``, its rules against the target's config.json, and
  ``head_options(cfg)``, the options its extra modules are built from (recorded in every checkpoint);
* ``family.py``: ``FAMILY``, a :class:`DraftingFamily` — its extra trainable modules ("heads"), how a chunk's
  logits are made, how it drafts at inference, and what its export adds.

Train, eval, export and the callbacks ask the family; nothing outside a family's subpackage tests which one it is.
Adding a family adds one subpackage (the registry below finds it).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class DraftingFamily:
    name: str
    architecture: str  # config.json "architectures" of an export (what the serving engines dispatch on)
    label_offset: int  # the label convention its drafting serves (0: DFlash, 1: next-token)
    # (geometry, head_options) -> the drafter backbone (DFlashDrafter for the DFlash-backbone families)
    build_drafter: Callable[[Any, Dict[str, Any]], Any]
    # (vocab_size, hidden_size, head_options) -> the trainable modules beside the drafter, or None
    build_heads: Callable[[int, int, Dict[str, Any]], Any]
    # (hidden [b, c, B, d], blocks, lm_head, heads) -> (logits [b, c, B, V], extras for SlotChunk.extras)
    logits: Callable[..., Tuple[Any, Dict[str, Any]]]
    # (drafter, heads, target) -> a Proposer for dflashtrain.inference.decode.generate
    proposer: Callable[..., Any]
    # head_options -> the fields an export adds to config.json (beyond the DFlash fields); and back
    export_config: Callable[[Dict[str, Any]], Dict[str, Any]]
    options_from_export: Callable[[Dict[str, Any]], Dict[str, Any]]
    # heads -> {exported name: tensor}; and back: (tensors, config.json) -> heads or None
    export_tensors: Callable[[Any], Dict[str, Any]]
    heads_from_export: Callable[[Dict[str, Any], Dict[str, Any]], Any]
    is_head_tensor: Callable[[str], bool]  # exported tensor name -> whether it belongs to the heads
    export_files: Tuple[Path, ...] = field(default=())  # files copied into an export (e.g. a modeling file)
    training_options: Tuple[str, ...] = field(default=())  # head options that only shape training: not exported


def family_names() -> List[str]:
    """Every family subpackage."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def family_checks(name: str) -> ModuleType:
    """The light half of a family: ``check``, ``check_against_target`` and ``head_options``."""
    return importlib.import_module(f"{__name__}.{_known(name)}.checks")


def get_family(name: str) -> DraftingFamily:
    return importlib.import_module(f"{__name__}.{_known(name)}.family").FAMILY


def family_for_architecture(architecture: Optional[str]) -> DraftingFamily:
    """The family an exported directory's config.json ``architectures[0]`` names."""
    for name in family_names():
        family = get_family(name)
        if family.architecture == architecture:
            return family
    known = ", ".join(get_family(n).architecture for n in family_names())
    raise ValueError(f"architectures {architecture!r} is no dflashtrain drafter; known: {known}")


def _known(name: str) -> str:
    if name not in family_names():
        raise ValueError(f"unknown drafting family {name!r}; known: {', '.join(family_names())}")
    return name
