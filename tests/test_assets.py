"""Checks on the embedded offline assets (tiny target, tokenizer, synthetic data). CPU, fast."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dflashtrain.assets import TINY_HELDOUT_JSONL, TINY_TARGET_DIR, TINY_TRAIN_JSONL, tasks

TWO_TURN_CHAT = [
    {"role": "system", "content": "You are a helpful assistant ."},
    {"role": "user", "content": "Count up from 7 to 9 ."},
    {"role": "assistant", "content": "Counting up from 7 to 9 : 7 8 9 ."},
    {"role": "user", "content": "List the letters from a to c ."},
    {"role": "assistant", "content": "The letters from a to c are : a b c ."},
]
# (token, in assistant mask) written out by hand for TWO_TURN_CHAT.
EXPECTED_TOKENS = (
    [("<|im_start|>", 0), ("system", 0), ("\n", 0)]
    + [(t, 0) for t in ["You", " are", " a", " helpful", " assistant", " ."]]
    + [("<|im_end|>", 0), ("\n", 0), ("<|im_start|>", 0), ("user", 0), ("\n", 0)]
    + [(t, 0) for t in ["Count", " up", " from", " 7", " to", " 9", " ."]]
    + [("<|im_end|>", 0), ("\n", 0), ("<|im_start|>", 0), ("assistant", 0), ("\n", 0)]
    + [(t, 1) for t in ["Counting", " up", " from", " 7", " to", " 9", " :", " 7", " 8", " 9", " ."]]
    + [("<|im_end|>", 1), ("\n", 0), ("<|im_start|>", 0), ("user", 0), ("\n", 0)]
    + [(t, 0) for t in ["List", " the", " letters", " from", " a", " to", " c", " ."]]
    + [("<|im_end|>", 0), ("\n", 0), ("<|im_start|>", 0), ("assistant", 0), ("\n", 0)]
    + [(t, 1) for t in ["The", " letters", " from", " a", " to", " c", " are", " :", " a", " b", " c", " ."]]
    + [("<|im_end|>", 1), ("\n", 0)]
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TARGET_DIR)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def committed_rows():
    return {"train": tasks.read_jsonl(TINY_TRAIN_JSONL), "heldout": tasks.read_jsonl(TINY_HELDOUT_JSONL)}


def test_tokenizer_special_tokens(tokenizer):
    config = AutoConfig.from_pretrained(TINY_TARGET_DIR)
    assert tokenizer.mask_token == "<|mask|>"
    assert tokenizer.mask_token_id is not None and tokenizer.mask_token_id != tokenizer.unk_token_id
    assert tokenizer.mask_token_id < config.vocab_size
    assert len(tokenizer) < config.vocab_size  # unused embedding rows above the tokenizer
    assert tokenizer.eos_token == "<|im_end|>" and config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id is not None and config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id


def test_chat_template_assistant_mask(tokenizer):
    out = tokenizer.apply_chat_template(
        TWO_TURN_CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    assert list(zip(tokens, out["assistant_masks"])) == EXPECTED_TOKENS
    # Exact text round trip through the tokenizer.
    rendered = tokenizer.apply_chat_template(TWO_TURN_CHAT, tokenize=False)
    assert tokenizer.decode(out["input_ids"]) == rendered


def test_chat_template_generation_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template(TWO_TURN_CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_data_generation_is_deterministic(committed_rows):
    train, heldout = tasks.build_splits()
    assert tasks.to_jsonl(heldout) == TINY_HELDOUT_JSONL.read_text(encoding="utf-8")
    assert tasks.to_jsonl(train) == TINY_TRAIN_JSONL.read_text(encoding="utf-8")
    train_prompts = {tuple(m["content"] for m in r["messages"] if m["role"] == "user") for r in committed_rows["train"]}
    assert not any(
        tuple(m["content"] for m in r["messages"] if m["role"] == "user") in train_prompts
        for r in committed_rows["heldout"]
    )


def test_committed_rows_fit_trainer_limits(tokenizer, committed_rows):
    rows = committed_rows["train"] + committed_rows["heldout"]
    assert len(committed_rows["train"]) >= 3000 and len(committed_rows["heldout"]) >= 100
    out = tokenizer.apply_chat_template(
        [r["messages"] for r in rows], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    for row, ids, mask in zip(rows, out["input_ids"], out["assistant_masks"]):
        assert len(ids) <= 128, row
        assert sum(mask) >= 16, row
        assert tokenizer.unk_token_id not in ids, row


@torch.no_grad()
def test_target_greedy_accuracy_on_heldout(tokenizer, model, committed_rows):
    hits = total = 0
    for row in committed_rows["heldout"][:20]:
        out = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor([out["input_ids"]])
        mask = torch.tensor(out["assistant_masks"][1:], dtype=torch.bool)
        pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
        hits += (pred[mask] == ids[0, 1:][mask]).sum().item()
        total += mask.sum().item()
    assert hits / total > 0.9


def test_target_is_tiny(model, tokenizer):
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.model_type == "qwen3"
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    assert tokenizer.mask_token_id < model.get_input_embeddings().weight.shape[0]
