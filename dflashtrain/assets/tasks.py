"""Deterministic synthetic chat data for the embedded tiny target model.

Every conversation is a small structured task (count, reverse, sort, repeat,
times table, running addition, spelling, alphabet ranges) whose assistant
answer is a long, regular sequence fully determined by the user prompt. That
makes it learnable by a ~2M-parameter target in a few CPU minutes, and makes
the target's greedy continuations predictable enough that a good drafter gets
many tokens accepted per block, which is what the offline smoke runs measure.

Text is written with every word, number and punctuation mark separated by a
single space. The tiny tokenizer (see ``build_tiny``) turns each
space-separated piece into exactly one token, so ``count_tokens`` below is the
exact token count of a conversation rendered by the chat template; this lets
the generator enforce the length limits without needing the tokenizer. Every
message starts with a word, never a number, so numbers only ever occur as
" N" tokens (with their leading space), which keeps the vocabulary small.

Nothing here touches torch or transformers: generation is plain Python seeded
by ``random.Random`` and is byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterable

Message = dict[str, str]
Conversation = dict[str, list[Message]]

# Chat template overhead per message: <|im_start|> role \n ... <|im_end|> \n
TOKENS_PER_MESSAGE = 5
# Limits the generator enforces (the trainer drops rows with < 16 supervised
# tokens and truncates at max_length 128 by default; stay clear of both).
MIN_ANSWER_TOKENS = 20
MAX_TOTAL_TOKENS = 120

TRAIN_SEED = 1234
HELDOUT_SEED = 98765
N_TRAIN = 4000
N_HELDOUT = 200
TWO_TURN_FRACTION = 0.2

MAX_NUMBER = 199  # largest number that appears anywhere in the data

SYSTEM_PROMPTS = (
    "You are a helpful assistant .",
    "You are a careful assistant . Answer exactly .",
    "Answer every question precisely and completely .",
)
SYSTEM_FRACTION = 0.3

SPELLING_WORDS = (
    "apple", "river", "stone", "cloud", "green", "house", "light", "music",
    "ocean", "paper", "queen", "robot", "sugar", "table", "water", "zebra",
    "bread", "chair", "dream", "earth", "flame", "grape", "horse", "juice",
    "knife", "lemon", "mouse", "night", "piano", "smile", "tiger", "under",
    "violet", "window", "yellow", "garden", "planet", "silver", "winter",
    "cat", "dog", "sun", "moon", "tree", "bird", "fish", "star", "book",
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _join(items: Iterable[object]) -> str:
    return " ".join(str(item) for item in items)


def count_tokens(messages: list[Message]) -> int:
    """Exact token count of ``messages`` under the tiny chat template/tokenizer."""
    return sum(len(m["content"].split()) + TOKENS_PER_MESSAGE for m in messages)


def answer_tokens(message: Message) -> int:
    """Supervised tokens of one assistant turn: its content plus ``<|im_end|>``."""
    return len(message["content"].split()) + 1


# --------------------------------------------------------------------------
# Task generators. Each takes (rng, short) and returns (user, assistant).
# ``short`` asks for a smaller instance so two turns fit in the length budget.
# --------------------------------------------------------------------------


def task_count_up(rng: random.Random, short: bool) -> tuple[str, str]:
    n = rng.randint(14, 20) if short else rng.randint(14, 40)
    a = rng.randint(0, MAX_NUMBER - n + 1)
    b = a + n - 1
    user = rng.choice((f"Count up from {a} to {b} .", f"Please count from {a} to {b} ."))
    return user, f"Counting up from {a} to {b} : {_join(range(a, b + 1))} ."


def task_count_down(rng: random.Random, short: bool) -> tuple[str, str]:
    n = rng.randint(14, 20) if short else rng.randint(14, 40)
    a = rng.randint(0, MAX_NUMBER - n + 1)
    b = a + n - 1
    user = rng.choice((f"Count down from {b} to {a} .", f"Please count backwards from {b} to {a} ."))
    return user, f"Counting down from {b} to {a} : {_join(range(b, a - 1, -1))} ."


def task_skip_count(rng: random.Random, short: bool) -> tuple[str, str]:
    # Steps and starts are multiples of k so a tiny model can learn the few
    # hundred "x + k" facts involved.
    k = rng.choice((2, 3, 5, 10))
    n = rng.randint(12, 16) if short else rng.randint(12, 30)
    n = min(n, MAX_NUMBER // k + 1)
    a = k * rng.randint(0, (MAX_NUMBER - k * (n - 1)) // k)
    b = a + k * (n - 1)
    user = f"Count by {k} from {a} to {b} ."
    return user, f"Counting by {k} from {a} to {b} : {_join(range(a, b + 1, k))} ."


def task_reverse(rng: random.Random, short: bool) -> tuple[str, str]:
    n = rng.randint(14, 16) if short else rng.randint(14, 32)
    xs = [rng.randint(0, 99) for _ in range(n)]
    user = rng.choice((f"Reverse the list : {_join(xs)} .", f"Write this list backwards : {_join(xs)} ."))
    return user, f"The reversed list is : {_join(reversed(xs))} ."


def task_sort(rng: random.Random, short: bool) -> tuple[str, str]:
    # Distinct values: the hardest task for the tiny target, kept learnable.
    n = rng.randint(15, 17) if short else rng.randint(15, 24)
    xs = rng.sample(range(100), n)
    if rng.random() < 0.5:
        return (f"Sort these numbers in ascending order : {_join(xs)} .",
                f"In ascending order : {_join(sorted(xs))} .")
    return (f"Sort these numbers in descending order : {_join(xs)} .",
            f"In descending order : {_join(sorted(xs, reverse=True))} .")


def task_repeat(rng: random.Random, short: bool) -> tuple[str, str]:
    while True:
        m = rng.randint(3, 6)
        k = rng.randint(3, 5) if short else rng.randint(3, 8)
        if k * (m + 1) + 4 >= MIN_ANSWER_TOKENS:
            break
    xs = [rng.randint(0, 99) for _ in range(m)]
    block = _join(xs)
    user = f"Repeat the following list {k} times : {block} ."
    return user, f"Repeating {k} times : " + " , ".join([block] * k) + " ."


def task_times_table(rng: random.Random, short: bool) -> tuple[str, str]:
    n = rng.randint(2, 19)
    k_max = min(6 if short else 10, MAX_NUMBER // n)
    k = rng.randint(4, max(4, k_max))
    entries = " , ".join(f"{n} x {i} = {n * i}" for i in range(1, k + 1))
    user = f"Write the multiplication table of {n} from 1 to {k} ."
    return user, f"The multiplication table of {n} : {entries} ."


def task_running_sum(rng: random.Random, short: bool) -> tuple[str, str]:
    m = rng.randint(4, 5) if short else rng.randint(4, 9)
    xs = [rng.randint(1, 9) for _ in range(m)]
    steps, total = [], xs[0]
    for x in xs[1:]:
        steps.append(f"{total} + {x} = {total + x}")
        total += x
    user = rng.choice((f"Add up the numbers : {_join(xs)} .", f"What is the sum of {_join(xs)} ?"))
    return user, f"Adding step by step : {' , '.join(steps)} . The total is {total} ."


def task_spell(rng: random.Random, short: bool) -> tuple[str, str]:
    words: list[str] = []
    parts: list[str] = []
    limit = MIN_ANSWER_TOKENS if short else rng.randint(MIN_ANSWER_TOKENS, 45)
    while sum(len(p.split()) for p in parts) < limit:
        word = rng.choice(SPELLING_WORDS)
        words.append(word)
        parts.append(f"{word} is spelled {_join(word)} .")
    user = f"Spell these words letter by letter : {_join(words)} ."
    return user, "Spelling : " + " ".join(parts)


def task_alphabet(rng: random.Random, short: bool) -> tuple[str, str]:
    n = rng.randint(13, 16) if short else rng.randint(13, 26)
    i = rng.randint(0, 26 - n)
    first, last = LETTERS[i], LETTERS[i + n - 1]
    user = f"List the letters from {first} to {last} ."
    return user, f"The letters from {first} to {last} are : {_join(LETTERS[i:i + n])} ."


TASKS: dict[str, Callable[[random.Random, bool], tuple[str, str]]] = {
    "count_up": task_count_up,
    "count_down": task_count_down,
    "skip_count": task_skip_count,
    "reverse": task_reverse,
    "sort": task_sort,
    "repeat": task_repeat,
    "times_table": task_times_table,
    "running_sum": task_running_sum,
    "spell": task_spell,
    "alphabet": task_alphabet,
}
TASK_NAMES = tuple(TASKS)  # fixed order: part of the determinism contract


def _is_valid(messages: list[Message]) -> bool:
    if count_tokens(messages) > MAX_TOTAL_TOKENS:
        return False
    return all(answer_tokens(m) >= MIN_ANSWER_TOKENS for m in messages if m["role"] == "assistant")


def sample_conversation(rng: random.Random) -> Conversation:
    """One conversation (single- or two-turn), rejection-sampled to fit the limits."""
    while True:
        messages: list[Message] = []
        if rng.random() < SYSTEM_FRACTION:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        two_turn = rng.random() < TWO_TURN_FRACTION
        for _ in range(2 if two_turn else 1):
            user, answer = TASKS[rng.choice(TASK_NAMES)](rng, two_turn)
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": answer})
        if _is_valid(messages):
            return {"messages": messages}


def _prompt_key(conv: Conversation) -> tuple[str, ...]:
    return tuple(m["content"] for m in conv["messages"] if m["role"] == "user")


def generate(n: int, seed: int, exclude: set[tuple[str, ...]] | None = None) -> list[Conversation]:
    """``n`` distinct conversations from ``seed``, skipping prompts in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[Conversation] = []
    while len(rows) < n:
        conv = sample_conversation(rng)
        key = _prompt_key(conv)
        if key in seen:
            continue
        seen.add(key)
        rows.append(conv)
    return rows


def build_splits(n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> tuple[list[Conversation], list[Conversation]]:
    """Train and heldout splits; heldout prompts never occur in train."""
    train = generate(n_train, TRAIN_SEED)
    heldout = generate(n_heldout, HELDOUT_SEED, exclude={_prompt_key(c) for c in train})
    return train, heldout


def to_jsonl(rows: list[Conversation]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(rows: list[Conversation], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_jsonl(rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[Conversation]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
