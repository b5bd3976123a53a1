"""Leftovers of killed or failed writers: ``*.partial`` files and ``.unpack-*`` staging folders.

Every temporary name carries its writer's process id (``<name>.<pid>.<thread>.partial`` for a
chunk or a pack being written, ``.unpack-<cache>.<pid>.<random>`` for an unpack's staging
folder). A leftover is removed only when that process is gone, so the files of a writer
running now, on this machine, are kept. (Process ids are per machine: caches on a network
disk written from several machines at once should not be cleaned from either.)
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

PARTIAL = re.compile(r"^(?P<name>.+)\.(?P<pid>\d+)\.(?P<thread>\d+)\.partial$")
STAGING = ".unpack-"


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def partial_name(path: str | Path) -> Path:
    """The temporary name a writer of ``path`` uses: ``<name>.<pid>.<thread>.partial`` beside it."""
    import threading

    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")


def clean_partials(folder: str | Path | None, *, recursive: bool = True, name: str | None = None) -> int:
    """Remove ``*.partial`` files in ``folder`` (and below, if ``recursive``) whose writer is gone.

    ``name`` keeps the cleaning to one target's leftovers (``pack --to x.zip`` cleans
    ``x.zip.*.partial`` only, never other files of the user's folder). Returns how many went.
    """
    if folder is None or not Path(folder).is_dir():
        return 0
    found = Path(folder).rglob("*.partial") if recursive else Path(folder).glob("*.partial")
    removed = 0
    for f in found:
        m = PARTIAL.match(f.name)
        if m is None or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        try:
            f.unlink()
            removed += 1
        except FileNotFoundError:  # another cleaner was first
            pass
    return removed


def staging_dir(root: Path) -> Path:
    """A fresh staging folder beside the cache ``root`` (same disk: moving out of it is a rename)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING}{root.name}.{os.getpid()}.", dir=root.parent))


def clean_staging(root: str | Path) -> int:
    """Remove staging folders of unpacks into ``root`` whose process is gone; returns how many."""
    root = Path(root)
    if not root.parent.is_dir():
        return 0
    pattern = re.compile(re.escape(f"{STAGING}{root.name}.") + r"(\d+)\.[a-z0-9_]{8}$")  # mkdtemp's suffix
    removed = 0
    for d in root.parent.glob(f"{STAGING}*"):
        m = pattern.match(d.name)
        if m and d.is_dir() and not pid_alive(int(m[1])):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed
