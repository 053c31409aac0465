"""Chat JSONL -> tokenized ``datasets.Dataset`` -> padded batches.

Every row is checked while preprocessing, before training starts, so a bad row can never stop a run mid-epoch.
A row is bad when its line is not UTF-8 or not JSON, is not an object, has no ``messages`` list, has a message
with an unknown role or non-string content, has no assistant turn or an empty one, cannot be rendered by the chat
template, or is *over max_length*: longer than ``data.max_length`` tokens so that, cut to ``max_length``, fewer
than 2·B supervised tokens remain. ``data.on_bad_row=error`` stops at the first bad row, naming ``file:line``;
``skip`` drops it and counts it by reason.

Two cases are not bad rows and are handled the same under both policies: a row longer than ``max_length`` that
keeps at least 2·B supervised tokens is truncated and kept (counted as *truncated*), and a row with fewer than
2·B supervised tokens in full is dropped and counted (docs/conventions.md, loss mask). The per-reason summary (with the first line
of each reason) is logged once, at warning level when rows were dropped so it reaches the terminal even where
logging is not configured. Each kept row carries ``row`` = its 1-based line number, the batch's ``sample_ids``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from dflashtrain.config.schema import BadRowPolicy
from dflashtrain.data.blocks import anchor_candidates
from dflashtrain.data.chat import BadRowError, RowProblem, row_problem, tokenize_chat
from dflashtrain.data.sampling import GlobalBatchSampler

__all__ = ["BadRowError", "ChatCollator", "ChatDataModule", "DataSummary", "read_chat_rows", "tokenize_rows"]

log = logging.getLogger(__name__)

TOO_FEW_SUPERVISED = "fewer than 2B supervised tokens"  # dropped under either policy


@dataclass
class DataSummary:
    """What preprocessing did with a file: rows read, kept, truncated, and dropped per reason (first line each)."""

    path: str
    max_length: int
    rows: int = 0  # non-blank lines
    kept: int = 0
    truncated: int = 0  # kept rows cut to max_length
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    first_line: Dict[str, int] = field(default_factory=dict)  # reason -> first line number

    def drop(self, reason: str, line: int) -> None:
        self.dropped[reason] += 1
        self.first_line.setdefault(reason, line)

    def __str__(self) -> str:
        text = f"data {self.path}: {self.rows} rows, {self.kept} kept"
        if self.truncated:
            text += f" ({self.truncated} truncated to data.max_length={self.max_length})"
        if self.dropped:
            reasons = ", ".join(f"{reason} {count} (first at line {self.first_line[reason]})"
                                for reason, count in sorted(self.dropped.items()))
            text += f", {sum(self.dropped.values())} dropped: {reasons}"
        return text


def _bad_row(path: str, line: int, problem: RowProblem, policy: BadRowPolicy, summary: DataSummary) -> None:
    """Count the row (skip) or stop naming it (error)."""
    if policy == BadRowPolicy.error:
        raise BadRowError(f"{path}:{line}: {problem.reason}: {problem.detail} (data.on_bad_row=skip skips such rows)")
    summary.drop(problem.reason, line)


def _parse_line(raw: bytes) -> tuple[Optional[dict], Optional[RowProblem]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, RowProblem("invalid UTF-8", f"byte {error.start} cannot be decoded")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        return None, RowProblem("invalid JSON", f"{error.msg} at column {error.colno}")
    return row, row_problem(row)


def read_chat_rows(path: str, policy: BadRowPolicy, summary: DataSummary) -> List[dict]:
    """Parse a chat JSONL file -> [{"row": line number, "messages": the messages as JSON text}] of usable rows.

    Blank lines are ignored. Messages are kept as JSON text so rows with differently shaped extra fields never meet
    in one Arrow schema.
    """
    policy = BadRowPolicy(policy)
    rows = []
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            summary.rows += 1
            row, problem = _parse_line(raw)
            if problem is not None:
                _bad_row(path, line, problem, policy, summary)
                continue
            rows.append({"row": line, "messages": json.dumps(row["messages"], ensure_ascii=False)})
    return rows


def _encode(messages_json: str, tokenizer, max_length: int, min_supervised: int) -> Dict:
    """One row -> input_ids, loss_mask (cut to max_length), truncated, and the problem ("" if none) with detail."""
    out = {"input_ids": [], "loss_mask": [], "truncated": False, "problem": "", "detail": ""}
    try:
        full = tokenize_chat(tokenizer, json.loads(messages_json))
    except Exception as error:  # noqa: BLE001 - any template failure on one row is that row's problem, reported
        out.update(problem="chat template error", detail=f"{type(error).__name__}: {error}".replace("\n", " "))
        return out
    input_ids, loss_mask = full["input_ids"][:max_length], full["loss_mask"][:max_length]
    out.update(input_ids=input_ids, loss_mask=loss_mask, truncated=len(full["input_ids"]) > max_length)
    supervised = sum(loss_mask)
    has_anchor = len(loss_mask) > 1 and bool(anchor_candidates(torch.tensor([loss_mask])).any())
    if supervised >= min_supervised and has_anchor:
        return out
    if out["truncated"] and sum(full["loss_mask"]) >= min_supervised:
        out.update(problem="over max_length", detail=(
            f"{len(full['input_ids'])} tokens; cut to data.max_length={max_length}, {supervised} supervised tokens "
            f"remain, fewer than 2·B = {min_supervised}"))
    else:
        out.update(problem=TOO_FEW_SUPERVISED,
                   detail=f"{supervised} supervised tokens, fewer than 2·B = {min_supervised}")
    return out


def tokenize_rows(rows: List[dict], tokenizer, max_length: int, min_supervised: int, policy: BadRowPolicy,
                  summary: DataSummary) -> Dataset:
    """Tokenize with the chat template; bad rows per ``policy``; rows with < ``min_supervised`` tokens dropped."""
    policy = BadRowPolicy(policy)
    if not rows:
        return Dataset.from_dict({"row": [], "input_ids": [], "loss_mask": []})
    encoded = Dataset.from_list(rows).map(
        lambda example: _encode(example["messages"], tokenizer, max_length, min_supervised),
        remove_columns=["messages"], desc="tokenizing",
    )
    keep = []
    for i, (line, problem, detail) in enumerate(zip(encoded["row"], encoded["problem"], encoded["detail"])):
        if not problem:
            keep.append(i)
        elif problem == TOO_FEW_SUPERVISED:
            summary.drop(problem, line)
        else:
            _bad_row(summary.path, line, RowProblem(problem, detail), policy, summary)
    kept = encoded.select(keep)
    summary.kept = len(kept)
    summary.truncated = sum(kept["truncated"]) if len(kept) else 0
    return kept.remove_columns(["truncated", "problem", "detail"])


@dataclass
class ChatCollator:
    """Right-pads a list of rows to the longest; pad positions have loss_mask 0 and attention_mask 0."""

    pad_token_id: int
    pad_to_multiple_of: int  # fewer distinct shapes for compiled kernels

    def __call__(self, rows: List[Dict]) -> Dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
            "loss_mask": torch.zeros(len(rows), length, dtype=torch.long),
            "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
            "sample_ids": torch.tensor([int(r["row"]) for r in rows], dtype=torch.long),
            # dataset indices, a plain list so that it stays on the host: they seed each row's random draws
            "row_keys": [int(r["index"]) for r in rows],
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
        num_workers: int,
        shuffle: bool,
        on_bad_row: BadRowPolicy,
        pad_to_multiple_of: int,
        seed: int,
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
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.train_set: Dataset | None = None
        self.resume_position: Optional[Dict[str, int]] = None  # set from a checkpoint (load_state_dict)
        self.summary = DataSummary(path=str(path), max_length=max_length)

    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize every row now: nothing about the data can fail once training has started."""
        if self.train_set is not None:
            return
        rows = read_chat_rows(self.path, self.on_bad_row, self.summary)
        self.train_set = tokenize_rows(rows, self.tokenizer, self.max_length, self.min_supervised_tokens,
                                       self.on_bad_row, self.summary)
        log.log(logging.WARNING if self.summary.dropped else logging.INFO, "%s", self.summary)
        if len(self.train_set) == 0:
            raise BadRowError(f"{self.path}: no usable rows ({self.summary})")
        self.train_set = self.train_set.add_column("index", list(range(len(self.train_set))))

    def train_dataloader(self) -> DataLoader:
        """Batches of this rank (docs/architecture.md, data across ranks): one shuffled order per epoch, cut into
        global batches; a resumed run starts at the first global batch its checkpoint had not trained on."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = GlobalBatchSampler(len(self.train_set), self.batch_size, self.shuffle, self.seed, rank, world)
        if self.resume_position is not None:
            sampler.set_position(self.resume_position["epoch"], self.resume_position["batches_done"])
            self.resume_position = None
        return DataLoader(
            self.train_set.with_format(columns=["input_ids", "loss_mask", "row", "index"]),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=ChatCollator(pad, self.pad_to_multiple_of),
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Everything but ``sample_ids``: they only name rows in messages, and reading them back from a GPU would
        make the host wait for the device (dflashtrain/train/host.py)."""
        rest = {k: v for k, v in batch.items() if k != "sample_ids"}
        return {**super().transfer_batch_to_device(rest, device, dataloader_idx), "sample_ids": batch["sample_ids"]}

    def state_dict(self) -> Dict[str, int]:
        """The data position, saved in every checkpoint: the epoch and how many of its global batches were taken."""
        trainer = self.trainer
        return {"epoch": trainer.current_epoch,
                "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.ready}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.resume_position = {"epoch": int(state["epoch"]), "batches_done": int(state["batches_done"])}
