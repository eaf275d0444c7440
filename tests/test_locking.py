"""The repository run lock: one pipeline run at a time, a clear message for the second, nothing left by a crash."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from es2.locking import HOLDER_PATH, RunLock, RunLocked

HOLD_AND_WAIT = """
import sys, time
from es2.locking import RunLock
lock = RunLock(sys.argv[1], "crashing-run").acquire()  # referenced: a collected lock is released
print("held", flush=True)
time.sleep(600)
"""


def test_second_acquirer_gets_a_clear_message_and_the_holder_keeps_the_lock(tmp_path):
    with RunLock(tmp_path, "run-a") as first:
        assert json.loads((tmp_path / HOLDER_PATH).read_text()) == first.info
        with pytest.raises(RunLocked) as exc:
            RunLock(tmp_path, "run-b").acquire()
        assert (f"locked by run run-a (pid {os.getpid()} on {socket.gethostname()}, "
                f"started {first.info['started']})") in str(exc.value)
        assert "wait for that run to finish" in str(exc.value)
        assert json.loads((tmp_path / HOLDER_PATH).read_text())["run_id"] == "run-a"
    assert not (tmp_path / HOLDER_PATH).exists()
    with RunLock(tmp_path, "run-b"):  # free again once released
        pass


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
    assert json.loads((tmp_path / HOLDER_PATH).read_text()) == winners[0].info
    winners[0].release()


def test_a_killed_holder_leaves_the_repository_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"locked by run crashing-run \\(pid {holder.pid} "):
            RunLock(tmp_path, "run-new").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: its holder file stays behind
        holder.wait()
    assert (tmp_path / HOLDER_PATH).exists()
    with RunLock(tmp_path, "run-new") as lock:
        assert json.loads((tmp_path / HOLDER_PATH).read_text()) == lock.info


def test_a_holder_that_has_not_described_itself_yet_is_still_a_holder(tmp_path):
    with RunLock(tmp_path, "run-a"):
        (tmp_path / HOLDER_PATH).unlink()
        with pytest.raises(RunLocked, match="locked by another run that is just starting"):
            RunLock(tmp_path, "run-b").acquire()
