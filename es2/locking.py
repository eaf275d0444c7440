"""One pipeline run per repository at a time.

A run holds `.es2/run.lock` (JSON: run id, pid, host, start time) for its whole duration. The file is created with
`O_CREAT | O_EXCL`, so of two runs starting together exactly one gets it; the other fails at once with
"locked by run X (pid P on host H, started T)" instead of mixing its artifacts into the first run's.

A lock left by a crashed run is taken over when its pid is dead on this host (or the file is unreadable and older
than a few seconds). The takeover re-reads the lock under an `flock` guard, so two runs finding the same stale lock
cannot both take it. A lock written on another host is never judged stale: its pid means nothing here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from es2.errors import ES2Error

LOCK_PATH = Path(".es2") / "run.lock"
UNREADABLE_GRACE_S = 10.0  # a lock file still being written is empty for microseconds; older garbage is stale


class RunLocked(ES2Error):
    """Another pipeline run holds the repository."""


@dataclass(frozen=True)
class LockInfo:
    run_id: str
    pid: int
    host: str
    started: str  # ISO 8601, UTC

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, started {self.started})"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path: Path) -> LockInfo | None | str:
    """The holder, None if there is no lock file, or "unreadable" (being written, or garbage)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return LockInfo(str(data["run_id"]), int(data["pid"]), str(data["host"]), str(data["started"]))
    except (ValueError, KeyError, TypeError):
        return "unreadable"


def _is_stale(path: Path, holder: LockInfo | str) -> bool:
    if isinstance(holder, LockInfo):
        return holder.host == socket.gethostname() and not pid_alive(holder.pid)
    try:
        return time.time() - path.stat().st_mtime > UNREADABLE_GRACE_S
    except FileNotFoundError:
        return False


@contextmanager
def _guard(path: Path):
    """Serialises stale-lock takeovers (not normal acquisition, which O_EXCL already makes atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: takeovers are unguarded
        yield
        return
    fd = os.open(path.with_name(path.name + ".guard"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class RunLock:
    """`with RunLock(repo, run_id):` holds the repository's run lock; raises `RunLocked` if another run has it."""

    def __init__(self, repo: str | Path, run_id: str):
        self.path = Path(repo) / LOCK_PATH
        self.info = LockInfo(run_id, os.getpid(), socket.gethostname(),
                             datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.held = False
        self.took_over: LockInfo | str | None = None  # the stale holder replaced, if any

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder: LockInfo | str | None = None
        for _ in range(5):  # only loops when the file vanishes or a stale lock is removed in between
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is None:
                    continue
                if not _is_stale(self.path, holder):
                    raise self._locked(holder) from None
                with _guard(self.path):
                    current = read_lock(self.path)
                    if current is not None and _is_stale(self.path, current):
                        self.path.unlink(missing_ok=True)
                        self.took_over = current
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(asdict(self.info), fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held = True
            return self
        raise self._locked(holder or "unreadable")

    def release(self) -> None:
        """Removes the lock file if it is still ours (never another run's)."""
        if self.held and read_lock(self.path) == self.info:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _locked(self, holder: LockInfo | str) -> RunLocked:
        who = holder.describe() if isinstance(holder, LockInfo) else "a run whose lock file is being written"
        return RunLocked(f"pipeline in {self.path.parent.parent.resolve()} is locked by {who}",
                         f"wait for that run to finish; if it is gone (e.g. its machine rebooted), delete {self.path}")

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
