"""Training objectives: one module per objective behind the protocol in :mod:`dflashtrain.objectives.protocol`."""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Any, Type

from dflashtrain.objectives.protocol import Objective, check_objective


def objective_class(schema: Type[Any]) -> type:
    """The class a loss schema builds (its ``objective`` = "module:Class")."""
    module, _, name = schema.objective.partition(":")
    return getattr(importlib.import_module(module), name)


def build_objective(loss: Any) -> Objective:
    """A loss schema instance (``OmegaConf.to_object(cfg.loss)``) -> its checked objective.

    The class receives exactly the schema's fields; nothing but the registered objective classes is ever built.
    """
    cls = objective_class(type(loss))
    return check_objective(cls(**{f.name: getattr(loss, f.name) for f in fields(loss)}))
