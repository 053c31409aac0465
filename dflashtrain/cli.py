"""Console entry points. Each is a Hydra app over the configs shipped in the package (``dflashtrain.conf``).

A configuration error prints one line naming the key and exits with status 2, without a traceback.
"""

from __future__ import annotations

import os
import sys

# Nothing may come from a hub, ever: make transformers and datasets fail fast instead of reaching out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from dflashtrain.config import ConfigError, register_configs  # noqa: E402
from dflashtrain.data.datamodule import BadRowError  # noqa: E402

register_configs()

CONFIG_PATH = "pkg://dflashtrain.conf"


def _report(error: Exception) -> None:
    print(f"dflashtrain: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> None:
    """`dflashtrain [overrides]`: train a drafter."""
    from dflashtrain.train import run

    try:
        run(cfg)
    except (ConfigError, BadRowError) as error:
        _report(error)
