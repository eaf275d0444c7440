"""File I/O that never leaves a half-written artifact: write to a temp file (or folder) beside the target, then
rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temp path in the target's folder; rename it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); a finished artifact gets the mode a plain open() would give,
        # so a colleague or a container sharing the folder can read it
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield an empty staging folder beside `target`; swap it in for `target` only if the block succeeds.

    On an exception the old `target` stays as it was and the staging folder is removed. The staging name is
    unique, so two processes building the same folder (a shared cache) do not write into each other's.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        # mkdtemp makes the folder private (0700); a finished one gets the mode a plain mkdir would give
        os.chmod(staging, 0o777 & ~_umask())
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder `staging` in place of `target`, removing the old one. For a staging folder that
    several processes fill (a sharded save); one process alone uses `atomic_dir`."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    Path(staging).rename(target)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(target: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write one JSON object per line; return the row count."""
    n = 0
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _umask() -> int:
    # Linux reports the umask in /proc. Elsewhere it can only be read by setting it, and while it is set other
    # threads (data loaders, loggers) create files with the temporary value: 077 keeps those private rather
    # than world-writable.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask
