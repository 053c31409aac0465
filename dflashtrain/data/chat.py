"""Chat rows -> ``input_ids`` and ``loss_mask`` through the target's own chat template (docs/conventions.md, loss mask).

``loss_mask`` is 1 on assistant tokens, including the end-of-turn token that closes each assistant turn. Templates
that mark assistant spans with ``{% generation %}`` give the mask directly; for others the span of assistant turn i
is the difference between the rendering of ``messages[:i]`` (with the generation prompt) and of
``messages[:i+1]``, cut after its last end-of-turn token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

ROLES = ("system", "user", "assistant", "tool")
GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def _ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> List[int]:
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def _marked_mask(tokenizer, messages: Sequence[dict]) -> tuple[List[int], List[int]]:
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]


def _prefix_diff_mask(tokenizer, messages: Sequence[dict]) -> tuple[List[int], List[int]]:
    input_ids = _ids(tokenizer, messages)
    loss_mask = [0] * len(input_ids)
    end_of_turn = tokenizer.eos_token_id
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:i], add_generation_prompt=True))
        upto = _ids(tokenizer, messages[: i + 1])
        if input_ids[: len(upto)] != upto:
            raise ValueError(
                "the chat template does not render conversations prefix-consistently; add {% generation %} "
                "markers around assistant content so assistant spans can be found"
            )
        stop = len(upto)
        while stop > start and upto[stop - 1] != end_of_turn:  # drop the newline after the end-of-turn token
            stop -= 1
        for position in range(start, stop if stop > start else len(upto)):
            loss_mask[position] = 1
    return input_ids, loss_mask


def tokenize_chat(tokenizer, messages: Sequence[dict], max_length: Optional[int] = None) -> Dict[str, List[int]]:
    """-> {"input_ids", "loss_mask"}, truncated to max_length (None: the whole conversation)."""
    if GENERATION_MARKER.search(tokenizer.chat_template or ""):
        input_ids, loss_mask = _marked_mask(tokenizer, messages)
    else:
        input_ids, loss_mask = _prefix_diff_mask(tokenizer, messages)
    return {"input_ids": input_ids[:max_length], "loss_mask": loss_mask[:max_length]}


class BadRowError(ValueError):
    """A data row that cannot be used, named by file and line (``data.on_bad_row=error``)."""


@dataclass(frozen=True)
class RowProblem:
    """Why a row is unusable: ``reason`` is short and stable (it is counted), ``detail`` says where and what."""

    reason: str
    detail: str


def row_problem(row: object) -> Optional[RowProblem]:
    """Why a parsed JSONL row is not a usable chat, or None."""
    if not isinstance(row, dict):
        return RowProblem("not a JSON object", f"the line holds a JSON {type(row).__name__}, not an object")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return RowProblem("missing messages", "no non-empty `messages` list")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            return RowProblem("unknown role", f"message {i} has role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            kind = type(message.get("content")).__name__
            return RowProblem("non-string content", f"message {i} ({role}) has {kind} content, not a string")
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        return RowProblem("no assistant turn", "no message has role 'assistant': nothing to supervise")
    empty = [i for i in assistant if not messages[i]["content"].strip()]
    if empty:
        return RowProblem("empty assistant turn", f"assistant message {empty[0]} has empty content")
    return None
