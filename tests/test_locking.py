"""The repository run lock: one pipeline run at a time, a clear message for the second, stale locks taken over."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from es2.locking import LOCK_PATH, LockInfo, RunLock, RunLocked, read_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


def _write_lock(repo, **fields):
    path = repo / LOCK_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"run_id": "old-run", "pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T03:00:00",
            **fields}
    path.write_text(json.dumps(info))
    return path


def test_lock_file_records_the_run_and_is_removed_on_exit(tmp_path):
    with RunLock(tmp_path, "run-a") as lock:
        info = read_lock(tmp_path / LOCK_PATH)
        assert info == lock.info
        assert (info.run_id, info.pid, info.host) == ("run-a", os.getpid(), socket.gethostname())
    assert not (tmp_path / LOCK_PATH).exists()


def test_second_acquirer_gets_a_clear_message(tmp_path):
    with RunLock(tmp_path, "run-a") as first:
        with pytest.raises(RunLocked) as exc:
            RunLock(tmp_path, "run-b").acquire()
        message = str(exc.value)
        assert f"locked by run run-a (pid {os.getpid()} on {socket.gethostname()}, started {first.info.started})" \
            in message
        assert "delete" in message and "run.lock" in message
        assert read_lock(tmp_path / LOCK_PATH).run_id == "run-a"  # the holder keeps its lock
    assert not (tmp_path / LOCK_PATH).exists()


def test_only_one_of_many_simultaneous_acquirers_wins(tmp_path):
    outcomes, barrier = [], threading.Barrier(8)

    def contend(i):
        barrier.wait()
        try:
            outcomes.append(RunLock(tmp_path, f"run-{i}").acquire())
        except RunLocked:
            outcomes.append(None)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    assert read_lock(tmp_path / LOCK_PATH) == winners[0].info


def test_stale_lock_from_a_dead_pid_is_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    with RunLock(tmp_path, "run-new") as lock:
        assert isinstance(lock.took_over, LockInfo) and lock.took_over.run_id == "old-run"
        assert read_lock(tmp_path / LOCK_PATH).run_id == "run-new"


def test_lock_of_a_live_process_is_not_stale(tmp_path):
    _write_lock(tmp_path, pid=os.getppid())
    with pytest.raises(RunLocked, match="locked by run old-run"):
        RunLock(tmp_path, "run-new").acquire()


def test_lock_from_another_host_is_never_judged_stale(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="some-other-host")
    with pytest.raises(RunLocked, match="on some-other-host"):
        RunLock(tmp_path, "run-new").acquire()


def test_unreadable_lock_is_held_while_fresh_and_stale_when_old(tmp_path):
    path = tmp_path / LOCK_PATH
    path.parent.mkdir()
    path.write_text("")  # a lock being written
    with pytest.raises(RunLocked, match="being written"):
        RunLock(tmp_path, "run-new").acquire()
    os.utime(path, (1, 1))  # garbage from long ago
    with RunLock(tmp_path, "run-new") as lock:
        assert lock.took_over == "unreadable"


def test_release_never_removes_another_runs_lock(tmp_path):
    lock = RunLock(tmp_path, "run-a").acquire()
    _write_lock(tmp_path, run_id="run-b")  # e.g. someone deleted ours and another run took the repo
    lock.release()
    assert read_lock(tmp_path / LOCK_PATH).run_id == "run-b"
