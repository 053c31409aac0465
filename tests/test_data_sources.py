"""Data sources and row formats: every file type and row shape a user has, written by the test, read into the same
tokenized rows; several files name their rows file:N with unique row keys; unusable shapes are file:N reports."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.data import sources
from dflashtrain.data.chat import ChatFormat
from dflashtrain.data.datamodule import ChatDataModule
from dflashtrain.data.formats import Chat, to_chat
from dflashtrain.data.rows import BadRowError
from dflashtrain.data.tokenized import DataSummary, read_chats
from dflashtrain.models.target import load_tokenizer

COUNT = "Counting up from 1 to 30 : " + " ".join(map(str, range(1, 31))) + " ."


def messages_row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Count up from {i} to {i + 29} ."},
                         {"role": "assistant", "content": COUNT}]}


def sharegpt_row(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"Count up from {i} to {i + 29} ."},
                              {"from": "gpt", "value": COUNT}]}


ROWS = [messages_row(i) for i in range(6)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TINY_TARGET_DIR))


def tokenized(tokenizer, path, **format_options):
    data = ChatDataModule(tokenizer, path, 128, 16, batch_size=4, num_workers=0, shuffle=False, on_bad_row="error",
                          pad_to_multiple_of=1, seed=0, chat_format=ChatFormat(**format_options))
    data.setup()
    return data


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """input_ids of ROWS read from plain JSONL: what every other source must give."""
    path = write_jsonl(tmp_path_factory.mktemp("ref") / "rows.jsonl", ROWS)
    return tokenized(tokenizer, str(path)).train_set["input_ids"]


def test_every_file_type_reads_the_same_rows(tokenizer, reference, tmp_path):
    write_jsonl(tmp_path / "a.jsonl.gz", ROWS, gzip.open)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))  # one JSON array (a ShareGPT-style dump)
    write_jsonl(tmp_path / "c.json", ROWS)  # JSON lines named .json
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("a.jsonl.gz", "b.json", "c.json", "d.parquet", "saved", "saved_dict"):
        assert tokenized(tokenizer, str(tmp_path / name)).train_set["input_ids"] == reference, name


def test_sharegpt_and_content_parts_read_like_messages(tokenizer, reference, tmp_path):
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt_row(i) for i in range(6)])
    assert tokenized(tokenizer, str(sharegpt)).train_set["input_ids"] == reference  # detected
    assert tokenized(tokenizer, str(sharegpt), row_format="sharegpt").train_set["input_ids"] == reference
    parts = [{"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"][:5]},
                                                           {"type": "text", "text": m["content"][5:]}]}
                           for m in row["messages"]]} for row in ROWS]
    assert tokenized(tokenizer, str(write_jsonl(tmp_path / "parts.jsonl", parts))).train_set["input_ids"] == reference


def test_a_format_set_by_data_format_reports_rows_of_the_other(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt_row(0)])
    with pytest.raises(BadRowError, match=r"^sharegpt.jsonl:1: missing messages: no non-empty `messages` list \(it has "
                                          r"`conversations`"):
        tokenized(tokenizer, str(path), row_format="messages")


def test_several_files_a_glob_a_directory_and_a_list(tokenizer, tmp_path):
    (tmp_path / "part1").mkdir()
    (tmp_path / "part2").mkdir()
    write_jsonl(tmp_path / "part1" / "train.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "part2" / "train.jsonl", [sharegpt_row(i) for i in range(3, 6)])  # another format
    (tmp_path / "part2" / "notes.txt").write_text("not data")
    by_glob = tokenized(tokenizer, str(tmp_path / "part*" / "*.jsonl"))
    by_dir = tokenized(tokenizer, str(tmp_path))
    by_list = tokenized(tokenizer, [str(tmp_path / "part1" / "train.jsonl"), str(tmp_path / "part2")])
    for data in (by_glob, by_dir, by_list):
        assert data.train_set["row"] == [f"part1/train.jsonl:{n}" for n in (1, 2, 3)] + [
            f"part2/train.jsonl:{n}" for n in (1, 2, 3)]
    batch = next(iter(by_glob.train_dataloader()))
    assert batch["sample_ids"] == ["part1/train.jsonl:1", "part1/train.jsonl:2", "part1/train.jsonl:3",
                                   "part2/train.jsonl:1"]
    assert batch["row_keys"] == [0, 1, 2, 3]
    assert sorted(by_glob.train_set["index"]) == list(range(6))  # unique row keys across files


@pytest.mark.parametrize("spec, message", [
    ("missing.jsonl", "file not found: missing.jsonl"),
    ("*.nothing", "no file matches '*.nothing'"),
    ("rows.csv", "rows.csv: unsupported file type"),
    ("empty_dir", "is a directory without data files"),
])
def test_unreadable_paths_are_named(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text("a,b\n")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(sources.SourceError, match=message.replace("*", r"\*")):
        sources.resolve(spec)


def test_a_damaged_file_is_one_line_naming_it(tmp_path):
    good = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS))
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    for name in ("cut.jsonl.gz", "bad.parquet"):
        with pytest.raises(BadRowError, match=rf"^{name}: cannot be read as (jsonl|parquet): ") as info:
            read_chats(sources.resolve(str(tmp_path / name)), ChatFormat(), "skip", DataSummary(name, 128))
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ shapes
TOOL_CALL = {"type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "ok"}]}, "non-text content"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}, {"role": "assistant", "content": "ok"}]},
     "non-text content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                       "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "bad tool call"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [TOOL_CALL]},
                   {"role": "assistant", "content": "ok"}]}, "bad tool call"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "tools": "{bad"},
     "bad tools"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown role"),
    ({"messages": ["hi"]}, "bad message"),
])
def test_unusable_shapes_have_a_reason(row, reason):
    problem = to_chat(row, "sharegpt" if "conversations" in row else "messages")
    assert problem.reason == reason, problem


def test_tool_calls_and_parquet_nulls_become_template_messages():
    """An assistant turn with only tool calls is an answer; null fields (parquet fills absent ones) are dropped."""
    row = {"messages": [{"role": "user", "content": "find x", "tool_calls": None, "reasoning_content": None},
                        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL], "reasoning_content": None},
                        {"role": "tool", "content": "x is 1", "tool_call_id": "c1"},
                        {"role": "assistant", "content": "It is 1."}],
           "tools": json.dumps([{"type": "function", "function": {"name": "lookup"}}])}
    chat = to_chat(row, "messages")
    assert isinstance(chat, Chat)
    assert chat.messages[0] == {"role": "user", "content": "find x"}
    assert chat.messages[1] == {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}
    assert chat.messages[2]["tool_call_id"] == "c1"
    assert chat.tools == [{"type": "function", "function": {"name": "lookup"}}]


def test_sharegpt_roles_and_system_field():
    chat = to_chat({"system": "Be brief .", "conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "observation", "value": "c"},
        {"from": "chatgpt", "value": "d"}]}, "sharegpt")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert chat.messages[0]["content"] == "Be brief ."


def test_a_dataset_dict_without_train_is_named(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(BadRowError, match=r"^saved: a DatasetDict without a 'train' split \(splits: test\)"):
        read_chats(sources.resolve(str(tmp_path / "saved")), ChatFormat(), "error", DataSummary("saved", 128))


def test_the_readme_data_examples_compose():
    """The README's data commands are valid overrides of the train and regen configs."""
    from hydra import compose, initialize_config_module

    from dflashtrain.config.schema import register_configs

    register_configs()
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("train", overrides=[
            "data=chat_jsonl", "data.path=[/data/ultrachat/*.parquet,/data/sharegpt.json]",
            "+data.chat_template_kwargs.enable_thinking=false", "data.chat_template=qwen3_thinking.jinja",
            "data.system_prompt_policy=default", "data.system_prompt=You are a helpful assistant."])
        assert list(cfg.data.path) == ["/data/ultrachat/*.parquet", "/data/sharegpt.json"]
        assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
        assert cfg.data.system_prompt == "You are a helpful assistant."
        regen = compose("regen", overrides=[
            "model.target.path=/models/Qwen3-8B", "model.target.dtype=bfloat16", "data=chat_jsonl",
            "data.path=data/ultrachat/data/train_sft-*.parquet", "output_dir=data/ultrachat-qwen3",
            "temperature=0.6", "top_p=0.95", "top_k=20", "thinking=true", "max_new_tokens=2048", "batch_size=64"])
        assert regen.thinking is True and regen.top_k == 20
        cached = compose("train", overrides=["model=qwen3_8b", "model.target.path=/models/Qwen3-8B", "data=cached",
                                             "data.path=data/ultrachat-qwen3-features"])
        assert cached.data.kind.value == "features" and cached.data.eval_path is None


@pytest.mark.parametrize("overrides, key, message", [
    (["data.path=nowhere/*.jsonl"], "data.path", "no file matches"),
    (["data.chat_template=missing.jinja"], "data.chat_template", "file not found"),
    (["+data.chat_template_kwargs.add_generation_prompt=true"], "data.chat_template_kwargs.add_generation_prompt",
     "dflashtrain sets itself"),
    (["data.system_prompt_policy=replace"], "data.system_prompt", "is required by"),
    (["data.system_prompt=Hi"], "data.system_prompt", "ignores it"),
    (["data.num_proc=0"], "data.num_proc", ">= 1"),
    (["data.kind=features"], "data.path", "needs the directory dflashtrain-cache wrote"),
])
def test_data_settings_are_checked_before_anything_loads(tmp_path, overrides, key, message):
    from hydra import compose, initialize_config_module

    from dflashtrain.config.checks import validate_data
    from dflashtrain.config.errors import ConfigError
    from dflashtrain.config.schema import register_configs

    register_configs()
    write_jsonl(tmp_path / "rows.jsonl", ROWS[:1])
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("train", overrides=[f"data.path={tmp_path / 'rows.jsonl'}", *overrides])
    with pytest.raises(ConfigError, match=message) as info:
        validate_data(cfg.data, 8)
    assert info.value.key == key


def test_a_tokenizer_without_a_chat_template_is_one_line(tmp_path):
    from dflashtrain.config.errors import ConfigError

    base = load_tokenizer(str(TINY_TARGET_DIR))
    base.chat_template = None
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:1])
    with pytest.raises(ConfigError, match="^data.chat_template: the tokenizer has no chat template"):
        tokenized(base, str(path))
