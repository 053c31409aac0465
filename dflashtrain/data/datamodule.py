"""Rows -> padded batches for this rank: tokenized chats (data/tokenized.py) or a feature cache (data/features.py).

Every row is read, checked and tokenized in ``setup``, before training starts (the rules are in data/tokenized.py);
the data summary (rows, kept, truncated, dropped per reason with the first ``file:N`` of each, and where the rows came
from) is logged every run, at warning level when rows were dropped so that it reaches the terminal even where
logging is not configured. A batch carries ``sample_ids``, each row's ``file:N`` (what error messages name), and
``row_keys``, its dataset index (unique; it seeds the row's random draws).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from dflashtrain.config.errors import ConfigError
from dflashtrain.data import sources
from dflashtrain.data.chat import ChatFormat
from dflashtrain.data.features import FeatureLayout, decode_states, open_rows
from dflashtrain.data.rows import BadRowError
from dflashtrain.data.sampling import GlobalBatchSampler
from dflashtrain.data.tokenized import DataSummary, load_or_tokenize

__all__ = ["BadRowError", "ChatCollator", "ChatDataModule", "DataSummary"]

log = logging.getLogger(__name__)


@dataclass
class ChatCollator:
    """Right-pads a list of rows to the longest; pad positions have loss_mask 0, attention_mask 0 and zero states."""

    pad_token_id: int
    pad_to_multiple_of: int  # fewer distinct shapes for compiled kernels
    features: Optional[FeatureLayout] = None  # rows of a feature cache: their state columns are padded too
    columns: List[str] = field(init=False)

    def __post_init__(self):
        self.columns = ["input_ids", "loss_mask", "row", "index", *(self.features.widths if self.features else [])]

    def __call__(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
            "loss_mask": torch.zeros(len(rows), length, dtype=torch.long),
            "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
            "sample_ids": [str(r["row"]) for r in rows],  # file:N, a host list
            # dataset indices, a plain list so that it stays on the host: they seed each row's random draws
            "row_keys": [int(r["index"]) for r in rows],
        }
        widths = self.features.widths if self.features else {}
        for name, width in widths.items():
            batch[name] = torch.zeros(len(rows), length, width, dtype=self.features.dtypes[name])
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(r["input_ids"])
            batch["loss_mask"][i, :n] = torch.as_tensor(r["loss_mask"])
            batch["attention_mask"][i, :n] = 1
            for name, width in widths.items():
                batch[name][i, :n] = decode_states(r[name], n, width, self.features.dtypes[name])
        return batch


class ChatDataModule(L.LightningDataModule):
    """``path`` is data.path (files, directories, globs; docs/data.md), or with ``features`` (a feature cache's
    manifest) the cache's directory."""

    def __init__(
        self,
        tokenizer,
        path,
        max_length: int,
        min_supervised_tokens: int,
        batch_size: int,
        num_workers: int,
        shuffle: bool,
        on_bad_row: str,
        pad_to_multiple_of: int,
        seed: int,
        chat_format: Optional[ChatFormat] = None,  # None: the tokenizer's template, detected row formats
        cache_dir: Optional[str] = None,  # the tokenized cache's root (data.cache_dir); None: no cache
        num_proc: Optional[int] = 1,
        features: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.path = path
        self.max_length = max_length
        self.min_supervised_tokens = min_supervised_tokens
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.on_bad_row = str(getattr(on_bad_row, "value", on_bad_row))
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.chat_format = chat_format or ChatFormat()
        self.cache_dir = cache_dir
        self.num_proc = num_proc
        self.features = features
        self.train_set = None
        self.resume_position: Optional[Dict[str, int]] = None  # set from a checkpoint (load_state_dict)
        shown = path if isinstance(path, str) else ", ".join(map(str, path))
        self.summary = DataSummary(path=shown, max_length=max_length)

    @staticmethod
    def from_config(data, tokenizer, min_supervised_tokens: int, seed: int,
                    features: Optional[Dict[str, Any]] = None) -> "ChatDataModule":
        """From the data group of a config (a feature cache's manifest when data.kind=features)."""
        from omegaconf import OmegaConf

        path = OmegaConf.to_container(data.path) if OmegaConf.is_list(data.path) else data.path
        return ChatDataModule(
            tokenizer=tokenizer, path=path, max_length=data.max_length, min_supervised_tokens=min_supervised_tokens,
            batch_size=data.batch_size, num_workers=data.num_workers, shuffle=data.shuffle, on_bad_row=data.on_bad_row,
            pad_to_multiple_of=data.pad_to_multiple_of, seed=seed, chat_format=ChatFormat.from_config(data),
            cache_dir=data.cache_dir, num_proc=data.num_proc, features=features)

    def setup(self, stage: str | None = None) -> None:
        """Read, check and tokenize every row now: nothing about the data can fail once training has started."""
        if self.train_set is not None:
            return
        if self.features is not None:
            self.train_set = open_rows(self.path, self.features, self.min_supervised_tokens, self.summary)
        else:
            try:
                files = sources.resolve(self.path)
            except sources.SourceError as error:
                raise ConfigError("data.path", str(error)) from None
            self.train_set, self.summary = load_or_tokenize(
                files, self.tokenizer, self.chat_format, self.max_length, self.min_supervised_tokens, self.on_bad_row,
                self.summary, self.cache_dir, self.num_proc)
        log.log(logging.WARNING if self.summary.dropped else logging.INFO, "%s", self.summary)
        if len(self.train_set) == 0:
            raise BadRowError(f"{self.summary.path}: no usable rows ({self.summary})")
        self.train_set = self.train_set.add_column("index", list(range(len(self.train_set))))

    def collator(self) -> ChatCollator:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        layout = FeatureLayout.from_manifest(self.features) if self.features is not None else None
        return ChatCollator(pad, self.pad_to_multiple_of, layout)

    def train_dataloader(self) -> DataLoader:
        """Batches of this rank (docs/architecture.md, data across ranks): one shuffled order per epoch, cut into
        global batches; a resumed run starts at the first global batch its checkpoint had not trained on."""
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = GlobalBatchSampler(len(self.train_set), self.batch_size, self.shuffle, self.seed, rank, world)
        if self.resume_position is not None:
            epoch, done = self.resume_position["epoch"], resumed_batches(self.resume_position, sampler)
            if done >= len(sampler):  # saved after an epoch's last batch: Lightning goes on with the next epoch
                epoch, done = epoch + 1, 0
            sampler.set_position(epoch, done)
            self.resume_position = None
        collate = self.collator()
        return DataLoader(
            self.train_set.with_format(columns=collate.columns),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def state_dict(self) -> Dict[str, int]:
        """The data position, saved in every checkpoint: the epoch and how many of its global batches were taken,
        and what the position counts in (usable rows, rows per global batch), for a resume to check."""
        trainer = self.trainer
        return {"epoch": trainer.current_epoch,
                "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
                "rows": len(self.train_set), "global_batch_size": self.batch_size * trainer.world_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.resume_position = {key: int(value) for key, value in state.items()}


def resumed_batches(position: Dict[str, int], sampler: GlobalBatchSampler) -> int:
    """Global batches of ``sampler``'s size already trained on at ``position``. A checkpoint written with another
    global batch size (ranks × data.batch_size) continues at the first row it had not trained on, rounded down to
    a whole global batch, with a warning: the rows, anchors and steps repeat exactly only at the same size."""
    done, size = position["batches_done"], position.get("global_batch_size", sampler.global_batch_size)
    if size == sampler.global_batch_size:
        return done
    rows = done * size
    log.warning("resume: the checkpoint trained on global batches of %d rows, this run's have %d (ranks × "
                "data.batch_size); continuing epoch %d at row %d of %d, so the data does not repeat the "
                "uninterrupted run's", size, sampler.global_batch_size, position["epoch"],
                rows // sampler.global_batch_size * sampler.global_batch_size, sampler.num_rows)
    return rows // sampler.global_batch_size
