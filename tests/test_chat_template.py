"""Golden loss masks with a Qwen3-style template that has thinking blocks (tests/chat_fixtures.py): for every
template control (data.chat_template_kwargs, a template file, the system-prompt policy) the supervised spans are
exactly what the target generates after its generation prompt."""

from __future__ import annotations

import json

import pytest
from chat_fixtures import PLAIN_CHATML, QWEN3_STYLE, byte_tokenizer, supervised_spans
from omegaconf import OmegaConf

from dflashtrain.data.chat import ChatFormat, tokenize_chat
from dflashtrain.data.formats import Chat, apply_system_policy, to_chat
from dflashtrain.data.tokenized import encode

SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2", "reasoning_content": "R2"}]
EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def spans(tokenizer, messages, **kwargs):
    out = tokenize_chat(tokenizer, to_chat({"messages": messages}, "messages"), ChatFormat(template_kwargs=kwargs))
    return tokenizer.decode(out["input_ids"]), supervised_spans(tokenizer, out["input_ids"], out["loss_mask"])


def test_thinking_on_supervises_the_final_think_block_and_drops_historical_reasoning(tokenizer):
    text, supervised = spans(tokenizer, TWO_TURNS)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n")
    assert supervised == [f"A1{EOT}", f"<think>\nR2\n</think>\n\nA2{EOT}"]


def test_an_answer_without_reasoning_still_generates_the_empty_think_block(tokenizer):
    _, supervised = spans(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}])
    assert supervised == [f"<think>\n\n</think>\n\nA{EOT}"]


def test_thinking_off_leaves_the_prompted_empty_think_block_unsupervised(tokenizer):
    """enable_thinking=false: the generation prompt ends with an empty think block; earlier turns have none."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]
    text, supervised = spans(tokenizer, messages, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n")
    assert supervised == [f"A1{EOT}", f"A2{EOT}"]


def test_tool_calls_are_rendered_and_supervised_even_when_history_is_re_rendered(tokenizer):
    """Reasoning after the last user turn is shown while the agent works and dropped once a new user turn comes:
    the prompts of the later turns no longer prefix the whole rendering, and their spans are still found."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "need a tool",
         "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "got it"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "Welcome."},
    ]
    text, supervised = spans(tokenizer, messages)
    assert "need a tool" not in text and "got it" not in text
    assert supervised == ['<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call>' + EOT,
                          f"It is sunny.{EOT}", f"<think>\n\n</think>\n\nWelcome.{EOT}"]


def test_row_tools_render_as_a_system_block(tokenizer):
    tools = [{"type": "function", "function": {"name": "get"}}]
    chat = to_chat({"messages": TWO_TURNS[1:3], "tools": tools}, "messages")
    out = tokenize_chat(tokenizer, chat, ChatFormat())
    text = tokenizer.decode(out["input_ids"])
    assert text.startswith('<|im_start|>system\n# Tools\n<tools>\n{"type": "function", "function": {"name": "get"}}')
    assert supervised_spans(tokenizer, out["input_ids"], out["loss_mask"]) == [f"<think>\nR1\n</think>\n\nA1{EOT}"]


@pytest.mark.parametrize("policy, prompt, first", [
    ("keep", None, "<|im_start|>system\nBe brief.<|im_end|>\n"),
    ("drop", None, "<|im_start|>user\nhi"),
    ("default", "Think step by step.", "<|im_start|>system\nBe brief.<|im_end|>\n"),
    ("replace", "Think step by step.", "<|im_start|>system\nThink step by step.<|im_end|>\n"),
])
def test_system_prompt_policy(tokenizer, policy, prompt, first):
    chat = apply_system_policy(to_chat({"messages": TWO_TURNS}, "messages"), policy, prompt)
    out = tokenize_chat(tokenizer, chat, ChatFormat())
    assert tokenizer.decode(out["input_ids"]).startswith(first)
    assert supervised_spans(tokenizer, out["input_ids"], out["loss_mask"]) == [
        f"A1{EOT}", f"<think>\nR2\n</think>\n\nA2{EOT}"]
    without = apply_system_policy(to_chat({"messages": TWO_TURNS[1:]}, "messages"), policy, prompt)
    if policy == "default":
        assert without.messages[0] == {"role": "system", "content": prompt}


def test_a_template_file_replaces_the_tokenizers(tmp_path):
    """data.chat_template: the tokenizer ships plain ChatML; the file's Qwen3-style template is used instead."""
    tokenizer = byte_tokenizer(PLAIN_CHATML)
    path = tmp_path / "qwen3_style.jinja"
    path.write_text(QWEN3_STYLE)
    data = OmegaConf.create({"format": "auto", "chat_template": str(path), "chat_template_kwargs": {},
                             "system_prompt_policy": "keep", "system_prompt": None})
    fmt = ChatFormat.from_config(data)
    chat = to_chat({"messages": TWO_TURNS}, "messages")
    out = tokenize_chat(tokenizer, chat, fmt)
    assert supervised_spans(tokenizer, out["input_ids"], out["loss_mask"]) == [
        f"A1{EOT}", f"<think>\nR2\n</think>\n\nA2{EOT}"]
    plain = tokenize_chat(tokenizer, chat, ChatFormat())  # the tokenizer's own: content as it is
    assert supervised_spans(tokenizer, plain["input_ids"], plain["loss_mask"]) == [
        f"<think>\nR1\n</think>\n\nA1{EOT}", f"A2{EOT}"]


def test_a_turn_that_cannot_be_located_is_a_template_error(tokenizer):
    """Thinking off and reasoning re-rendered in the history: neither the prompt nor the generation prompt is found.
    The row is a bad row ("chat template error"), never a silently wrong mask."""
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "reasoning_content": "r",
                 "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "t"}, {"role": "assistant", "content": "done", "reasoning_content": "s"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]
    chat = Chat(to_chat({"messages": messages}, "messages").messages)
    out = encode(chat.to_json(), tokenizer, ChatFormat(template_kwargs={"enable_thinking": False}), 512, 2)
    assert out["problem"] == "chat template error" and "cannot be located in the rendered conversation" in out["detail"]


def test_template_kwargs_reach_the_template_through_the_config(tmp_path):
    data = OmegaConf.create({"format": "auto", "chat_template": None,
                             "chat_template_kwargs": {"enable_thinking": False}, "system_prompt_policy": "keep",
                             "system_prompt": None})
    assert ChatFormat.from_config(data).template_kwargs == {"enable_thinking": False}
    assert json.loads(Chat([{"role": "user", "content": "x"}]).to_json())["messages"][0]["content"] == "x"
