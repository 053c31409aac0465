"""dflashtrain-regen on the tiny target: batched generation equals one conversation at a time, every assistant turn is
replayed on the regenerated history, the output is training data with a manifest, and an interrupted run resumes to
exactly the uninterrupted output."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import register_configs
from dflashtrain.data.chat import ChatFormat, render
from dflashtrain.data.datamodule import ChatDataModule
from dflashtrain.data.formats import Chat
from dflashtrain.data.rows import BadRowError
from dflashtrain.inference import regen
from dflashtrain.models.target import load_tokenizer

register_configs()
USER = [{"role": "user", "content": "Count up from 3 to 9 ."}]
TWO_TURNS = [*USER, {"role": "assistant", "content": "wrong"}, {"role": "user", "content": "Sort : 5 2 9 ."},
             {"role": "assistant", "content": "wrong again"}]


def compose_regen(*overrides):
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("regen", overrides=list(overrides))


def write_rows(path, count):
    rows = [{"messages": [{"role": "user", "content": f"Count up from {i} to {i + 6} ."},
                          {"role": "assistant", "content": "?"}]} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def regenerator():
    cfg = compose_regen("output_dir=unused", "batch_size=4")
    return regen.load_generator(cfg, regen.chat_format(cfg))


def test_batched_regeneration_equals_one_at_a_time(regenerator):
    chats = [Chat(USER), Chat(TWO_TURNS), Chat(TWO_TURNS[:3])]
    together, stats = regenerator.regenerate(chats)
    alone = [regenerator.regenerate([chat])[0][0] for chat in chats]
    assert [c.messages for c in together] == [c.messages for c in alone]
    assert stats == {"turns": 5, "truncated_turns": 0, "cut_at_max_length": 0}
    first, two_turns, ends_on_user = together
    assert first.messages[-1]["content"].startswith("Counting up from 3 to 9 : 3 4 5 6 7 8 9")
    assert [m["role"] for m in ends_on_user.messages] == ["user", "assistant", "user", "assistant"]  # one answer more
    # turn 2 was generated on the regenerated turn 1, not on the original "wrong"
    assert "wrong" not in json.dumps(two_turns.messages)
    tokenizer = regenerator.tokenizer
    prompt = render(tokenizer, ChatFormat(), two_turns, two_turns.messages[:3], add_generation_prompt=True)
    expected, _ = regenerator.generate([list(prompt["input_ids"])])[0]
    assert two_turns.messages[3]["content"] == expected


def test_a_prompt_over_max_length_ends_the_conversation(regenerator):
    regenerator.max_length, original = 24, regenerator.max_length
    try:
        (chat,), stats = regenerator.regenerate([Chat(TWO_TURNS)])
    finally:
        regenerator.max_length = original
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] and stats["cut_at_max_length"] == 1


def run_app(tmp_path, data, out, *overrides):
    return regen.run(compose_regen(f"data.path={data}", f"output_dir={out}", "rows_per_shard=4", "batch_size=4",
                                   *overrides))


def test_the_output_is_training_data_with_a_manifest(tmp_path):
    data = write_rows(tmp_path / "prompts.jsonl", 10)
    manifest = run_app(tmp_path, data, tmp_path / "out")
    assert manifest["complete"] and sorted(manifest["shards"]) == [f"part-0000{i}.jsonl" for i in range(3)]
    assert manifest["target"]["path"] == str(TINY_TARGET_DIR) and manifest["settings"]["temperature"] == 0.0
    assert manifest["read"]["rows"] == 10 and sum(s["written"] for s in manifest["shards"].values()) == 10
    rows = [json.loads(line) for i in range(3) for line in (tmp_path / "out" / f"part-0000{i}.jsonl").open()]
    assert [row["source"] for row in rows] == [f"prompts.jsonl:{n}" for n in range(1, 11)]
    assert rows[0]["messages"][1]["content"].startswith("Counting up from 0 to 6 :")
    tokenizer = load_tokenizer(str(TINY_TARGET_DIR))
    training = ChatDataModule(tokenizer, str(tmp_path / "out"), 128, 16, 4, 0, False, "error", 16, 0)
    training.setup()  # the directory's shards (manifest.json is not data)
    assert training.summary.rows == 10 and training.summary.kept == 10


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    data = write_rows(tmp_path / "prompts.jsonl", 10)
    run_app(tmp_path, data, tmp_path / "whole", "temperature=1.5", "seed=3")
    calls = []
    original = regen.Regenerator.regenerate

    def interrupted(self, chats):
        calls.append(len(chats))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job was killed in the second shard
        return original(self, chats)

    monkeypatch.setattr(regen.Regenerator, "regenerate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_app(tmp_path, data, tmp_path / "resumed", "temperature=1.5", "seed=3")
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["part-00000.jsonl"] and not manifest["complete"]
    calls.clear()
    monkeypatch.setattr(regen.Regenerator, "regenerate", lambda self, chats: calls.append(0) or original(self, chats))
    assert run_app(tmp_path, data, tmp_path / "resumed", "temperature=1.5", "seed=3")["complete"]
    assert len(calls) == 2  # shards 2 and 3 only
    for name in ("part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "whole" / name).read_text()
    greedy = run_app(tmp_path, data, tmp_path / "greedy")
    assert greedy["complete"] and (tmp_path / "greedy" / "part-00000.jsonl").read_text() != (
        tmp_path / "whole" / "part-00000.jsonl").read_text()  # T = 1.5 sampled something else
    assert run_app(tmp_path, data, tmp_path / "resumed", "temperature=1.5", "seed=3")["complete"]  # nothing to do


def test_other_settings_in_the_same_output_dir_are_refused(tmp_path):
    data = write_rows(tmp_path / "prompts.jsonl", 2)
    run_app(tmp_path, data, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^output_dir: .* other settings \(settings.temperature: 0.0 there, 0.7 "
                                          r"now\)"):
        run_app(tmp_path, data, tmp_path / "out", "temperature=0.7")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a dflashtrain-regen output"):
        run_app(tmp_path, data, tmp_path / "foreign")


def test_settings_are_checked_before_the_target_loads(tmp_path):
    data = write_rows(tmp_path / "prompts.jsonl", 2)
    for override, key in (("temperature=-1", "temperature"), ("top_p=0", "top_p"), ("max_new_tokens=0",
                                                                                      "max_new_tokens"),
                          ("+data.chat_template_kwargs.enable_thinking=true", "thinking")):
        with pytest.raises(ConfigError) as info:
            run_app(tmp_path, data, tmp_path / "x", override, *(["thinking=false"] if key == "thinking" else []))
        assert info.value.key == key
    cfg = compose_regen(f"data.path={data}", "output_dir=x", "thinking=false")
    assert regen.chat_format(cfg).template_kwargs == {"enable_thinking": False}
    with open(data, "a") as handle:
        handle.write("{broken\n")
    with pytest.raises(BadRowError, match=r"^prompts.jsonl:3: invalid JSON"):
        run_app(tmp_path, data, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_generation_is_greedy_without_temperature(regenerator):
    assert regenerator.generation.do_sample is False
    torch.manual_seed(0)
    a = regenerator.regenerate([Chat(USER)])[0][0].messages
    torch.manual_seed(1)
    assert regenerator.regenerate([Chat(USER)])[0][0].messages == a
