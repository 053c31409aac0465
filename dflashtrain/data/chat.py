"""A chat -> ``input_ids`` and ``loss_mask`` through the target's chat template (docs/conventions.md, loss mask).

The conversation is rendered once, as a whole. ``loss_mask`` is 1 on what each assistant turn generates: from the end
of its generation prompt through the end-of-turn token that closes it.

* Templates that mark assistant spans with ``{% generation %}`` give the mask directly.
* Otherwise turn i starts where the whole rendering departs from the rendering of ``messages[:i]`` with the generation
  prompt: at the prompt's end, or inside the generation prompt when the template opens a turn differently in the
  history (a Qwen3-style template with ``enable_thinking=false`` opens the generation with an empty think block that
  earlier turns do not carry). When the rendering departs earlier, inside the history (a template that re-renders
  earlier turns, e.g. drops their reasoning), the turn starts after the next occurrence of the generation prompt. It
  ends at its first end-of-turn token.

The template is the tokenizer's, or ``data.chat_template`` (a Jinja file); ``data.chat_template_kwargs`` (e.g.
``enable_thinking``) reach the template as variables.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from dflashtrain.data.formats import Chat

GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")  # end-of-turn tokens of common chat templates


@dataclass(frozen=True)
class ChatFormat:
    """How rows become conversations and conversations become tokens (the ``data.*`` formatting keys)."""

    row_format: str = "auto"  # auto | messages | sharegpt
    template: Optional[str] = None  # template text replacing the tokenizer's; None: the tokenizer's
    template_kwargs: Dict[str, Any] = field(default_factory=dict)
    system_prompt_policy: str = "keep"  # keep | drop | default | replace
    system_prompt: Optional[str] = None

    @staticmethod
    def from_config(data) -> "ChatFormat":
        """From a DataConfig node: the template file is read here."""
        from omegaconf import OmegaConf

        template = Path(data.chat_template).read_text(encoding="utf-8") if data.chat_template else None
        kwargs = OmegaConf.to_container(data.chat_template_kwargs) if OmegaConf.is_config(
            data.chat_template_kwargs) else dict(data.chat_template_kwargs)
        return ChatFormat(row_format=str(getattr(data.format, "value", data.format)), template=template,
                          template_kwargs=kwargs, system_prompt_policy=str(getattr(
                              data.system_prompt_policy, "value", data.system_prompt_policy)),
                          system_prompt=data.system_prompt)


class TurnNotFoundError(ValueError):
    """The template renders an assistant turn in a way its spans cannot be located."""


def render(tokenizer, fmt: ChatFormat, chat: Chat, messages: Sequence[dict], add_generation_prompt: bool = False,
           assistant_mask: bool = False):
    return tokenizer.apply_chat_template(
        list(messages), tools=chat.tools, chat_template=fmt.template, tokenize=True,
        add_generation_prompt=add_generation_prompt, return_dict=True, return_assistant_tokens_mask=assistant_mask,
        **fmt.template_kwargs)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _find(haystack: List[int], needle: List[int], start: int) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return -1


def _turn_start(tokenizer, fmt: ChatFormat, chat: Chat, i: int, ids: List[int], done: int) -> int:
    """Where assistant turn i's generated tokens start in the whole rendering ``ids`` (at or after ``done``)."""
    prompt = list(render(tokenizer, fmt, chat, chat.messages[:i], add_generation_prompt=True)["input_ids"])
    start = _common_prefix(prompt, ids)
    if start == len(prompt) and start >= done:
        return start
    history = list(render(tokenizer, fmt, chat, chat.messages[:i])["input_ids"]) if i else []
    opens_prompt = prompt[:len(history)] == history
    if opens_prompt and len(history) < start and start >= done:
        return start  # the rendering departs inside the generation prompt
    opener = prompt[len(history):] if opens_prompt else []
    found = _find(ids, opener, done) if opener else -1
    if found < 0:
        raise TurnNotFoundError(f"assistant message {i} cannot be located in the rendered conversation (the template "
                                "renders its history unlike its prompt); use a template with {% generation %} "
                                "markers (data.chat_template)")
    return found + len(opener)


def _turn_end(tokenizer, fmt: ChatFormat, chat: Chat, i: int, ids: List[int], start: int, stops: set) -> int:
    """The position of the end-of-turn token that closes turn i; without one, the turn's last token."""
    stop = next((p for p in range(start, len(ids)) if ids[p] in stops), None)
    if stop is not None:
        return stop
    upto = list(render(tokenizer, fmt, chat, chat.messages[:i + 1])["input_ids"])
    return len(upto) - 1 if ids[:len(upto)] == upto and len(upto) > start else len(ids) - 1


@functools.lru_cache(maxsize=8)
def end_of_turn_ids(tokenizer) -> frozenset:
    vocab = tokenizer.get_vocab()
    return frozenset({tokenizer.eos_token_id} | {vocab[t] for t in STOP_TOKENS if t in vocab})


def _turn_mask(tokenizer, fmt: ChatFormat, chat: Chat) -> tuple[List[int], List[int]]:
    ids = list(render(tokenizer, fmt, chat, chat.messages)["input_ids"])
    mask = [0] * len(ids)
    stops = end_of_turn_ids(tokenizer)
    done = 0  # positions before this belong to earlier turns
    for i, message in enumerate(chat.messages):
        if message["role"] != "assistant":
            continue
        start = _turn_start(tokenizer, fmt, chat, i, ids, done)
        stop = _turn_end(tokenizer, fmt, chat, i, ids, start, stops)
        mask[start:stop + 1] = [1] * (stop + 1 - start)
        done = stop + 1
    return ids, mask


def tokenize_chat(tokenizer, chat: Chat, fmt: ChatFormat, max_length: Optional[int] = None) -> Dict[str, List[int]]:
    """-> {"input_ids", "loss_mask"} of the whole conversation, cut to max_length (None: all of it)."""
    template = tokenizer.get_chat_template(fmt.template, chat.tools)
    if GENERATION_MARKER.search(template or ""):
        out = render(tokenizer, fmt, chat, chat.messages, assistant_mask=True)
        input_ids, loss_mask = list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
    else:
        input_ids, loss_mask = _turn_mask(tokenizer, fmt, chat)
    return {"input_ids": input_ids[:max_length], "loss_mask": loss_mask[:max_length]}
