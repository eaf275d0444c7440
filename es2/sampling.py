"""Which prompts an evaluation measures: a seeded sample stratified by category.

Taking the first n rows of a file measures whatever the file happens to start with (the shipped benign set puts
its "sounds dangerous but is safe" rows last, so a first-n sample never saw them). A stratified sample gives
each category its proportional share (largest remainders) and at least one row, so a benign set always
includes its borderline share and every harmful category is attacked.
"""

from __future__ import annotations

import random
from collections import defaultdict


def stratified_sample(rows: list[dict], n: int, seed: int, key: str = "category") -> list[dict]:
    """`n` rows drawn per stratum of `rows[i][key]` (rows without it form one stratum), seed-stable, returned
    in their file order. Every stratum is present when n >= the number of strata; n >= len(rows) returns all."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= len(rows):
        return list(rows)
    strata: dict = defaultdict(list)
    for i, row in enumerate(rows):
        strata[row.get(key)].append(i)
    order = sorted(strata, key=lambda s: (s is None, str(s)))  # stable across runs, whatever the file order
    quota = {s: n * len(strata[s]) / len(rows) for s in order}
    take = {s: int(quota[s]) for s in order}
    if n >= len(order):  # every stratum gets a row before any gets its second
        for s in order:
            take[s] = max(take[s], 1)
    spare = n - sum(take.values())
    by_remainder = sorted(order, key=lambda s: (-(quota[s] - int(quota[s])), order.index(s)))
    for s in by_remainder:
        if spare <= 0:
            break
        if take[s] < len(strata[s]):
            take[s] += 1
            spare -= 1
    while spare < 0:  # the one-per-stratum floor overshot: trim the largest allocations
        s = max(order, key=lambda s: (take[s], -order.index(s)))
        take[s] -= 1
        spare += 1
    rng = random.Random(seed)
    chosen = [i for s in order for i in rng.sample(strata[s], take[s])]
    return [rows[i] for i in sorted(chosen)]
