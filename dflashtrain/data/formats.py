"""Row formats -> one chat shape: a list of OpenAI-style messages, plus the row's tool definitions (docs/data.md).

* ``messages``: ``{"messages": [{"role", "content", ...}], "tools"?: [...]}``. ``content`` is a string, a list of
  text parts (``[{"type": "text", "text": ...}]``, joined), or null on an assistant turn that only calls tools.
  ``tool_calls``, ``reasoning_content``, ``name`` and ``tool_call_id`` are passed to the chat template, which renders
  them; keys whose value is null (parquet fills absent struct fields with null) are dropped.
* ``sharegpt``: ``{"conversations": [{"from", "value"}], "system"?: str, "tools"?: ...}``; ``from`` is mapped to a
  role (``human`` -> user, ``gpt`` -> assistant, ``observation`` -> tool, ...).

``data.format=auto`` detects the format per file from its first row that has either list. Every shape that cannot
be used is a :class:`RowProblem` with a short, counted reason. The system-prompt policy is applied here too.
Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from dflashtrain.data.rows import RowProblem

ROLES = ("system", "user", "assistant", "tool")
LIST_KEYS = {"messages": "messages", "sharegpt": "conversations"}  # format -> the key of its turn list
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "function_call": "assistant", "system": "system", "tool": "tool", "observation": "tool",
                  "function": "tool"}


@dataclass
class Chat:
    messages: List[Dict[str, Any]]
    tools: Optional[List[Any]] = None

    def to_json(self) -> str:
        """JSON text (rows with differently shaped fields never have to meet in one Arrow schema). Raises
        UnicodeEncodeError on a lone surrogate, which JSON can spell ("\\ud83d") but text cannot hold."""
        text = json.dumps({"messages": self.messages, "tools": self.tools}, ensure_ascii=False)
        text.encode("utf-8")
        return text

    @staticmethod
    def from_json(text: str) -> "Chat":
        return Chat(**json.loads(text))


def detect_format(row: Any) -> Optional[str]:
    if isinstance(row, dict):
        for name, key in LIST_KEYS.items():
            if isinstance(row.get(key), list):
                return name
    return None


def _text(content: Any, where: str) -> Union[str, RowProblem]:
    """A message's content -> text: a string, a list of text parts (joined), or null (-> "")."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                return RowProblem("non-text content", f"{where} has a {kind!r} content part; only text parts are "
                                                      "supported")
        return "".join(parts)
    return RowProblem("non-text content", f"{where} has {type(content).__name__} content, not text")


def _tool_calls(calls: Any, where: str) -> Optional[RowProblem]:
    if not isinstance(calls, list):
        return RowProblem("bad tool call", f"{where}: tool_calls is a {type(calls).__name__}, not a list")
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments", {}), (str, dict))):
            return RowProblem("bad tool call", f"{where}: tool call {j} needs a function name (string) and "
                                               "arguments (an object or its JSON text)")
    return None


def _message(turn: Any, i: int, role_key: str, content_key: str, roles: Dict[str, str]) -> Union[dict, RowProblem]:
    if not isinstance(turn, dict):
        return RowProblem("bad message", f"message {i} is a {type(turn).__name__}, not an object")
    role = roles.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
    if role is None:
        allowed = ", ".join(dict.fromkeys(roles))
        return RowProblem("unknown role", f"message {i} has {role_key} {turn.get(role_key)!r}; allowed: {allowed}")
    where = f"message {i} ({role})"
    content = _text(turn.get(content_key), where)
    if isinstance(content, RowProblem):
        return content
    message = {k: v for k, v in turn.items() if v is not None and k not in (role_key, content_key)}
    message.update(role=role, content=content)
    if message.get("tool_calls") == []:
        del message["tool_calls"]
    if "tool_calls" in message:
        problem = _tool_calls(message["tool_calls"], where) if role == "assistant" else RowProblem(
            "bad tool call", f"{where} has tool_calls; only assistant turns call tools")
        if problem:
            return problem
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        return RowProblem("non-text content", f"{where} has {type(reasoning).__name__} reasoning_content, not text")
    return message


def _tools(value: Any) -> Union[Optional[List[Any]], RowProblem]:
    if value is None or value == []:
        return None
    if isinstance(value, str):  # some datasets store the tool definitions as JSON text
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return RowProblem("bad tools", "the row's `tools` is text but not JSON")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        return RowProblem("bad tools", "the row's `tools` must be a list of tool definitions (objects)")
    return value


def to_chat(row: Any, row_format: str, require_answer: bool = True) -> Union[Chat, RowProblem]:
    """A parsed row in ``row_format`` (messages | sharegpt) -> Chat, or why it cannot be used."""
    if not isinstance(row, dict):
        return RowProblem("not a JSON object", f"the row is a JSON {type(row).__name__}, not an object")
    key = LIST_KEYS[row_format]
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        other = next((k for k in LIST_KEYS.values() if k != key and isinstance(row.get(k), list)), None)
        hint = f" (it has `{other}`: set data.format, or keep one format per file)" if other else ""
        return RowProblem(f"missing {key}", f"no non-empty `{key}` list{hint}")
    if row_format == "sharegpt":
        messages = [_message(t, i, "from", "value", SHAREGPT_ROLES) for i, t in enumerate(turns)]
        if isinstance(row.get("system"), str) and row["system"].strip():
            messages.insert(0, {"role": "system", "content": row["system"]})
    else:
        messages = [_message(t, i, "role", "content", {r: r for r in ROLES}) for i, t in enumerate(turns)]
    problem = next((m for m in messages if isinstance(m, RowProblem)), None)
    if problem:
        return problem
    tools = _tools(row.get("tools"))
    if isinstance(tools, RowProblem):
        return tools
    if require_answer:
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not answers:
            return RowProblem("no assistant turn", "no assistant message: nothing to supervise")
        empty = [i for i in answers if not (messages[i]["content"].strip() or messages[i].get("tool_calls")
                                            or messages[i].get("reasoning_content", "").strip())]
        if empty:
            return RowProblem("empty assistant turn", f"assistant message {empty[0]} has empty content")
    return Chat(messages=messages, tools=tools)


def apply_system_policy(chat: Chat, policy: str, prompt: Optional[str]) -> Chat:
    """keep: as is; drop: no system message; default: ``prompt`` where the chat has none; replace: ``prompt`` only."""
    if policy == "keep":
        return chat
    has_system = chat.messages[0]["role"] == "system"
    if policy == "default" and has_system:
        return chat
    messages = [m for m in chat.messages if m["role"] != "system"]
    if policy in ("default", "replace"):
        messages.insert(0, {"role": "system", "content": prompt})
    return Chat(messages=messages, tools=chat.tools)
