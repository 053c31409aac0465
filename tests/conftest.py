"""Shared fixtures: a tiny random Qwen3 target saved to a temp dir (loaded through from_pretrained, like a real one)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test's workers share the cores: one thread each (and children)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    """The tokenized-data cache of every run in the suite (CLI subprocesses included) goes to a temporary folder."""
    import tempfile

    config._dflashtrain_cache = os.environ["DFLASHTRAIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="dflashtrain-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_dflashtrain_cache", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def random_target_dir(tmp_path_factory):
    """A random 4-layer Qwen3 with the embedded tiny tokenizer, saved like a Hub checkout."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from dflashtrain.assets import TINY_TARGET_DIR

    path = tmp_path_factory.mktemp("random_target")
    tokenizer = AutoTokenizer.from_pretrained(TINY_TARGET_DIR, local_files_only=True)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=((len(tokenizer) + 63) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_data(tmp_path):
    """A copy of a slice of the embedded training data (so tests never depend on its full size)."""
    from dflashtrain.assets import TINY_TRAIN_JSONL

    path = tmp_path / "train.jsonl"
    with open(TINY_TRAIN_JSONL) as source, open(path, "w") as target:
        for _, line in zip(range(64), source):
            target.write(line)
    return path


@pytest.fixture
def clean_dir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def write_count_up_chats(path, rows: int):
    """A small valid chat JSONL: `rows` count-up tasks of 21 numbers each. Returns the path."""
    import json

    lines = [
        {"messages": [{"role": "user", "content": f"Count up from {i} to {i + 20} ."},
                      {"role": "assistant", "content": " ".join(map(str, range(i, i + 21))) + " ."}]}
        for i in range(rows)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
