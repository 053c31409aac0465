"""Where an export goes: built aside, moved into place whole, and never over anything that is not an export.

* An export directory carries a marker, ``dflashtrain_export.json``, listing its files (and the checkpoint and
  step it came from). ``overwrite=true`` replaces a directory only when it has that marker and holds nothing but
  the files it lists; any other non-empty directory (a models folder, a run's checkpoints, …) is refused.
* The new directory is built as ``<output_dir>.incomplete``, which carries ``.dflashtrain-staging`` (pid and host of
  the exporting process) while it is written. An existing ``<output_dir>.incomplete`` is removed only when it is
  ours and its process is gone; one of a live export, or anything else there, is refused.
* Publishing: every file fsynced and made mode 0644 (the directory 0755, so a serving process running as another
  user reads it, whatever mode a writer's temporary file had), the old export (if any) renamed aside, the new one
  renamed into place, the old one deleted. At every moment ``<output_dir>`` is the old export or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, List

from dflashtrain.config.errors import ConfigError
from dflashtrain.export.atomic import atomic_write_text, fsync_dir

MARKER = "dflashtrain_export.json"
STAGING_MARKER = ".dflashtrain-staging"
FILE_MODE, DIR_MODE = 0o644, 0o755


def staging_path(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + ".incomplete")


def read_marker(directory: Path) -> Dict[str, Any]:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else {}


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an output_dir that must not be replaced."""
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise ConfigError("output_dir", f"{output_dir} exists and is not a directory; give a directory path")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError("output_dir", f"{output_dir} exists and is not empty; pick another, or set overwrite=true "
                                        "to replace a previous export there")
    marker = read_marker(output_dir)
    if not marker:
        raise ConfigError("output_dir", f"{output_dir} is not a dflashtrain export (no {MARKER}); overwrite=true "
                                        "only ever replaces a previous export, never other content")
    foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in set(marker["files"]) | {MARKER})
    if foreign:
        raise ConfigError("output_dir", f"{output_dir} holds files that are not part of its export "
                                        f"({', '.join(foreign[:3])}); overwrite=true replaces only an export's own "
                                        "files: move them, or pick another output_dir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def make_staging(output_dir: Path) -> Path:
    """Create ``<output_dir>.incomplete`` for this process (removing a crashed export's own leftover)."""
    staging = staging_path(output_dir)
    for _ in range(2):
        try:
            staging.mkdir(parents=True)
            (staging / STAGING_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
            return staging
        except FileExistsError:
            owner = (staging / STAGING_MARKER).read_text().split() if (staging / STAGING_MARKER).is_file() else []
            if len(owner) != 2 or not owner[0].isdigit():
                raise ConfigError("output_dir", f"{staging} exists and is not a dflashtrain staging directory; "
                                                "remove it yourself, or pick another output_dir") from None
            if owner[1] != socket.gethostname() or _alive(int(owner[0])):
                raise ConfigError("output_dir", f"{staging} is being written by another export (pid {owner[0]} on "
                                                f"{owner[1]}); wait for it, or pick another output_dir") from None
            shutil.rmtree(staging)  # ours, and the export that made it is gone
        except OSError as error:
            raise ConfigError("output_dir", f"cannot create {staging}: {error.strerror or error}") from None
    raise ConfigError("output_dir", f"{staging} keeps reappearing; another export is writing there")


def publish(staging: Path, output_dir: Path, provenance: Dict[str, Any]) -> None:
    """Mark ``staging`` as an export, make it durable, and move it into place over a previous export (if any)."""
    files: List[str] = sorted(p.name for p in staging.iterdir() if p.name != STAGING_MARKER)
    for name in files:
        with open(staging / name, "rb") as handle:
            os.fsync(handle.fileno())
    atomic_write_text(staging / MARKER, json.dumps({"files": files, **provenance}, indent=2) + "\n", key="output_dir")
    (staging / STAGING_MARKER).unlink()
    for name in (*files, MARKER):  # readable by a serving process of another user, whatever mode a writer chose
        os.chmod(staging / name, FILE_MODE)
    os.chmod(staging, DIR_MODE)
    fsync_dir(staging)
    previous = None
    if output_dir.is_dir() and any(output_dir.iterdir()):
        previous = output_dir.with_name(f"{output_dir.name}.replaced-{os.getpid()}")
        output_dir.rename(previous)
    elif output_dir.is_dir():
        output_dir.rmdir()
    staging.rename(output_dir)
    fsync_dir(output_dir.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
