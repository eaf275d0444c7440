"""Process-level settings for heavy work on shared CPUs."""

from __future__ import annotations

import os
import time


def _busy_cores(window: float = 0.3) -> float:
    """Cores busy right now (all processes), from two /proc/stat samples; 0 where /proc is unavailable."""
    def sample():
        with open("/proc/stat") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(window)
        busy1, total1 = sample()
    except OSError:
        return 0.0
    return (busy1 - busy0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1)


def free_cores() -> int:
    """Cores not busy with other processes ($ES2_THREADS overrides).

    torch's OpenMP threads spin-wait on a core another process holds, which was measured 10x slower than
    using fewer threads. The load is sampled now (the 1-minute load average lags by minutes and would keep a
    job on one thread long after a neighbour has finished).
    """
    if os.environ.get("ES2_THREADS"):
        return max(1, int(os.environ["ES2_THREADS"]))
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, cores - int(_busy_cores() + 0.3)))


def set_threads() -> int:
    import torch

    n = free_cores()
    torch.set_num_threads(n)
    return n

