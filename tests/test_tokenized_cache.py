"""Tokenize once: the next run and every other process load the cache instead of tokenizing; anything that changes
the tokens changes the key; cached bad rows still stop an `on_bad_row=error` run; one process builds, others wait."""

from __future__ import annotations

import json
import os
import threading

import pytest
from conftest import write_count_up_chats

from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.data import sources, tokenized
from dflashtrain.data.chat import ChatFormat
from dflashtrain.data.rows import BadRowError
from dflashtrain.data.tokenized import DataSummary, load_or_tokenize
from dflashtrain.models.target import load_tokenizer

MAX_LENGTH, MIN_SUPERVISED = 128, 16


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TINY_TARGET_DIR))


def load(path, tokenizer, cache_dir, policy="error", fmt=ChatFormat(), max_length=MAX_LENGTH, num_proc=1):
    summary = DataSummary(path=str(path), max_length=max_length)
    rows, summary = load_or_tokenize(sources.resolve(str(path)), tokenizer, fmt, max_length, MIN_SUPERVISED, policy,
                                     summary, str(cache_dir), num_proc)
    return rows, summary


def entries(cache_dir):
    return sorted(p.name for p in (cache_dir / "tokenized").iterdir() if p.is_dir())


def test_the_second_run_loads_the_cache(tokenizer, tmp_path, monkeypatch):
    data = write_count_up_chats(tmp_path / "train.jsonl", 12)
    first, summary = load(data, tokenizer, tmp_path / "cache")
    assert summary.cache.startswith("tokenized, cached in") and summary.kept == 12

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenized, "encode", no_tokenizing)
    again, cached = load(data, tokenizer, tmp_path / "cache")
    assert cached.cache.startswith("loaded from the tokenized cache")
    assert again["input_ids"] == first["input_ids"] and again["row"] == first["row"]
    assert str(cached).split(" [")[0] == str(summary).split(" [")[0]  # the same summary, printed again


def test_what_changes_the_tokens_changes_the_key(tokenizer, tmp_path):
    data = write_count_up_chats(tmp_path / "train.jsonl", 4)
    cache = tmp_path / "cache"
    load(data, tokenizer, cache)
    load(data, tokenizer, cache, max_length=96)
    load(data, tokenizer, cache, fmt=ChatFormat(system_prompt_policy="replace", system_prompt="Be brief ."))
    load(data, tokenizer, cache, fmt=ChatFormat(template_kwargs={"enable_thinking": False}))
    other = load_tokenizer(str(TINY_TARGET_DIR))
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    load(data, tokenizer=other, cache_dir=cache)
    stat = os.stat(data)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was edited
    load(data, tokenizer, cache)
    assert len(entries(cache)) == 6
    load(data, tokenizer, cache)  # nothing changed since the last one
    assert len(entries(cache)) == 6


def test_cached_bad_rows_still_stop_an_error_run(tokenizer, tmp_path):
    data = write_count_up_chats(tmp_path / "train.jsonl", 4)
    with open(data, "a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    _, summary = load(data, tokenizer, tmp_path / "cache", policy="skip")
    assert dict(summary.dropped) == {"invalid JSON": 1, "no assistant turn": 1}
    with pytest.raises(BadRowError, match=r"^train.jsonl:5: invalid JSON: "):
        load(data, tokenizer, tmp_path / "cache", policy="error")
    _, again = load(data, tokenizer, tmp_path / "cache", policy="skip")
    assert again.first_row == {"invalid JSON": "train.jsonl:5", "no assistant turn": "train.jsonl:6"}


def test_concurrent_processes_tokenize_once(tokenizer, tmp_path, monkeypatch):
    """Two loaders at once (as two ranks start): one tokenizes under the lock, the other waits and loads its result."""
    data = write_count_up_chats(tmp_path / "train.jsonl", 40)
    calls, started = [], threading.Event()
    original = tokenized.encode

    def slow_encode(*args, **kwargs):
        calls.append(threading.get_ident())
        started.set()
        threading.Event().wait(0.01)
        return original(*args, **kwargs)

    monkeypatch.setattr(tokenized, "encode", slow_encode)
    results = {}

    def rank(name):
        results[name] = load(data, tokenizer, tmp_path / "cache")

    first = threading.Thread(target=rank, args=("first",))
    first.start()
    assert started.wait(60)  # the first loader is tokenizing (and holds the lock)
    second = threading.Thread(target=rank, args=("second",))
    second.start()
    first.join(120)
    second.join(120)
    assert len(calls) == 40 and len(set(calls)) == 1
    assert results["first"][1].cache.startswith("tokenized")
    assert results["second"][1].cache.startswith("loaded from the tokenized cache")
    assert results["first"][0]["input_ids"] == results["second"][0]["input_ids"]


def test_several_processes_give_the_same_rows(tokenizer, tmp_path):
    data = write_count_up_chats(tmp_path / "train.jsonl", 24)
    one, _ = load(data, tokenizer, tmp_path / "a", num_proc=1)
    two, _ = load(data, tokenizer, tmp_path / "b", num_proc=2)
    assert one["input_ids"] == two["input_ids"] and one["row"] == two["row"]


def test_an_unwritable_cache_only_costs_the_cache(tokenizer, tmp_path):
    data = write_count_up_chats(tmp_path / "train.jsonl", 4)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    rows, summary = load(data, tokenizer, blocked)
    assert len(rows) == 4 and summary.cache == "not cached"


def test_a_damaged_cache_entry_is_rebuilt(tokenizer, tmp_path):
    data = write_count_up_chats(tmp_path / "train.jsonl", 4)
    load(data, tokenizer, tmp_path / "cache")
    (entry,) = entries(tmp_path / "cache")
    for arrow in (tmp_path / "cache" / "tokenized" / entry / "rows").glob("*.arrow"):
        arrow.write_bytes(b"damaged")
    rows, summary = load(data, tokenizer, tmp_path / "cache")
    assert len(rows) == 4 and summary.cache.startswith("tokenized, cached in")
