"""Outputs that are whole or absent: every file dflashtrain writes (checkpoints, exports, reports) goes through here.

A file is written under a hidden temporary name in its own directory (``.<name>.partial-<pid>-<random>``, which no
``*.ckpt`` or ``*.json`` pattern matches), flushed and fsynced, then renamed over the final name, and the directory
is fsynced, so a reader (or a resume after a crash, a full disk or a kill) sees either the previous file or the new
one, never a part. A write that fails removes its temporary file and raises :class:`OutputWriteError`, one line
naming what and where; the file it would have replaced is untouched. Nothing here imports torch.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

PARTIAL_MARK = ".partial-"


class OutputWriteError(RuntimeError):
    """An output could not be written (disk full, read-only, …); what was there before is intact."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error(error: BaseException) -> "OSError | None":
    """The OSError behind ``error``, if any: torch.save reports a failed write as a RuntimeError whose context is it."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None], key: str, intact: str = "") -> Path:
    """Write ``path`` through ``write(file)`` atomically. ``intact`` names what survives a failure, for the message."""
    path = Path(path)
    temporary = partial_name(path)
    try:
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = os_error(error)
        if cause is None:
            raise
        reason = cause.strerror or str(cause) or type(cause).__name__
        kept = intact or (f"the previous {path.name} is intact" if path.exists() else "nothing was written")
        raise OutputWriteError(key, f"cannot write {path}: {reason}; {kept}") from None
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str, key: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), key)


def remove_partials(directory: Path) -> int:
    """Delete temporary files left in ``directory`` by a process killed mid-write; the caller holds its lock."""
    removed = 0
    for stale in Path(directory).glob(f".*{PARTIAL_MARK}*"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed
