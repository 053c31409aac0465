"""Data files -> checked, tokenized rows, once (docs/data.md, tokenize once).

Every row is read, checked and tokenized before training starts, so no data row can stop a run mid-epoch.

* A **bad row** (not UTF-8, not JSON, not an object, no turn list, an unknown role, non-text content, a malformed
  tool call, no or an empty assistant turn, a lone surrogate, a chat-template failure) stops preprocessing naming
  ``file:N`` under ``data.on_bad_row=error``, or is dropped and counted by reason under ``skip``.
* Under either policy a row is dropped and counted when it has fewer than 2·B supervised tokens, or when it is
  *over max_length*: longer than ``data.max_length`` so that, cut to it, fewer than 2·B supervised tokens remain.
  A longer row that keeps enough supervision is cut to ``data.max_length`` and counted as truncated.

The result is cached under ``<data.cache_dir>/tokenized/<key>``, the key hashing the data files (path, size,
modification time), the tokenizer, the chat template, the formatting options, ``max_length`` and 2·B. The next run,
and every other rank, loads it instead of tokenizing again: one process builds it under a file lock while the others
wait, then read what it wrote. The problems of every row are kept in the cache, so a run with ``on_bad_row=error``
still stops on a cached bad row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dflashtrain.config.errors import ConfigError
from dflashtrain.data import sources
from dflashtrain.data.chat import ChatFormat, tokenize_chat
from dflashtrain.data.formats import Chat, apply_system_policy, detect_format, to_chat
from dflashtrain.data.rows import BadRowError, RowProblem, row_id

log = logging.getLogger(__name__)

TOO_FEW_SUPERVISED = "fewer than 2B supervised tokens"
OVER_MAX_LENGTH = "over max_length"
ALWAYS_DROPPED = (TOO_FEW_SUPERVISED, OVER_MAX_LENGTH)  # not malformed data: dropped under either policy
CACHE_VERSION = 1


@dataclass
class DataSummary:
    """What preprocessing did: rows read, kept, truncated, dropped per reason (first row each), and the cache."""

    path: str
    max_length: int
    rows: int = 0
    kept: int = 0
    truncated: int = 0  # kept rows cut to max_length
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    first_row: Dict[str, str] = field(default_factory=dict)  # reason -> the first row's id (file:N)
    problems: List[List[str]] = field(default_factory=list)  # [stage, row id, reason, detail] of every bad row
    cache: str = ""  # how the rows were obtained (tokenized, cached, loaded from the cache)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        self.first_row.setdefault(reason, where)

    def __str__(self) -> str:
        text = f"data {self.path}: {self.rows} rows, {self.kept} kept"
        if self.truncated:
            text += f" ({self.truncated} truncated to data.max_length={self.max_length})"
        if self.dropped:
            reasons = ", ".join(f"{reason} {count} (first at {self.first_row[reason]})"
                                for reason, count in sorted(self.dropped.items()))
            text += f", {sum(self.dropped.values())} dropped: {reasons}"
        return text + (f" [{self.cache}]" if self.cache else "")


def bad_row(where: str, problem: RowProblem, policy: str, summary: DataSummary, stage: str) -> None:
    """Count the row (skip) or stop naming it (error)."""
    if policy == "error":
        raise BadRowError(f"{where}: {problem.reason}: {problem.detail} (data.on_bad_row=skip skips such rows)")
    summary.drop(problem.reason, where)
    summary.problems.append([stage, where, problem.reason, problem.detail])


def _chat_json(chat: Chat) -> Any:
    try:
        return chat.to_json()
    except UnicodeEncodeError as error:
        return RowProblem("invalid text", f"a lone surrogate {error.object[error.start:error.end]!r} is not text "
                                          "(a JSON \\ud8xx escape without its pair)")
    except RecursionError:
        return RowProblem("invalid JSON", "nested too deeply")


def read_chats(files: Sequence[sources.DataFile], fmt: ChatFormat, policy: str, summary: DataSummary,
               require_answer: bool = True) -> List[Dict[str, str]]:
    """Every usable row of the files -> {"row": its id (file:N), "chat": the chat as JSON text}, in order."""
    out = []
    for source in files:
        row_format = None if fmt.row_format == "auto" else fmt.row_format
        for number, record in sources.read(source):
            where = row_id(source.name, number)
            summary.rows += 1
            if not isinstance(record, RowProblem):
                row_format = row_format or detect_format(record)
                chat = to_chat(record, row_format or "messages", require_answer)
                if not isinstance(chat, RowProblem):
                    record = _chat_json(apply_system_policy(chat, fmt.system_prompt_policy, fmt.system_prompt))
                else:
                    record = chat
            if isinstance(record, RowProblem):
                bad_row(where, record, policy, summary, "read")
                continue
            out.append({"row": where, "chat": record})
    return out


def encode(chat_json: str, tokenizer, fmt: ChatFormat, max_length: int, min_supervised: int) -> Dict[str, Any]:
    """One chat -> input_ids, loss_mask (cut to max_length), truncated, and its problem ("" if none) with detail."""
    out = {"input_ids": [], "loss_mask": [], "truncated": False, "problem": "", "detail": ""}
    try:
        full = tokenize_chat(tokenizer, Chat.from_json(chat_json), fmt)
    except Exception as error:  # noqa: BLE001 - any template failure on one row is that row's problem, reported
        out.update(problem="chat template error", detail=f"{type(error).__name__}: {error}".replace("\n", " "))
        return out
    input_ids, loss_mask = full["input_ids"][:max_length], full["loss_mask"][:max_length]
    out.update(input_ids=input_ids, loss_mask=loss_mask, truncated=len(full["input_ids"]) > max_length)
    supervised = sum(loss_mask)
    has_anchor = any(a and b for a, b in zip(loss_mask, loss_mask[1:]))  # an anchor and its successor supervised
    if supervised >= min_supervised and has_anchor:
        return out
    if out["truncated"] and sum(full["loss_mask"]) >= min_supervised:
        out.update(problem=OVER_MAX_LENGTH, detail=(
            f"{len(full['input_ids'])} tokens; cut to data.max_length={max_length}, {supervised} supervised tokens "
            f"remain, fewer than 2·B = {min_supervised}"))
    else:
        out.update(problem=TOO_FEW_SUPERVISED,
                   detail=f"{supervised} supervised tokens, fewer than 2·B = {min_supervised}")
    return out


def auto_num_proc(num_proc: Optional[int], rows: int) -> int:
    """null: one process per core (at most 8) for 2000 rows or more, else 1."""
    if num_proc is not None:
        return num_proc
    return max(1, min(8, os.cpu_count() or 1)) if rows >= 2000 else 1


def tokenize_rows(rows: List[Dict[str, str]], tokenizer, fmt: ChatFormat, max_length: int, min_supervised: int,
                  policy: str, summary: DataSummary, num_proc: Optional[int] = 1):
    """Tokenize with the chat template; bad rows per ``policy``; short and over-length rows dropped and counted."""
    from datasets import Dataset

    if not rows:
        return Dataset.from_dict({"row": [], "input_ids": [], "loss_mask": []})
    workers = auto_num_proc(num_proc, len(rows))
    encoded = Dataset.from_list(rows).map(
        lambda example: encode(example["chat"], tokenizer, fmt, max_length, min_supervised),
        remove_columns=["chat"], desc="tokenizing", num_proc=workers if workers > 1 else None,  # 1: in this process
        new_fingerprint=uuid.uuid4().hex,  # no hashing of the tokenizer: this result is cached by our own key
    )
    keep = []
    for i, (where, problem, detail) in enumerate(zip(encoded["row"], encoded["problem"], encoded["detail"])):
        if not problem:
            keep.append(i)
        elif problem in ALWAYS_DROPPED:
            summary.drop(problem, where)
        else:
            bad_row(where, RowProblem(problem, detail), policy, summary, "tokenize")
    kept = encoded.select(keep)
    summary.kept = len(kept)
    summary.truncated = sum(kept["truncated"]) if len(kept) else 0
    return kept.remove_columns(["truncated", "problem", "detail"])


# ------------------------------------------------------------------------------------------ the cache
def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.chat_template, str(tokenizer.special_tokens_map)],
                       sort_keys=True, default=str)
    return hashlib.blake2b((state + extra).encode(), digest_size=16).hexdigest()


def cache_key(files: Sequence[sources.DataFile], tokenizer, fmt: ChatFormat, max_length: int,
              min_supervised: int) -> str:
    key = {"version": CACHE_VERSION, "files": sources.identity(files), "tokenizer": tokenizer_fingerprint(tokenizer),
           "format": asdict(fmt), "max_length": max_length, "min_supervised": min_supervised}
    return hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def resolve_cache_dir(cache_dir: Optional[str]) -> Optional[Path]:
    """data.cache_dir: auto -> $DFLASHTRAIN_CACHE_DIR, else ~/.cache/dflashtrain; null -> no cache."""
    if cache_dir is None:
        return None
    if cache_dir == "auto":
        cache_dir = os.environ.get("DFLASHTRAIN_CACHE_DIR") or "~/.cache/dflashtrain"
    return Path(os.path.expanduser(cache_dir)) / "tokenized"


def _replay(stored: Dict[str, Any], policy: str, summary: DataSummary) -> None:
    """A cached summary -> this run's, stopping on the first bad row under ``error`` as a fresh run would."""
    problems = stored.pop("problems")
    if policy == "error":
        for stage in ("read", "tokenize"):
            for _, where, reason, detail in (p for p in problems if p[0] == stage):
                bad_row(where, RowProblem(reason, detail), policy, summary, stage)
    summary.problems = problems
    for key, value in stored.items():
        setattr(summary, key, Counter(value) if key == "dropped" else value)


def _build(files, tokenizer, fmt, max_length, min_supervised, policy, summary, num_proc):
    rows = read_chats(files, fmt, policy, summary)
    return tokenize_rows(rows, tokenizer, fmt, max_length, min_supervised, policy, summary, num_proc)


def load_or_tokenize(files: Sequence[sources.DataFile], tokenizer, fmt: ChatFormat, max_length: int,
                     min_supervised: int, policy: str, summary: DataSummary, cache_dir: Optional[str],
                     num_proc: Optional[int]) -> Tuple[Any, DataSummary]:
    """The tokenized rows (columns row, input_ids, loss_mask) of the files, from the cache when it has them."""
    from datasets import load_from_disk
    from filelock import FileLock

    try:
        tokenizer.get_chat_template(fmt.template)
    except ValueError as error:  # a base model's tokenizer: no template at all
        raise ConfigError("data.chat_template", f"the tokenizer has no chat template ({error}); give one as a Jinja "
                                                "file") from None
    root = resolve_cache_dir(cache_dir)
    if root is None:
        summary.cache = "not cached (data.cache_dir=null)"
        return _build(files, tokenizer, fmt, max_length, min_supervised, policy, summary, num_proc), summary
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning("data.cache_dir: cannot create %s (%s): tokenizing without a cache", root, error.strerror)
        summary.cache = "not cached"
        return _build(files, tokenizer, fmt, max_length, min_supervised, policy, summary, num_proc), summary
    final = root / cache_key(files, tokenizer, fmt, max_length, min_supervised)
    with FileLock(str(final) + ".lock"):  # one process tokenizes; the others wait, then load what it wrote
        cached = _load(final)
        if cached is None:
            dataset = _build(files, tokenizer, fmt, max_length, min_supervised, policy, summary, num_proc)
            if len(dataset) == 0:  # nothing to cache (the caller reports it)
                return dataset, summary
            try:
                _save(dataset, summary, final)
            except OSError as error:  # a full or read-only disk costs the next run a re-tokenization, nothing more
                log.warning("data.cache_dir: cannot write the tokenized cache %s (%s)", final, error.strerror or error)
                summary.cache = "not cached: the cache could not be written"
                return dataset, summary
            summary.cache = f"tokenized, cached in {final}"
            return load_from_disk(str(final / "rows")), summary
    stored, dataset = cached
    _replay({k: v for k, v in stored.items() if k not in ("path", "max_length")}, policy, summary)
    summary.cache = f"loaded from the tokenized cache {final}"
    return dataset, summary


def _load(final: Path):
    """(stored summary, rows) of a cache entry, or None; a damaged entry is removed (and rebuilt by the caller)."""
    from datasets import load_from_disk

    if not (final / "summary.json").is_file():
        return None
    try:
        return json.loads((final / "summary.json").read_text()), load_from_disk(str(final / "rows"))
    except Exception as error:  # noqa: BLE001 - whatever broke the entry, tokenizing again repairs it
        log.warning("data.cache_dir: the tokenized cache %s is damaged (%s: %s); tokenizing again", final,
                    type(error).__name__, error)
        shutil.rmtree(final, ignore_errors=True)
        return None


def _save(dataset, summary: DataSummary, final: Path) -> None:
    """Write beside ``final``, then rename: a reader never sees a half-written cache."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    disable_progress_bar()
    try:
        dataset.save_to_disk(str(partial / "rows"))
        stored = {"rows": summary.rows, "kept": summary.kept, "truncated": summary.truncated,
                  "dropped": dict(summary.dropped), "first_row": summary.first_row, "problems": summary.problems}
        (partial / "summary.json").write_text(json.dumps(stored))
        shutil.rmtree(final, ignore_errors=True)  # only ever a leftover without summary.json (we hold the lock)
        os.replace(partial, final)
    finally:
        enable_progress_bar()
        shutil.rmtree(partial, ignore_errors=True)
