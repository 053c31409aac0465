"""Held-out prompts for τ evaluation: chat rows -> prompt token ids, and the stop tokens of a target."""

from __future__ import annotations

from typing import List, Optional, Sequence

from transformers import GenerationConfig

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import BadRowPolicy
from dflashtrain.data import sources
from dflashtrain.data.chat import STOP_TOKENS, ChatFormat, render
from dflashtrain.data.formats import Chat
from dflashtrain.data.tokenized import DataSummary, read_chats
from dflashtrain.models.target import load_target_config


def prompt_messages(messages: Sequence[dict]) -> List[dict]:
    """The conversation up to (not including) its last assistant turn; all of it if there is none."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return list(messages[:last])


def read_prompts(path: str, tokenizer, limit: Optional[int], policy: BadRowPolicy,
                 chat_format: Optional[ChatFormat] = None) -> List[List[int]]:
    """Chat rows (any supported file and format) -> token ids of the first ``limit`` prompts (None: all), rendered
    with the generation prompt; rows need no answer."""
    fmt = chat_format or ChatFormat()
    try:
        files = sources.resolve(path)
    except sources.SourceError as error:
        raise ConfigError("data.eval_path", str(error)) from None
    rows = read_chats(files, fmt, BadRowPolicy(policy).value, DataSummary(path=path, max_length=0),
                      require_answer=False)
    prompts = []
    for row in rows[:limit]:
        chat = Chat.from_json(row["chat"])
        rendered = render(tokenizer, fmt, chat, prompt_messages(chat.messages), add_generation_prompt=True)
        prompts.append(list(rendered["input_ids"]))
    return prompts


def stop_token_ids(tokenizer, target_path: str) -> List[int]:
    """eos of the tokenizer, of the target's config and generation config, and the usual end-of-turn tokens."""
    ids = {tokenizer.eos_token_id}
    configs = [load_target_config(target_path)]
    try:
        configs.append(GenerationConfig.from_pretrained(target_path, local_files_only=True))
    except OSError:  # no generation_config.json
        pass
    for config in configs:
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in STOP_TOKENS if token in vocab)
    return sorted(i for i in ids if i is not None)
