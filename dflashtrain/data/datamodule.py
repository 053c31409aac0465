"""Chat JSONL -> tokenized ``datasets.Dataset`` -> padded batches.

Rows are read with their line numbers so that a bad row is named (``file:line``) or skipped and counted, as
``data.on_bad_row`` says; a preprocessing summary (kept rows, dropped rows per reason) is logged once.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from dflashtrain.config import BadRowPolicy
from dflashtrain.data.blocks import anchor_candidates
from dflashtrain.data.chat import row_problem, tokenize_chat

log = logging.getLogger(__name__)


class BadRowError(ValueError):
    """A data row that cannot be used, named by file and line."""


def read_chat_rows(path: str, policy: BadRowPolicy, skipped: Counter) -> List[dict]:
    """Parse a chat JSONL file; each kept row gets ``row`` = its 1-based line number."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = row_problem(row)
            except json.JSONDecodeError:
                problem = "invalid JSON"
            if problem is not None:
                if BadRowPolicy(policy) == BadRowPolicy.error:
                    raise BadRowError(f"{path}:{line_no}: {problem} (set data.on_bad_row=skip to skip such rows)")
                skipped[problem] += 1
                continue
            rows.append({"messages": row["messages"], "row": line_no})
    return rows


def tokenize_rows(rows: List[dict], tokenizer, max_length: int, min_supervised: int, skipped: Counter) -> Dataset:
    """Tokenize with the chat template; drop rows with fewer than ``min_supervised`` supervised tokens."""

    def encode(example):
        encoded = tokenize_chat(tokenizer, example["messages"], max_length)
        mask = torch.tensor(encoded["loss_mask"])
        encoded["num_supervised"] = int(mask.sum())
        encoded["num_anchors"] = int(anchor_candidates(mask.unsqueeze(0)).sum()) if len(mask) > 1 else 0
        return encoded

    dataset = Dataset.from_list(rows).map(encode, remove_columns=["messages"], desc="tokenizing")
    enough = [n >= min_supervised and a > 0 for n, a in zip(dataset["num_supervised"], dataset["num_anchors"])]
    dropped = len(enough) - sum(enough)
    if dropped:
        skipped[f"fewer than {min_supervised} supervised tokens"] += dropped
    return dataset.select([i for i, ok in enumerate(enough) if ok])


@dataclass
class ChatCollator:
    """Right-pads a list of rows to the longest; pad positions have loss_mask 0 and attention_mask 0."""

    pad_token_id: int

    def __call__(self, rows: List[Dict]) -> Dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
            "loss_mask": torch.zeros(len(rows), length, dtype=torch.long),
            "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
            "sample_ids": torch.tensor([int(r["row"]) for r in rows], dtype=torch.long),
        }
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(r["input_ids"])
            batch["loss_mask"][i, :n] = torch.as_tensor(r["loss_mask"])
            batch["attention_mask"][i, :n] = 1
        return batch


class ChatDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer,
        path: str,
        max_length: int,
        min_supervised_tokens: int,
        batch_size: int,
        num_workers: int = 0,
        shuffle: bool = True,
        on_bad_row: BadRowPolicy = BadRowPolicy.error,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.path = path
        self.max_length = max_length
        self.min_supervised_tokens = min_supervised_tokens
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.on_bad_row = BadRowPolicy(on_bad_row)
        self.train_set: Dataset | None = None
        self.skipped: Counter = Counter()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        rows = read_chat_rows(self.path, self.on_bad_row, self.skipped)
        self.train_set = tokenize_rows(rows, self.tokenizer, self.max_length, self.min_supervised_tokens, self.skipped)
        summary = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items())) or "none"
        log.info("data %s: %d rows kept; dropped: %s", self.path, len(self.train_set), summary)
        if len(self.train_set) == 0:
            raise BadRowError(f"{self.path}: no usable rows (dropped: {summary})")

    def train_dataloader(self) -> DataLoader:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return DataLoader(
            self.train_set.with_format(columns=["input_ids", "loss_mask", "row"]),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            collate_fn=ChatCollator(pad),
            drop_last=False,
        )
