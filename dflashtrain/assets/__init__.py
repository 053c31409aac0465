"""Embedded offline default assets: a tiny Qwen3 target, its tokenizer and synthetic chat data.

Everything under ``tiny/`` is produced by ``python -m dflashtrain.assets.build_tiny`` and
committed, so the trainer's defaults work with no network access. Only paths live here;
importing this package loads nothing heavy.
"""

from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent / "tiny"
TINY_TARGET_DIR = TINY_DIR / "target"
TINY_DATA_DIR = TINY_DIR / "data"
TINY_TRAIN_JSONL = TINY_DATA_DIR / "train.jsonl"
TINY_HELDOUT_JSONL = TINY_DATA_DIR / "heldout.jsonl"

__all__ = ["TINY_DIR", "TINY_TARGET_DIR", "TINY_DATA_DIR", "TINY_TRAIN_JSONL", "TINY_HELDOUT_JSONL"]
