"""Data preprocessing: tokenizing 10k conversations, and loading them back from the tokenized cache; the feature
cache's size per token against its estimate. All in one run, on the tiny default's tokenizer and target.

    python bench/bench_data.py [--rows 10000] [--feature-rows 256] [--threads 1]

* tokenize: ``data.cache_dir`` cold (read, check, tokenize, save) against warm (load), for the tiny template (with
  ``{% generation %}`` markers: one rendering per row) and the same template without markers (turn spans located by
  rendering each turn's prompt), with 1 and 2 processes;
* features: ``dflashtrain-cache`` on the first rows, bytes on disk against the printed estimate.
Times are medians of ``--repeats`` runs, each in a fresh cache directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def conversations(path: Path, rows: int) -> Path:
    from dflashtrain.assets import TINY_TRAIN_JSONL

    lines = open(TINY_TRAIN_JSONL).read().splitlines()
    path.write_text("".join(line + "\n" for line in itertools.islice(itertools.cycle(lines), rows)))
    return path


def time_tokenize(data: Path, tokenizer, num_proc: int, repeats: int):
    """(cold seconds, warm seconds), medians over fresh caches."""
    from datasets.utils.logging import disable_progress_bar

    from dflashtrain.data import sources
    from dflashtrain.data.chat import ChatFormat
    from dflashtrain.data.tokenized import DataSummary, load_or_tokenize

    disable_progress_bar()
    cold, warm = [], []
    for _ in range(repeats):
        cache = tempfile.mkdtemp(prefix="bench-data-")
        for times in (cold, warm):
            start = time.perf_counter()
            rows, summary = load_or_tokenize(sources.resolve(str(data)), tokenizer, ChatFormat(), 128, 16, "error",
                                             DataSummary(str(data), 128), cache, num_proc)
            assert len(rows) > 0
            times.append(time.perf_counter() - start)
        shutil.rmtree(cache)
    return statistics.median(cold), statistics.median(warm)


def feature_size(data: Path, rows: int, out: Path):
    from hydra import compose, initialize_config_module

    from dflashtrain.config.schema import register_configs
    from dflashtrain.train.cache import run

    small = conversations(data.with_name("features.jsonl"), rows)
    register_configs()
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("cache", overrides=["paths.output_dir=unused", f"data.path={small}", "data.cache_dir=null",
                                          f"cache.output_dir={out}"])
    manifest = run(cfg)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--feature-rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dflashtrain.assets import TINY_TARGET_DIR
    from dflashtrain.models.target import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = conversations(work / "chats.jsonl", args.rows)
    marked = load_tokenizer(str(TINY_TARGET_DIR))
    unmarked = load_tokenizer(str(TINY_TARGET_DIR))
    unmarked.chat_template = unmarked.chat_template.replace("{%- generation %}", "").replace(
        "{%- endgeneration %}", "")
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; {args.rows} conversations; medians of {args.repeats}")
    print(f"{'template':<26}{'processes':>10}{'tokenize s':>12}{'cached s':>10}{'per 10k':>14}{'cached/tokenize':>17}")
    for name, tokenizer in (("generation markers", marked), ("turn spans (no markers)", unmarked)):
        for num_proc in (1, 2):
            cold, warm = time_tokenize(data, tokenizer, num_proc, args.repeats)
            per_10k = f"{cold * 1e4 / args.rows:.1f} / {warm * 1e4 / args.rows:.2f}"
            print(f"{name:<26}{num_proc:>10}{cold:>12.2f}{warm:>10.3f}{per_10k:>14}{warm / cold:>17.4f}")
    manifest = feature_size(data, args.feature_rows, work / "features")
    print(f"feature cache: {manifest['rows']} rows, {manifest['tokens']} tokens, {manifest['bytes']} B on disk, "
          f"estimate {manifest['bytes_estimate']} B: {manifest['bytes'] / manifest['bytes_estimate']:.4f} x the "
          f"estimate, {manifest['bytes'] / manifest['tokens']:.1f} B per token (estimate "
          f"{manifest['bytes_estimate'] / manifest['tokens']:.1f})")
    print(json.dumps({k: manifest[k] for k in ("layer_ids", "hidden_size", "feature_dtypes")}))
    shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
