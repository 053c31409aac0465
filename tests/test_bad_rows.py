"""Bad data rows: with `data.on_bad_row=skip` each kind is dropped and counted by reason, with `error` the run stops
naming file:line; all of it during preprocessing, before the target is loaded. Over-length and too-short rows are
not bad rows: they are dropped and counted under both policies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.data.chat import ChatFormat
from dflashtrain.data.datamodule import BadRowError, ChatDataModule, DataSummary
from dflashtrain.data.formats import Chat
from dflashtrain.data.tokenized import tokenize_rows
from dflashtrain.models.target import load_tokenizer

TARGET = TINY_TARGET_DIR
CLI = [sys.executable, "-c", "from dflashtrain.cli import train; train()"]
MAX_LENGTH, BLOCK = 128, 8  # the tiny default: 2·B = 16 supervised tokens at least

COUNT = "Counting up from 1 to 30 : " + " ".join(map(str, range(1, 31))) + " ."  # 39 supervised tokens


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# (reason, the line's bytes). Each is wrong in exactly one way.
BAD_ROWS = [
    ("invalid UTF-8", b'{"messages": "\xff\xfe"}'),
    ("invalid JSON", b'{"messages": [{"role": "user", "content": "hi"}'),
    ("invalid JSON", b"[" * 100_000 + b"]" * 100_000),  # nested beyond the recursion limit
    ("not a JSON object", b"[1, 2, 3]"),
    ("missing messages", json.dumps({"conversation": [chat("Count .", COUNT)["messages"]]}).encode()),
    ("unknown role", json.dumps({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant",
                                                                                "content": COUNT}]}).encode()),
    ("non-text content", json.dumps({"messages": [{"role": "user", "content": 5},
                                                  {"role": "assistant", "content": COUNT}]}).encode()),
    ("no assistant turn", json.dumps({"messages": [{"role": "user", "content": "Count up from 1 to 30 ."}]}).encode()),
    ("empty assistant turn", json.dumps(chat("Count up from 1 to 30 .", "   ")).encode()),
    ("invalid text", b'{"messages": [{"role": "user", "content": "Count \\ud83d ."}, '  # a lone surrogate escape
                     b'{"role": "assistant", "content": "' + COUNT.encode() + b'"}]}'),
]
REASONS = sorted({reason for reason, _ in BAD_ROWS})
# Dropped and counted under both policies (docs/conventions.md): too little supervision, and over max_length:
# 201 tokens, cut to 128 the answer is gone (fewer than 2·B supervised tokens remain).
TOO_SHORT = ("fewer than 2B supervised tokens", json.dumps(chat("Count up from 1 to 2 .", "1 2 .")).encode())
OVER_LENGTH = ("over max_length", json.dumps(chat("Repeat : " + " ".join(["7"] * 150) + " .", COUNT)).encode())
TRUNCATED = json.dumps(chat("Count up from 1 to 200 .", " ".join(map(str, range(1, 201))))).encode()  # kept, cut
GOOD = [json.dumps(chat(f"Count up from {i} to {i + 29} .", COUNT)).encode() for i in range(14)]
BOM = b"\xef\xbb\xbf"


def write_rows(path: Path, bad: list) -> dict:
    """Good rows (the first one after a UTF-8 BOM) with each bad row after one of them, plus a blank line;
    -> {reason: the first line number}, and the line numbers of every bad or dropped row under `path.lines`."""
    lines, where = [], []
    rows = [*(("good", g) for g in GOOD[:4]), ("truncated", TRUNCATED), *(("good", g) for g in GOOD[4:])]
    extras = [*bad, TOO_SHORT, OVER_LENGTH]
    for i, (_, line) in enumerate(rows):
        lines.append(line)
        if i < len(extras):
            reason, bad_line = extras[i]
            lines.append(bad_line)
            where.append((reason, len(lines)))
    lines.insert(1, b"")  # a blank line is ignored, not a row
    lines[0] = BOM + lines[0]
    path.write_bytes(b"\n".join(lines) + b"\n")
    first = {}
    for reason, line in where:
        first.setdefault(reason, line + 1)
    return first


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TARGET))


def datamodule(tokenizer, path, policy) -> ChatDataModule:
    return ChatDataModule(tokenizer, str(path), MAX_LENGTH, 2 * BLOCK, batch_size=4, num_workers=0, shuffle=True,
                          on_bad_row=policy, pad_to_multiple_of=1, seed=0)


def test_skip_drops_and_counts_each_kind(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    where = write_rows(path, BAD_ROWS)
    data = datamodule(tokenizer, path, "skip")
    data.setup()
    summary = data.summary
    expected = Counter(reason for reason, _ in [*BAD_ROWS, TOO_SHORT, OVER_LENGTH])
    assert dict(summary.dropped) == dict(expected)
    assert summary.first_row == {reason: f"rows.jsonl:{line}" for reason, line in where.items()}
    assert summary.rows == len(GOOD) + 1 + sum(expected.values()) and summary.kept == len(GOOD) + 1
    assert summary.truncated == 1
    kept_lines = sorted(int(row.split(":")[1]) for row in data.train_set["row"])
    assert 1 in kept_lines  # the row after the byte-order mark is valid
    assert not set(kept_lines) & set(where.values())
    assert all(len(ids) <= MAX_LENGTH for ids in data.train_set["input_ids"])
    text = str(summary)
    assert f"{len(GOOD) + 1} kept (1 truncated to data.max_length={MAX_LENGTH})" in text
    for reason, line in where.items():
        assert f"{reason} {expected[reason]} (first at rows.jsonl:{line})" in text
    batch = next(iter(data.train_dataloader()))
    assert set(batch["sample_ids"]) <= set(data.train_set["row"])


@pytest.mark.parametrize("reason", REASONS)
def test_error_names_file_and_line(tokenizer, tmp_path, reason):
    path = tmp_path / "rows.jsonl"
    line = write_rows(path, [(r, b) for r, b in BAD_ROWS if r == reason][:1])[reason]
    with pytest.raises(BadRowError) as info:
        datamodule(tokenizer, path, "error").setup()
    message = str(info.value)
    assert message.startswith(f"rows.jsonl:{line}: {reason}: ") and "\n" not in message


def test_too_short_over_length_and_truncated_rows_are_not_errors(tokenizer, tmp_path):
    """Under `error` too: too little supervision, or over max_length, is dropped and counted; a long row that keeps
    enough supervision keeps its head."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([GOOD[0], TOO_SHORT[1], OVER_LENGTH[1], TRUNCATED]) + b"\n")
    data = datamodule(tokenizer, path, "error")
    data.setup()
    assert data.summary.kept == 2 and data.summary.truncated == 1
    assert dict(data.summary.dropped) == {"fewer than 2B supervised tokens": 1, "over max_length": 1}
    assert "over max_length 1 (first at rows.jsonl:3)" in str(data.summary)


def test_a_row_the_template_cannot_render(tokenizer, tmp_path):
    """A template that raises on one conversation makes that row bad; the others are tokenized as usual."""
    strict = load_tokenizer(str(TARGET))
    strict.chat_template = ("{%- if messages[0]['role'] == 'system' %}{{ raise_exception('no system message') }}"
                            "{%- endif %}" + strict.chat_template)
    plain = chat("Count .", COUNT)["messages"]
    rows = [{"row": "rows.jsonl:1", "chat": Chat(plain).to_json()},
            {"row": "rows.jsonl:2", "chat": Chat([{"role": "system", "content": "Be brief ."}, *plain]).to_json()}]
    summary = DataSummary(path="rows.jsonl", max_length=MAX_LENGTH)
    kept = tokenize_rows(rows, strict, ChatFormat(), MAX_LENGTH, 2 * BLOCK, "skip", summary)
    assert kept["row"] == ["rows.jsonl:1"] and dict(summary.dropped) == {"chat template error": 1}
    with pytest.raises(BadRowError, match=r"^rows.jsonl:2: chat template error: TemplateError: no system message"):
        tokenize_rows(rows, strict, ChatFormat(), MAX_LENGTH, 2 * BLOCK, "error", DataSummary("rows.jsonl", MAX_LENGTH))


def test_no_usable_row_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(BAD_ROWS[1][1] + b"\n" + TOO_SHORT[1] + b"\n")
    with pytest.raises(BadRowError, match="no usable rows"):
        datamodule(tokenizer, path, "skip").setup()


# ---------------------------------------------------------------------------------------- through the CLI
def run_cli(tmp_path: Path, data: Path, policy: str):
    out = tmp_path / f"out_{policy}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    overrides = [f"model.target.path={TARGET}", f"data.path={data}", f"data.on_bad_row={policy}",
                 f"paths.output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}", "trainer.max_steps=2",
                 "data.batch_size=4", "logger=none", "eval.every_n_steps=0", "trainer.enable_progress_bar=false"]
    result = subprocess.run([*CLI, *overrides], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    return result, out


def test_cli_skip_trains_and_reports_counts(tmp_path):
    data = tmp_path / "rows.jsonl"
    where = write_rows(data, BAD_ROWS)
    result, out = run_cli(tmp_path, data, "skip")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    summaries = [line for line in output.splitlines() if f"data {data}:" in line]
    assert len(summaries) == 1, output[-3000:]
    for reason, line in where.items():
        assert f"(first at rows.jsonl:{line})" in summaries[0]
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_cli_error_names_the_line_before_loading_the_target(tmp_path):
    data = tmp_path / "rows.jsonl"
    where = write_rows(data, BAD_ROWS)
    first_reason, first_line = min(where.items(), key=lambda item: item[1])
    result, out = run_cli(tmp_path, data, "error")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dflashtrain: error: rows.jsonl:{first_line}: {first_reason}: ")
    assert "Loading weights" not in result.stdout + result.stderr  # failed before the target was loaded
    assert not list(out.rglob("*.ckpt"))
