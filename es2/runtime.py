"""Process-level settings for heavy work on shared CPUs."""

from __future__ import annotations

import os


def free_cores() -> int:
    """Cores not busy with other processes ($ES2_THREADS overrides).

    torch's OpenMP threads spin-wait on a core another process holds, which was measured 10x slower than
    using fewer threads; so count the cores the 1-minute load average says are taken.
    """
    if os.environ.get("ES2_THREADS"):
        return max(1, int(os.environ["ES2_THREADS"]))
    cores = len(os.sched_getaffinity(0))
    busy = int(os.getloadavg()[0] + 0.5)
    return max(1, min(cores, cores - busy))


def set_threads() -> int:
    import torch

    n = free_cores()
    torch.set_num_threads(n)
    return n
