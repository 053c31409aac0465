"""What can be wrong with a data row, and how a row is named in messages: ``file:N``.

N is the 1-based line of a JSON-lines file, or the 1-based row of a parquet file, a JSON array or a ``datasets``
directory. ``file`` is the path relative to the common parent of all data files (the file name for one file).
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass


class BadRowError(ValueError):
    """A data row (or data file) that cannot be used, named by ``file:N`` (``data.on_bad_row=error``)."""


@dataclass(frozen=True)
class RowProblem:
    """Why a row is unusable: ``reason`` is short and stable (it is counted), ``detail`` says where and what."""

    reason: str
    detail: str


def row_id(name: str, number: int) -> str:
    return f"{name}:{number}"
