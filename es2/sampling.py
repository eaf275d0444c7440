"""Which prompts an evaluation measures: a seeded sample stratified by category.

Taking the first n rows of a file measures whatever the file happens to start with (the shipped benign set puts
its "sounds dangerous but is safe" rows last, so a first-n sample never saw them). A stratified sample gives
each category its proportional share and at least one row, so a benign set always includes its `borderline`
share (XSTest's safe prompts import as category `borderline`) and every harmful category is attacked.
"""

from __future__ import annotations

import math
import random


def allocate(sizes: list[int], n: int) -> list[int]:
    """How many of `n` draws each stratum of the given sizes gets (0 < n < sum(sizes)).

    Largest-remainder (Hamilton) allocation of the quotas n * size / total, with a floor of one per stratum when
    n >= the number of strata: floors first, then the strata furthest below their quota gain a row (while they
    have rows left) or, when the one-row floors overshot n, those furthest above it give one back (never below
    one). Ties go to the earlier stratum.
    """
    total = sum(sizes)
    quota = [n * size / total for size in sizes]
    floor = 1 if n >= len(sizes) else 0
    take = [max(floor, math.floor(q)) for q in quota]
    while sum(take) > n:
        i = max((i for i, t in enumerate(take) if t > floor), key=lambda i: (take[i] - quota[i], -i))
        take[i] -= 1
    while sum(take) < n:
        i = max((i for i, t in enumerate(take) if t < sizes[i]), key=lambda i: (quota[i] - take[i], -i))
        take[i] += 1
    return take


def stratified_sample(rows: list[dict], n: int, seed: int, key: str = "category") -> list[dict]:
    """`n` of `rows`, stratified by `row[key]` (rows without it, or with null, form one stratum of their own),
    returned in file order.

    Every stratum is present when n >= the number of strata; otherwise the largest strata get the rows. Shares
    follow `allocate`. Seed-stable: each stratum's rows are shuffled by a generator seeded with `seed` and the
    stratum's name, and its share is taken from the front, so the draw within a stratum ignores the other
    strata, and a larger n only adds rows to a smaller n's sample. n >= len(rows) returns all rows; n < 0
    raises ValueError.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= len(rows):
        return list(rows)
    strata: dict = {}
    for i, row in enumerate(rows):
        strata.setdefault(row.get(key), []).append(i)
    # Sorted by name, not by first appearance, so that reordering a file does not move the tie-breaks.
    names = sorted(strata, key=lambda s: (s is None, str(s)))
    take = allocate([len(strata[s]) for s in names], n)
    chosen = []
    for name, k in zip(names, take):
        order = list(strata[name])
        random.Random(f"{seed}\x00{name}").shuffle(order)  # a str seed is hashed (sha512): stable across runs
        chosen += order[:k]
    return [rows[i] for i in sorted(chosen)]
