"""``data.path`` -> data files -> raw rows, each numbered within its file (docs/data.md, sources).

``data.path`` is a file, a directory, a glob or a list of them:

* ``*.jsonl`` / ``*.jsonl.gz``: one JSON object per line; ``*.json`` / ``*.json.gz``: JSON lines, or one JSON array
  of rows (ShareGPT dumps);
* ``*.parquet``, read in record batches (no copy of the file is made);
* a ``datasets`` ``save_to_disk`` directory (a Dataset, or a DatasetDict's ``train`` split);
* any other directory: every ``*.jsonl``, ``*.jsonl.gz`` and ``*.parquet`` file under it, sorted.

JSON lines are parsed here, line by line, rather than by ``datasets``' JSON loader, which stops at the first malformed
line without naming it and forces one Arrow schema on every row. A line that is not UTF-8 or not JSON (nested beyond
Python's recursion limit included) is a :class:`RowProblem`; a byte-order mark at the start of a line is dropped. A
file that cannot be read at all (a truncated gzip, a damaged parquet file) is a :class:`BadRowError` naming it.
Nothing here imports torch.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple, Union

from dflashtrain.data.rows import BadRowError, RowProblem

BOM = b"\xef\xbb\xbf"
FILE_KINDS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json", ".parquet": "parquet"}
DIRECTORY_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # data files picked up inside a plain directory
SUPPORTED = ("*.jsonl, *.jsonl.gz, *.json, *.json.gz, *.parquet, a datasets save_to_disk directory, or a "
             "directory of such files")


class SourceError(ValueError):
    """``data.path`` names nothing readable; the message says what and where (reported under ``data.path``)."""


@dataclass(frozen=True)
class DataFile:
    path: str  # absolute
    name: str  # how its rows are named: relative to the common parent of all data files
    kind: str  # jsonl | json | parquet | arrow


def _suffix_kind(path: str):
    lower = path.lower()
    return next((kind for suffix, kind in FILE_KINDS.items() if lower.endswith(suffix)), None)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _expand(entry: str) -> List[Tuple[str, str]]:
    """One entry of data.path -> [(absolute path, kind)]."""
    entry = os.path.expanduser(str(entry))
    if glob.has_magic(entry):
        matches = sorted(glob.glob(entry, recursive=True))
        if not matches:
            raise SourceError(f"no file matches {entry!r}")
        return [item for match in matches for item in _expand(glob.escape(match))]
    path = Path(entry)
    if path.is_dir():
        if _is_saved_dataset(path):
            return [(str(path.resolve()), "arrow")]
        files = sorted(str(p.resolve()) for p in path.rglob("*") if p.is_file()
                       and p.name.lower().endswith(DIRECTORY_SUFFIXES))
        if not files:
            raise SourceError(f"{entry} is a directory without data files ({', '.join(DIRECTORY_SUFFIXES)}) and not "
                              "a datasets save_to_disk directory")
        return [(f, _suffix_kind(f)) for f in files]
    if not path.is_file():
        raise SourceError(f"file not found: {entry}")
    kind = _suffix_kind(entry)
    if kind is None:
        raise SourceError(f"{entry}: unsupported file type; supported: {SUPPORTED}")
    return [(str(path.resolve()), kind)]


def resolve(spec: Union[str, Sequence[str], None]) -> List[DataFile]:
    """data.path -> its data files, in order, each once. Raises SourceError."""
    if spec is None or (isinstance(spec, (list, tuple)) and not spec):
        raise SourceError(f"is required: {SUPPORTED}")
    entries = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    wrong = [entry for entry in entries if not isinstance(entry, (str, os.PathLike))]
    if wrong:
        raise SourceError(f"must be a path, a glob or a list of them; got {wrong[0]!r}")
    found: dict = {}
    for entry in entries:
        for path, kind in _expand(entry):
            found.setdefault(path, kind)
    paths = list(found)
    parent = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [DataFile(path=p, name=os.path.relpath(p, parent), kind=found[p]) for p in paths]


def identity(files: Sequence[DataFile]) -> List[List[Any]]:
    """What the tokenized cache is keyed by: every file's path, size and modification time."""
    out = []
    for source in files:
        members = [Path(source.path)]
        if source.kind == "arrow":
            members = sorted(p for p in Path(source.path).rglob("*") if p.is_file())
        for member in members:
            stat = member.stat()
            out.append([str(member), stat.st_size, stat.st_mtime_ns])
    return out


def parse_json_line(raw: bytes) -> Any:
    """A line's bytes -> the parsed value, or a RowProblem."""
    raw = raw.removeprefix(BOM)  # concatenated files carry one per file
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return RowProblem("invalid UTF-8", f"byte {error.start} cannot be decoded")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return RowProblem("invalid JSON", f"{error.msg} (column {error.colno})")
    except RecursionError:
        return RowProblem("invalid JSON", "nested too deeply to parse")


def _open(source: DataFile):
    return gzip.open(source.path, "rb") if source.path.lower().endswith(".gz") else open(source.path, "rb")


def _json_records(source: DataFile) -> Iterator[Tuple[int, Any]]:
    with _open(source) as handle:
        head = handle.read(4096).removeprefix(BOM).lstrip()
    if source.kind == "json" and head.startswith(b"["):  # one JSON array of rows
        with _open(source) as handle:
            parsed = parse_json_line(handle.read())
        if isinstance(parsed, RowProblem):
            raise BadRowError(f"{source.name}: {parsed.reason}: {parsed.detail} (a JSON array of rows)")
        yield from enumerate(parsed, start=1)
        return
    with _open(source) as handle:
        for line, raw in enumerate(handle, start=1):
            if raw.strip() and raw.strip() != BOM:
                yield line, parse_json_line(raw)


def _parquet_records(source: DataFile) -> Iterator[Tuple[int, Any]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(source.path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _arrow_records(source: DataFile) -> Iterator[Tuple[int, Any]]:
    import datasets

    loaded = datasets.load_from_disk(source.path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise BadRowError(f"{source.name}: a DatasetDict without a 'train' split (splits: "
                              f"{', '.join(loaded)}); point data.path at {source.name}/<split>")
        loaded = loaded["train"]
    yield from enumerate(loaded, start=1)


READERS = {"jsonl": _json_records, "json": _json_records, "parquet": _parquet_records, "arrow": _arrow_records}


def read(source: DataFile) -> Iterator[Tuple[int, Any]]:
    """(row number, parsed row or RowProblem) for every non-blank row of the file."""
    try:
        yield from READERS[source.kind](source)
    except (OSError, EOFError, zlib.error, ValueError) as error:
        if isinstance(error, BadRowError):
            raise
        raise BadRowError(f"{source.name}: cannot be read as {source.kind}: "
                          f"{type(error).__name__}: {error}".replace("\n", " ")) from None
