"""One pipeline run per repository at a time.

A run holds a kernel file lock (`filelock`: flock on POSIX) on `.es2/run.lock` for its whole duration. The kernel
drops the lock when the process ends, however it ends, so a crashed run leaves nothing to clean up. Who holds it
is written beside it (`.es2/run.json`), so a second run fails at once with "locked by run X (pid P on host H,
started T)" instead of mixing its artifacts into the first run's.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from es2.errors import ES2Error
from es2.io import write_json

LOCK_PATH = Path(".es2") / "run.lock"
HOLDER_PATH = Path(".es2") / "run.json"


class RunLocked(ES2Error):
    """Another pipeline run holds the repository."""


class RunLock:
    """`with RunLock(repo, run_id):` holds the repository's run lock; raises `RunLocked` if another run has it."""

    def __init__(self, repo: str | Path, run_id: str):
        self.path, self.holder_path = Path(repo) / LOCK_PATH, Path(repo) / HOLDER_PATH
        self.info = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._lock = FileLock(self.path, blocking=False)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunLocked(f"pipeline in {self.path.parent.parent.resolve()} is locked by {self._holder()}",
                            "wait for that run to finish, or stop it; its lock goes with its process") from None
        write_json(self.holder_path, self.info)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.holder_path.unlink(missing_ok=True)  # while still held: the next holder writes its own
            self._lock.release()

    def _holder(self) -> str:
        try:
            info = json.loads(self.holder_path.read_text(encoding="utf-8"))
            return f"run {info['run_id']} (pid {info['pid']} on {info['host']}, started {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
            return "another run that is just starting"

    def __enter__(self) -> RunLock:
        return self if self._lock.is_locked else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
